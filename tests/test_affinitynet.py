"""AffinityNet: PSA layer facts and checkpoint layout, affinity labels from la/ha CRF maps, training."""
import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from caee.stages.label_cache import AffinityLabelDataset, ensure_crf_labels
from caee.core.config import AffinityTrainConfig, CrfConfig, DataConfig, NetConfig, TrainConfig, config_from_dict
from caee.core import records
from caee.method.crf import crf_cam_labels, label_folder_settings
from caee.data import load_split
from caee.data.transforms import build_train_transform
from caee.engine.trainer import StepContext
from caee.core.errors import CaeeError
from caee.core.io import load_label_png, save_cam_npz, save_label_png
from caee.models import ResNet38, TinyCNN
from caee.models.affinitynet import AffinityNet, init_affinitynet_from, load_affinitynet
from caee.models.classifier import CamClassifier
from caee.stages import train_affinity
from caee.core.layout import crf_dir
from caee.stages.train_affinity import AffinityTask
from caee.weights.checkpoints import load_model_weights, psa_to_caee
from conftest import randomise_bn

WIDTH = 0.125


def _net(seed=0) -> AffinityNet:
    torch.manual_seed(seed)
    return randomise_bn(AffinityNet(ResNet38(width=WIDTH)), seed).eval()


def _psa_layout(model: nn.Module) -> dict:
    """What PSA's res38_aff.pth looks like: backbone at top level, f8_3..f9, no num_batches_tracked."""
    return {k.removeprefix("backbone."): v.clone() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


# ---------------------------------------------------------------- the network


def test_psa_layer_facts_and_shapes():
    net = _net()
    assert [type(m) for m in net.head_modules()] == [nn.Conv2d] * 4
    assert net.head_modules() == [net.f8_3, net.f8_4, net.f8_5, net.f9]
    # inputs follow the backbone width, outputs stay PSA's 64 / 128 / 256 / 448
    shapes = {n: tuple(getattr(net, n).weight.shape) for n in ("f8_3", "f8_4", "f8_5", "f9")}
    assert shapes == {"f8_3": (64, 64, 1, 1), "f8_4": (128, 128, 1, 1), "f8_5": (256, 512, 1, 1),
                      "f9": (448, 448, 1, 1)}
    assert all(getattr(net, n).bias is None for n in shapes)
    assert net.feature_stride == 8 and net.out_channels == 448
    x = torch.randn(2, 3, 44, 60)
    with torch.no_grad():
        out = net(x)
        d = net.backbone.affinity_features(x)
        manual = F.elu(net.f9(torch.cat([F.elu(net.f8_3(d["conv4"])), F.elu(net.f8_4(d["conv5"])),
                                         F.elu(net.f8_5(d["conv6"]))], 1)))
    assert out.shape == (2, 448, 6, 8)  # ceil(44/8), ceil(60/8)
    torch.testing.assert_close(out, manual, rtol=0, atol=0)
    assert (out > -1).all()  # ELU output


def test_psa_initialisation():
    torch.manual_seed(0)
    net = AffinityNet(ResNet38(width=WIDTH))
    for name, fan_in in (("f8_3", 64), ("f8_4", 128), ("f8_5", 512)):
        std = float(getattr(net, name).weight.detach().std())
        assert std == pytest.approx(math.sqrt(2 / fan_in), rel=0.1), name  # kaiming normal
    bound = 4 * math.sqrt(6 / (448 + 448))  # xavier uniform, gain 4
    w9 = net.f9.weight.detach()
    assert float(w9.abs().max()) <= bound
    assert float(w9.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_psa_checkpoint_loads_every_key_and_gives_identical_features(tmp_path):
    src = _net(seed=1)
    state = _psa_layout(src)
    assert {"f8_3.weight", "f8_4.weight", "f8_5.weight", "f9.weight", "conv1a.weight", "bn7.running_var",
            "b4_1.conv_branch2b1.weight"} <= set(state)
    assert not any(k.startswith("backbone.") or k.endswith("num_batches_tracked") for k in state)
    # the documented conversion accounts for every key in both directions
    converted = psa_to_caee(state, head_keys=AffinityNet.HEAD_KEYS)
    own = {k for k in _net().state_dict() if not k.endswith("num_batches_tracked")}
    assert set(converted) == own
    path = tmp_path / "res38_aff.pth"
    torch.save(state, path)

    dst = _net(seed=2)
    assert init_affinitynet_from(dst, path, NetConfig(width=WIDTH)) == "affinitynet"
    for k, v in converted.items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src(x), rtol=0, atol=0)

    # PSA file without meta: load_affinitynet takes the architecture from the fallback net
    model, meta = load_affinitynet(path, NetConfig(width=WIDTH, pretrained="/nonexistent.params"))
    assert meta == {}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src(x), rtol=0, atol=0)


def test_our_checkpoint_meta_picks_the_architecture(tmp_path):
    src = _net(seed=3)
    path = tmp_path / "model.pth"
    torch.save({"model": src.state_dict(), "arch": "affinitynet",
                "net": dataclasses.asdict(NetConfig(width=WIDTH)), "radius": 5}, path)
    model, meta = load_affinitynet(path, NetConfig(width=1.0))  # fallback ignored: the meta says 0.125
    assert meta["radius"] == 5 and model.backbone.channels[7] == 512
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src(x), rtol=0, atol=0)
    torch.save({"model": src.state_dict(), "arch": "classifier"}, tmp_path / "cls.pth")
    with pytest.raises(CaeeError, match="not an AffinityNet"):
        load_affinitynet(tmp_path / "cls.pth", NetConfig(width=WIDTH))


def test_wrong_width_checkpoint_is_refused(tmp_path):
    torch.save(_psa_layout(_net()), tmp_path / "aff.pth")
    with pytest.raises(CaeeError, match="shape mismatch"):
        init_affinitynet_from(AffinityNet(ResNet38(width=0.25)), tmp_path / "aff.pth", NetConfig(width=0.25))


@pytest.mark.parametrize("layout", ["caee", "psa"])
def test_classifier_checkpoint_initialises_the_backbone_only(tmp_path, caplog, layout):
    torch.manual_seed(5)
    cls = randomise_bn(CamClassifier(ResNet38(width=WIDTH), num_classes=3), 5)
    state = cls.state_dict()
    if layout == "psa":
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
    path = tmp_path / "model.pth"
    torch.save({"model": state, "arch": "classifier"}, path)
    net = _net(seed=6)
    heads_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("backbone.")}
    with caplog.at_level(logging.INFO, logger="caee"):
        assert init_affinitynet_from(net, path, NetConfig(width=WIDTH)) == "classifier-backbone"
    assert "backbone weights only" in caplog.text and "fc8" in caplog.text
    for k, v in cls.backbone.state_dict().items():
        torch.testing.assert_close(net.backbone.state_dict()[k], v, rtol=0, atol=0)
    for k, v in heads_before.items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)


def test_generic_backbone_without_affinity_features():
    torch.manual_seed(0)
    net = AffinityNet(TinyCNN(width=0.5)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
    s = net.feature_stride
    assert out.shape == (1, 448, 32 // s, 32 // s)


def test_embed_stride_gives_a_finer_grid_aligned_with_the_image():
    """embed_stride 2 on TinyCNN (native 4): ceil(H/2) x ceil(W/2) cells for any size, the native
    stride reproduces the default, and an image gives the same cells as its zero-padded copy."""
    torch.manual_seed(0)
    net = AffinityNet(TinyCNN(width=0.5), (8, 8, 16), embed_stride=2).eval()
    native = AffinityNet(TinyCNN(width=0.5), (8, 8, 16), embed_stride=4).eval()
    native.load_state_dict(net.state_dict())
    default = AffinityNet(TinyCNN(width=0.5), (8, 8, 16)).eval()
    default.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 30, 22)
    with torch.no_grad():
        out = net(x)
        padded = net(torch.nn.functional.pad(x, (0, 10, 0, 2)))
        assert net.feature_stride == 2 and out.shape == (1, 32, 15, 11)
        torch.testing.assert_close(padded[..., :15, :11], out)
        y = torch.randn(2, 3, 32, 24)
        torch.testing.assert_close(native(y), default(y), rtol=0, atol=0)
        # depths 2 and 3 are at stride 2 already and go in untouched; only depth 4 is upsampled
        kept = net.backbone.forward_features(y, keep=(2, 3, 4))
        up = F.interpolate(kept[4], size=(16, 12), mode="bilinear", align_corners=False)
        torch.testing.assert_close(net(y), net._embed([kept[2], kept[3], up]))
    with pytest.raises(CaeeError, match="embed_stride"):
        AffinityNet(TinyCNN(width=0.5), embed_stride=-1)


def test_embed_stride_is_recorded_in_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    src = AffinityNet(TinyCNN(width=0.5), (8, 8, 16), embed_stride=2).eval()
    path = tmp_path / "model.pth"
    torch.save({"model": src.state_dict(), "arch": "affinitynet", "head_channels": [8, 8, 16], "embed_stride": 2,
                "net": dataclasses.asdict(NetConfig(backbone="tinycnn", width=0.5))}, path)
    model, _ = load_affinitynet(path, NetConfig())
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        assert model.feature_stride == 2
        torch.testing.assert_close(model.eval()(x), src(x), rtol=0, atol=0)


# ---------------------------------------------------------------- labels


def _blocks(values, cell=8) -> np.ndarray:
    """A label map made of ``cell x cell`` blocks with the given values."""
    return np.kron(np.asarray(values, np.uint8), np.ones((cell, cell), np.uint8))


def _tiny_root(tmp_path, n=4, size=(96, 96), seed=0):
    """A VOC-layout root: n images, masks (for the image-level labels), a train list."""
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    ids = [f"img{i}" for i in range(n)]
    h, w = size
    for i, image_id in enumerate(ids):
        image = np.full((h, w, 3), 60, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        cls = 1 + (i % 3) * 5  # VOC classes 1, 6, 11
        y0, x0 = 16 + (i % 2) * 8, 20
        image[y0:y0 + 24, x0:x0 + 40] = (200, 80 + 20 * i, 40)   # two-tone object: the CRF keeps
        image[y0 + 24:y0 + 48, x0:x0 + 40] = (40, 80 + 20 * i, 200)  # its halves apart
        mask[y0:y0 + 48, x0:x0 + 40] = cls
        image = np.clip(image.astype(int) + rng.integers(-5, 6, image.shape), 0, 255).astype(np.uint8)
        from PIL import Image
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.png")
        save_label_png(root / "SegmentationClassAug" / f"{image_id}.png", mask)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return root, ids


def _write_cams(cam_dir, root, ids):
    """CAMs: 1 on the object's top part, 0.2 on its bottom part (la: bg there, ha: fg -> unsure)."""
    for image_id in ids:
        mask = load_label_png(root / "SegmentationClassAug" / f"{image_id}.png")
        cls = int(mask.max())
        ys, xs = np.nonzero(mask)
        cam = np.zeros(mask.shape, np.float32)
        mid = (ys.min() + ys.max()) // 2
        cam[ys.min():mid, xs.min():xs.max() + 1] = 1.0
        cam[mid:ys.max() + 1, xs.min():xs.max() + 1] = 0.2
        save_cam_npz(cam_dir / f"{image_id}.npz", np.array([cls - 1]), cam[None])


def test_confident_labels_through_the_dataset(tmp_path):
    root, ids = _tiny_root(tmp_path, n=1, size=(16, 24))
    index = load_split(DataConfig(dataset="voc", root=str(root)), "train")
    la = _blocks([[0, 3, 3], [255, 3, 0]])
    ha = _blocks([[0, 0, 3], [3, 3, 255]])
    save_label_png(tmp_path / "la" / f"{ids[0]}.png", la)
    save_label_png(tmp_path / "ha" / f"{ids[0]}.png", ha)
    ds = AffinityLabelDataset(index, tmp_path / "la", tmp_path / "ha")
    item = ds[0]
    # la bg -> 255 (unsure), then ha bg -> 0, then any 255 -> 255; fg only where la fg and ha not bg
    expected = np.array([[0, 0, 3], [255, 3, 255]], np.uint8)
    assert item["aff_label"].dtype == torch.uint8
    np.testing.assert_array_equal(item["aff_label"].numpy(), expected)
    assert item["image"].shape == (3, 16, 24)

    # with the training crop: padding counts as "no score" (255) and the grid is crop/8
    tc = TrainConfig(crop_size=32, resize_long=[0, 0], hflip=False, color_jitter=[0, 0, 0, 0])
    torch.manual_seed(0)
    cropped = AffinityLabelDataset(index, tmp_path / "la", tmp_path / "ha", build_train_transform(tc))[0]
    lab = cropped["aff_label"].numpy()
    assert lab.shape == (4, 4)
    assert set(np.unique(lab)) <= {0, 3, 255}
    assert (lab == 255).sum() >= 16 - 6  # at most the 6 cells of the 16x24 image carry a label


def test_missing_crf_labels_are_computed_and_cached(tmp_path):
    pytest.importorskip("pydensecrf")
    root, ids = _tiny_root(tmp_path, n=3)
    index = load_split(DataConfig(dataset="voc", root=str(root)), "train")
    cam_dir = tmp_path / "work" / "cam_cgnet"
    _write_cams(cam_dir, root, ids)
    # one la file already exists, and the folder's record (as make_cam writes them): kept, not recomputed
    marker = np.full((96, 96), 6, np.uint8)
    save_label_png(crf_dir(cam_dir, 4) / f"{ids[1]}.png", marker)
    with pytest.raises(CaeeError, match="cam_cgnet_crf_4 holds outputs without a record.*train_affinity.overwrite=true"):
        ensure_crf_labels(index, cam_dir, {a: crf_dir(cam_dir, a) for a in (4, 24)}, CrfConfig(workers=2))
    assert not crf_dir(cam_dir, 24).exists()   # refused before anything was written
    records.write(crf_dir(cam_dir, 4), {**records.new("make_cam", label_folder_settings(None, 4, CrfConfig())),
                                       "complete": ["train"]})
    dirs = ensure_crf_labels(index, cam_dir, {a: crf_dir(cam_dir, a) for a in (4, 24)}, CrfConfig(workers=2))
    assert dirs == {4.0: tmp_path / "work" / "cam_cgnet_crf_4", 24.0: tmp_path / "work" / "cam_cgnet_crf_24"}
    np.testing.assert_array_equal(load_label_png(dirs[4.0] / f"{ids[1]}.png"), marker)
    from caee.core.io import load_cam_npz, load_image
    for i, image_id in enumerate(ids):
        keys, cams = load_cam_npz(cam_dir / f"{image_id}.npz")
        image = load_image(index.image_path(i))
        for alpha in (4.0, 24.0):
            if (alpha, i) == (4.0, 1):
                continue
            expected = crf_cam_labels(image, keys, cams, alpha, CrfConfig())
            np.testing.assert_array_equal(load_label_png(dirs[alpha] / f"{image_id}.png"), expected)
    # the 0.2 part: la (alpha 4, bg 0.41 > 0.2) says background, ha (alpha 24) says the class
    la = load_label_png(dirs[4.0] / f"{ids[0]}.png")
    ha = load_label_png(dirs[24.0] / f"{ids[0]}.png")
    assert la[20, 40] == 1 and ha[20, 40] == 1       # CAM 1: foreground in both
    assert la[58, 40] == 0 and ha[58, 40] == 1       # CAM 0.2: unsure after merging
    assert la[5, 5] == 0 and ha[5, 5] == 0           # CAM 0: background in both
    # other CRF settings: refused; with overwrite every label is recomputed and the record replaced
    with pytest.raises(CaeeError, match=r"cam_cgnet_crf_4 was made with other settings \(crf.bilateral_srgb: 13 -> 5"):
        ensure_crf_labels(index, cam_dir, dirs, CrfConfig(bilateral_srgb=5))
    ensure_crf_labels(index, cam_dir, dirs, CrfConfig(bilateral_srgb=5, workers=1), overwrite=True)
    assert not np.array_equal(load_label_png(dirs[4.0] / f"{ids[1]}.png"), marker)
    assert records.read(dirs[24.0])["settings"] == label_folder_settings(None, 24, CrfConfig(bilateral_srgb=5))
    # overwrite (train_affinity.overwrite for any AffinityNet change) keeps labels whose record holds
    kept = {p: p.stat().st_mtime_ns for d in dirs.values() for p in d.glob("*.png")}
    ensure_crf_labels(index, cam_dir, dirs, CrfConfig(bilateral_srgb=5, workers=1), overwrite=True)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


def test_missing_cams_are_reported(tmp_path):
    root, ids = _tiny_root(tmp_path, n=2)
    index = load_split(DataConfig(dataset="voc", root=str(root)), "train")
    (tmp_path / "cams").mkdir()
    with pytest.raises(CaeeError, match="2 CAM files needed .* missing"):
        ensure_crf_labels(index, tmp_path / "cams", {a: crf_dir(tmp_path / "cams", a) for a in (4, 24)},
                          CrfConfig(workers=1))


# ---------------------------------------------------------------- training


def _brute_counts(labels: np.ndarray, radius: int = 5) -> tuple[int, int, int]:
    """Pair counts of PSA's pair set by plain loops (independent of caee.method.affinity)."""
    b, h, w = labels.shape
    offsets = [(0, dx) for dx in range(1, radius)] + [(dy, dx) for dy in range(1, radius)
                                                     for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius ** 2]
    n_bg = n_fg = n_neg = 0
    for lab in labels:
        for y in range(0, h - radius + 1):
            for x in range(radius - 1, w - radius + 1):
                for dy, dx in offsets:
                    a, c = int(lab[y, x]), int(lab[y + dy, x + dx])
                    if a == 255 or c == 255:
                        continue
                    if a == c:
                        n_bg += a == 0
                        n_fg += a > 0
                    else:
                        n_neg += 1
    return n_bg, n_fg, n_neg


def test_train_step_counts_pairs_and_overfits_a_batch():
    torch.manual_seed(0)
    model = AffinityNet(ResNet38(width=WIDTH))
    model.backbone.freeze()
    task = AffinityTask(model, AffinityTrainConfig(radius=5, psa_border=True), ["a", "b", "c"])
    labels = np.zeros((2, 12, 12), np.uint8)
    labels[0, :, 6:] = 2
    labels[0, 10:] = 255
    labels[1, 3:9, 3:9] = 1
    labels[1, :, :2] = 255
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 3, 96, 96, generator=g), "aff_label": torch.from_numpy(labels)}
    ctx = StepContext(torch.device("cpu"), 0, 0, 10, 0, False)
    n_bg, n_fg, n_neg = _brute_counts(labels)
    assert min(n_bg, n_fg, n_neg) > 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02)
    model.train()
    losses = []
    for _ in range(5):
        loss, metrics = task.train_step(model, batch, ctx)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (metrics["n_bg"], metrics["n_fg"], metrics["n_neg"]) == (n_bg, n_fg, n_neg)
    assert metrics["n_pairs"] == 2 * 34 * 8 * 4  # rows 0..7, columns 4..7, 34 offsets
    assert float(loss.detach()) == pytest.approx(metrics["loss_bg"] / 4 + metrics["loss_fg"] / 4 + metrics["loss_neg"] / 2, rel=1e-5)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert len(task.pairs._cache) == 1  # one feature size -> pairs computed once


def _stage_config(tmp_path, **train_affinity) -> tuple:
    """A 4-image VOC-layout root with CGNet CAMs and a config for the train_affinity stage."""
    pytest.importorskip("pydensecrf")
    root, ids = _tiny_root(tmp_path, n=4)
    work = tmp_path / "work"
    _write_cams(work / "cam_cgnet", root, ids)
    cfg = config_from_dict({
        "work_dir": str(work), "device": "cpu",
        "data": {"dataset": "voc", "root": str(root), "num_workers": 0},
        "crf": {"workers": 1},
        "train_affinity": {"batch_size": 2, "resize_long": [0, 0], "lr": 0.01, "amp": False, "log_every": 1,
                           **train_affinity},
    })
    return cfg, work, ids


def test_train_affinity_stage_end_to_end(tmp_path):
    cfg, work, ids = _stage_config(tmp_path, net={"backbone": "resnet38", "width": WIDTH}, epochs=2, max_steps=3,
                                   crop_size=96)
    result = train_affinity.main(cfg)
    assert result.steps == 3
    assert sorted(p.stem for p in (work / "cam_cgnet_cells_4_24_s8").glob("*.png")) == ids  # label_rule psa
    records = [json.loads(line) for line in (work / "train_affinity" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss", "loss_bg", "loss_fg", "loss_neg"))
        assert r["n_pairs"] == 2 * 34 * 8 * 4  # 96 crops -> 12x12 grid
        assert r["n_bg"] > 0 and r["n_bg"] + r["n_fg"] + r["n_neg"] <= r["n_pairs"]
    model, meta = load_affinitynet(result.model_path, NetConfig())
    assert meta["arch"] == "affinitynet" and meta["net"]["width"] == WIDTH and meta["radius"] == 5
    # and our model.pth also initialises a new AffinityNet (train_affinity.init)
    net = AffinityNet(ResNet38(width=WIDTH))
    load_model_weights(net, result.model_path, arch="affinitynet")


def test_train_affinity_stage_at_a_finer_embed_stride(tmp_path):
    """train_affinity.embed_stride=2 on TinyCNN (stride 4): labels and pairs on the 2x finer grid,
    and the checkpoint rebuilds the same network for make_pseudo_labels."""
    cfg, work, _ = _stage_config(tmp_path, net={"backbone": "tinycnn", "width": 0.25}, head_channels=[4, 4, 8],
                                 embed_stride=2, epochs=1, max_steps=2, crop_size=32)
    result = train_affinity.main(cfg)
    records = [json.loads(line) for line in (work / "train_affinity" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["n_pairs"] == 2 * 34 * 12 * 8  # 32 crops -> 16x16 grid: rows 0..11, columns 4..11
    model, meta = load_affinitynet(result.model_path, NetConfig())
    assert meta["embed_stride"] == 2 and model.feature_stride == 2
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 40, 36)).shape == (1, 16, 20, 18)


def test_train_affinity_stage_keeps_the_top_left_rule_and_refuses_psa_with_rescale(tmp_path):
    cfg, work, ids = _stage_config(tmp_path, net={"backbone": "tinycnn", "width": 0.25}, head_channels=[4, 4, 8],
                                   epochs=1, max_steps=1, crop_size=48, label_rule="top_left", resize_long=[96, 112])
    train_affinity.main(cfg)
    for alpha in (4, 24):  # the argmax label PNGs, no cell tables
        assert sorted(p.stem for p in crf_dir(work / "cam_cgnet", alpha).glob("*.png")) == ids
    assert not list(work.glob("cam_cgnet_cells_*"))
    cfg.train_affinity.label_rule = "psa"
    cfg.train_affinity.overwrite = True  # past the settings check (another label rule is another run)
    with pytest.raises(CaeeError, match=r"label_rule=psa crops without rescaling.*resize_long=\[0,0\]"):
        train_affinity.main(cfg)
