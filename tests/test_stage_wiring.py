"""Config values reach the method: each stage's output is compared with a computation written out
here from the config, with non-default, pairwise distinct settings, so that a stage that drops,
swaps or ignores a setting fails (the loss weight w, the mask normalisation and depth,
the random-walk settings, every CRF setting, the sharding of inference)."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from caee.core import distributed
from caee.core.config import NetConfig, config_from_dict
from caee.engine.trainer import StepContext
from caee.core.io import load_label_png, save_cam_npz, save_label_png
from caee.models import build_backbone
from caee.models.affinitynet import AffinityNet
from caee.models.classifier import CamClassifier
from caee.stages import make_pseudo_labels as mpl
from caee.stages import train_cgnet, train_classifier
from conftest import mini_config, save_random_cgnet

# ---------------------------------------------------------------- CGNet loss: L = L_cls + w * L_cse


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-label soft-margin loss written out: mean over classes and images of the logistic loss."""
    p = torch.sigmoid(logits.double())
    t = target.double()
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


def _hand_mask(maps: torch.Tensor, targets: list[int], size, per_image: bool) -> torch.Tensor:
    """Upsample the target map (bilinear), ReLU, divide by the batch or per-image maximum + 1e-5."""
    out = []
    for i, k in enumerate(targets):
        up = F.interpolate(maps[i:i + 1, k:k + 1].double(), size=size, mode="bilinear", align_corners=False)
        out.append(up.clamp(min=0))
    out = torch.cat(out)
    peak = out.amax(dim=(1, 2, 3), keepdim=True) if per_image else out.amax()
    return out / (peak + 1e-5)


def _cgnet_pair(seed: int = 0):
    cfg = mini_config(Path("/nonexistent"))
    torch.manual_seed(seed)
    oc = train_cgnet.freeze_module(CamClassifier(build_backbone(cfg.train_classifier.net), 3))
    cgnet = CamClassifier(build_backbone(cfg.train_cgnet.net), 3, 0.0)
    with torch.no_grad():  # distinct peaks per image so that batch and per-image normalisation differ
        cgnet.fc8.weight.mul_(torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1, 1))
    return cfg, oc, cgnet


@pytest.mark.parametrize("normalization,depth", [("per_image", 0), ("batch", 2), ("per_image", 3)])
def test_cgnet_loss_is_cls_plus_w_times_cse_with_the_configured_mask(normalization, depth):
    cfg, oc, cgnet = _cgnet_pair()
    cfg.masking.normalization, cfg.masking.depth = normalization, depth
    cfg.masking.cse_init, cfg.masking.cse_slope = 0.7, 0.2
    task = train_cgnet.CGNetTask(cgnet, oc, cfg, ["a", "b", "c"])
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=g)
    labels = torch.tensor([[0., 1, 0], [1, 0, 0]])     # one class each: the drawn targets are known
    ctx = StepContext(torch.device("cpu"), epoch=3, step=0, total_steps=10, seed=0, channels_last=False)
    cgnet.eval()  # BN statistics fixed so the hand forward below sees the same maps
    loss, metrics = task.train_step(cgnet, {"image": images, "label": labels}, ctx)

    w = 0.7 + 0.2 * 3
    with torch.no_grad():
        logits, maps = cgnet(images)
        loss_cls = _bce(logits, labels)
        mask = _hand_mask(maps, [1, 0], (32, 32), normalization == "per_image")
        keep = (1 - mask).float()

        def edit(d, feat):
            if d != depth:
                return feat
            k = keep if feat.shape[-2:] == keep.shape[-2:] else F.adaptive_avg_pool2d(keep, feat.shape[-2:])
            return feat * k

        oc_logits, _ = oc(images, edit=edit)
        loss_cse = _bce(oc_logits, torch.zeros(2, 3))   # the only class of each image is erased
    assert metrics["w"] == pytest.approx(w)
    assert metrics["loss_cls"] == pytest.approx(float(loss_cls), rel=1e-5)
    assert metrics["loss_cse"] == pytest.approx(float(loss_cse), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(loss_cls + w * loss_cse), rel=1e-5)
    # the two normalisations give different masks here, so the check above tells them apart
    other = _hand_mask(maps, [1, 0], (32, 32), normalization != "per_image")
    assert (other - mask).abs().max() > 0.1


def test_cgnet_stage_logs_the_weighted_loss_of_the_configured_schedule(tmp_path):
    """w = cse_init + cse_slope * epoch and the poly learning rate lr * (1 - step / total)^power with
    non-default values: 16 images in batches of 8 = 2 steps per epoch, 2 epochs = 4 steps."""
    cfg = mini_config(tmp_path, **{"train_classifier.max_steps": 1, "train_cgnet.epochs": 2,
                                   "masking.cse_init": 0.9, "masking.cse_slope": 0.4,
                                   "train_cgnet.schedule": "poly", "train_cgnet.poly_power": 2.0,
                                   "train_cgnet.lr": 0.02})
    train_classifier.main(cfg)
    train_cgnet.main(cfg)
    recs = [json.loads(l) for l in (Path(cfg.work_dir) / "train_cgnet" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 5)) and {r["epoch"] for r in recs} == {0, 1}
    for r in recs:
        w = 0.9 + 0.4 * r["epoch"]
        assert r["w"] == pytest.approx(w)
        assert r["loss"] == pytest.approx(r["loss_cls"] + w * r["loss_cse"], rel=1e-5)
        assert r["lr"] == pytest.approx(0.02 * (1 - (r["step"] - 1) / 4) ** 2.0, rel=1e-9)


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("n", [0, 1, 5, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_is_disjoint_complete_and_balanced(n, world):
    items = [f"id{i}" for i in range(n)]
    shares = [distributed.shard(items, r, world) for r in range(world)]
    flat = [x for s in shares for x in s]
    assert sorted(flat) == sorted(items) and len(flat) == n       # complete, nothing twice
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1                          # balanced
    for s in shares:                                             # each share keeps the input order
        assert s == sorted(s, key=items.index)


def test_shard_without_a_group_is_everything():
    assert distributed.shard([3, 1, 2]) == [3, 1, 2]


# ---------------------------------------------------------------- random walk settings reach the walk

WALK = {"alpha": 3.5, "beta": 3.0, "steps": 7, "radius": 3}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = {"p": (28, 36), "q": (30, 26), "r": (21, 33)}
KEYS = {"p": [2, 5], "q": [0], "r": [1, 3, 6]}


def _walk_setup(tmp_path):
    """Three images of coloured noise blocks with smooth random CAMs, and a TinyCNN AffinityNet with
    random weights (f9 untouched): the affinities vary, so beta, radius and steps all matter."""
    rng = np.random.default_rng(7)
    root, work = tmp_path / "voc", tmp_path / "work"
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for image_id, (h, w) in SIZES.items():
        blocks = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3), dtype=np.uint8)
        image = np.kron(blocks, np.ones((6, 6, 1), np.uint8))[:h, :w]
        image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.png")
        save_label_png(root / "SegmentationClassAug" / f"{image_id}.png", np.zeros((h, w), np.uint8))
        k = len(KEYS[image_id])
        coarse = torch.from_numpy(rng.random((1, k, 4, 4))).float()
        cams = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0] ** 2
        save_cam_npz(work / "cams" / f"{image_id}.npz", np.array(KEYS[image_id], np.int64),
                     cams.numpy().astype(np.float16))
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"{i}\n" for i in SIZES))
    net_cfg = NetConfig(backbone="tinycnn", width=0.5, pretrained="")
    torch.manual_seed(0)
    net = AffinityNet(build_backbone(net_cfg))
    weights = work / "aff.pth"
    torch.save({"model": net.state_dict(), "arch": "affinitynet", "net": dataclasses.asdict(net_cfg),
                "radius": WALK["radius"]}, weights)
    cfg = {"work_dir": str(work), "device": "cpu", "data": {"dataset": "voc", "root": str(root)},
           "pseudo_labels": {"cam_dir": str(work / "cams"), "weights": str(weights), **WALK}}
    return cfg, net.eval(), root, work


def _hand_embed(net, image: np.ndarray) -> torch.Tensor:
    """AffinityNet embeddings of the normalised image, zero-padded to the stride: (D, h, w) float64."""
    h_img, w_img = image.shape[:2]
    x = (torch.from_numpy(image.copy()).double() / 255 - torch.tensor(MEAN).double()) / torch.tensor(STD).double()
    x = x.permute(2, 0, 1).float()
    s = net.feature_stride
    x = F.pad(x, (0, -w_img % s, 0, -h_img % s))
    with torch.no_grad():
        return net(x[None])[0].double()


def _hand_walk_scores(f: torch.Tensor, s: int, image: np.ndarray, cams: np.ndarray, alpha, beta, steps, radius
                      ) -> np.ndarray:
    """PSA's walk written out densely in float64 on the embeddings ``f`` (stride ``s``):
    A_ij = exp(-mean_c |f_i - f_j|) for every pair closer than ``radius`` (both directions, self 1);
    T = A^beta / column sums; scores = [(1 - max CAM)^alpha, CAMs] padded and average-pooled to the
    grid, times T^steps; bilinear upsampling, cropped. Returns (K+1, H, W)."""
    h_img, w_img = image.shape[:2]
    d, h, w = f.shape
    flat = f.reshape(d, -1)
    ys, xs = np.divmod(np.arange(h * w), w)
    near = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2 < radius ** 2
    a = torch.exp(-(flat[:, :, None] - flat[:, None, :]).abs().mean(0)) * torch.from_numpy(near)
    a = a ** beta
    t = a / a.sum(0, keepdim=True)
    c = torch.from_numpy(cams).double()
    score = torch.cat([(1 - c.max(0, keepdim=True).values.clamp(0, 1)) ** alpha, c])
    score = F.avg_pool2d(F.pad(score, (0, w * s - w_img, 0, h * s - h_img))[None], s)[0]
    walked = score.reshape(len(score), -1) @ torch.linalg.matrix_power(t, steps)
    up = F.interpolate(walked.reshape(1, -1, h, w), size=(h * s, w * s), mode="bilinear", align_corners=False)
    return up[0, :, :h_img, :w_img].numpy()


def _load(root, work, image_id):
    from caee.core.io import load_cam_npz
    image = np.array(Image.open(root / "JPEGImages" / f"{image_id}.png").convert("RGB"))
    keys, cams = load_cam_npz(work / "cams" / f"{image_id}.npz")
    return image, keys, cams.astype(np.float64)


def _hand_labels(scores: np.ndarray, keys) -> tuple[np.ndarray, np.ndarray]:
    """Argmax labels and where the top two scores are clearly apart (float32 vs float64 safe)."""
    lut = np.concatenate([[0], np.asarray(keys) + 1])
    top = np.sort(scores, axis=0)
    return lut[scores.argmax(0)], (top[-1] - top[-2]) > 1e-4 * np.abs(top[-1]).clip(1e-6)


def test_walk_settings_reach_the_walk_on_a_non_degenerate_affinitynet(tmp_path):
    cfg, net, root, work = _walk_setup(tmp_path)
    out = mpl.main(config_from_dict(cfg))
    differs = set()
    for image_id in SIZES:
        image, keys, cams = _load(root, work, image_id)
        f = _hand_embed(net, image)
        expected, clear = _hand_labels(_hand_walk_scores(f, net.feature_stride, image, cams, **WALK), keys)
        got = load_label_png(out / f"{image_id}.png")
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(got[clear], expected[clear])
        # the labels depend on every walk setting here (else the check above could not see it)
        for key, other in (("beta", 8.0), ("alpha", 16.0), ("steps", 4), ("radius", 5)):
            alt, _ = _hand_labels(_hand_walk_scores(f, net.feature_stride, image, cams, **{**WALK, key: other}), keys)
            if (alt != expected).any():
                differs.add(key)
    assert differs == {"beta", "alpha", "steps", "radius"}


def test_changing_beta_changes_the_stage_labels(tmp_path):
    cfg, _, root, work = _walk_setup(tmp_path)
    a = mpl.main(config_from_dict(cfg))
    cfg["pseudo_labels"].update(beta=8.0, out_dir=str(tmp_path / "beta8"))
    b = mpl.main(config_from_dict(cfg))
    changed = sum(int((load_label_png(a / f"{i}.png") != load_label_png(b / f"{i}.png")).sum()) for i in SIZES)
    assert changed > 0


# ---------------------------------------------------------------- every CRF setting reaches pydensecrf

# pairwise distinct and unlike the defaults (10, 3, 3, 80, 13, 10): a dropped or swapped field shows
CRF = {"iterations": 3, "gaussian_sxy": 2, "gaussian_compat": 5, "bilateral_sxy": 70, "bilateral_srgb": 11,
       "bilateral_compat": 7}


class _RecordingCRF:
    """Stand-in for ``pydensecrf.densecrf.DenseCRF2D``: records every call; inference returns the
    unary's own probabilities (softmax of -U), so the callers still get valid posteriors."""
    calls: list = []

    def __init__(self, w, h, n_labels):
        self.rec = {"size": (w, h, n_labels)}
        _RecordingCRF.calls.append(self.rec)

    def setUnaryEnergy(self, u):
        self.rec["unary"] = np.array(u, dtype=np.float64)

    def addPairwiseGaussian(self, **kw):
        self.rec["gaussian"] = kw

    def addPairwiseBilateral(self, **kw):
        self.rec["bilateral"] = {k: v for k, v in kw.items() if k != "rgbim"}
        self.rec["rgbim"] = np.array(kw["rgbim"])

    def inference(self, n):
        self.rec["iterations"] = n
        p = np.exp(-self.rec["unary"])
        return p / p.sum(axis=0, keepdims=True)


@pytest.fixture
def recording_crf(monkeypatch):
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    monkeypatch.setattr(_RecordingCRF, "calls", [])
    monkeypatch.setattr(dcrf, "DenseCRF2D", _RecordingCRF)
    return _RecordingCRF.calls


def _assert_crf_calls(calls, n_expected):
    assert len(calls) == n_expected
    for rec in calls:
        assert rec["gaussian"] == {"sxy": CRF["gaussian_sxy"], "compat": CRF["gaussian_compat"]}
        assert rec["bilateral"] == {"sxy": CRF["bilateral_sxy"], "srgb": CRF["bilateral_srgb"],
                                    "compat": CRF["bilateral_compat"]}
        assert rec["iterations"] == CRF["iterations"]


def test_pseudo_label_crf_gets_every_setting_and_the_walk_scores(tmp_path, recording_crf):
    cfg, net, root, work = _walk_setup(tmp_path)
    cfg["pseudo_labels"]["crf"] = True
    cfg["crf"] = {**CRF, "workers": 1}
    mpl.main(config_from_dict(cfg))
    _assert_crf_calls(recording_crf, len(SIZES))
    for rec, image_id in zip(recording_crf, SIZES):
        image, keys, cams = _load(root, work, image_id)
        h, w = image.shape[:2]
        assert rec["size"] == (w, h, len(keys) + 1)
        np.testing.assert_array_equal(rec["rgbim"], image)
        scores = _hand_walk_scores(_hand_embed(net, image), net.feature_stride, image, cams, **WALK)
        p = np.maximum(scores, 0) / np.maximum(scores, 0).sum(0, keepdims=True)
        unary = -np.log(np.maximum(p, 1e-5) / np.maximum(p, 1e-5).sum(0, keepdims=True))  # crf.min_prob
        np.testing.assert_allclose(rec["unary"], unary.reshape(len(keys) + 1, -1), rtol=1e-3, atol=1e-3)


def test_cam_and_affinity_label_crfs_get_every_setting(stage_setup_crf, recording_crf):
    from caee.stages.label_cache import ensure_crf_labels
    from caee.core.config import load_config
    from caee.core.layout import crf_dir
    from caee.data import load_split
    from caee.stages import make_cam
    overrides, n_images = stage_setup_crf
    cfg = load_config(None, overrides)
    make_cam.main(cfg)
    _assert_crf_calls(recording_crf, 2 * 2)            # 2 images with classes x 2 alphas
    recording_crf.clear()
    cam_dir = Path(cfg.work_dir) / "cam_cgnet"
    ensure_crf_labels(load_split(cfg.data, "train"), cam_dir, {7.0: crf_dir(cam_dir, 7.0)}, cfg.crf, workers=1)
    _assert_crf_calls(recording_crf, 2)


def test_deeplab_test_crf_gets_every_setting(tmp_path, recording_crf):
    from caee.method.crf import crf_labels_from_scores
    from caee.stages.train_deeplab import settings_from_config
    cfg = mini_config(tmp_path, **{"train_deeplab.test_crf": True, **{f"crf.{k}": v for k, v in CRF.items()}})
    settings = settings_from_config(cfg)
    recording_crf.clear()  # the pydensecrf availability check above ran one 1-iteration CRF
    rng = np.random.default_rng(0)
    crf_labels_from_scores(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8), rng.random((3, 6, 7)), settings.crf)
    _assert_crf_calls(recording_crf, 1)


@pytest.fixture
def stage_setup_crf(tmp_path, fake_voc):
    """A random TinyCNN CGNet on fake_voc's train split (3 images, 2 with classes), CRF settings CRF."""
    save_random_cgnet(tmp_path / "work")
    overrides = [f"work_dir={tmp_path / 'work'}", "device=cpu", "data.dataset=voc", f"data.root={fake_voc}",
                 "data.num_workers=0", "cam.scales=[1.0]", "cam.split=train", "cam.crf_alphas=[4, 24]",
                 "cam.pictures=0", "crf.workers=1"] + [f"crf.{k}={v}" for k, v in CRF.items()]
    return overrides, 3


def test_real_crf_run_equals_a_call_written_out_by_hand(tmp_path):
    """The pseudo-label stage with the real pydensecrf against the library calls written out here."""
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    cfg, net, root, work = _walk_setup(tmp_path)
    cfg["pseudo_labels"]["crf"] = True
    cfg["crf"] = {**CRF, "workers": 1}
    out = mpl.main(config_from_dict(cfg))
    changed = 0
    for image_id in SIZES:
        image, keys, cams = _load(root, work, image_id)
        h, w = image.shape[:2]
        scores = _hand_walk_scores(_hand_embed(net, image), net.feature_stride, image, cams, **WALK)
        p = np.maximum(scores, 0) / np.maximum(scores, 0).sum(0, keepdims=True)
        p = np.maximum(p, 1e-8) / np.maximum(p, 1e-8).sum(0, keepdims=True)
        d = dcrf.DenseCRF2D(w, h, len(keys) + 1)
        d.setUnaryEnergy(np.ascontiguousarray(-np.log(p).reshape(len(keys) + 1, -1), dtype=np.float32))
        d.addPairwiseGaussian(sxy=2, compat=5)
        d.addPairwiseBilateral(sxy=70, srgb=11, rgbim=np.ascontiguousarray(image), compat=7)
        q = np.array(d.inference(3)).reshape(len(keys) + 1, h, w)
        lut = np.concatenate([[0], keys + 1])
        np.testing.assert_array_equal(load_label_png(out / f"{image_id}.png"), lut[q.argmax(0)])
        changed += int((q.argmax(0) != p.argmax(0)).sum())
    assert changed > 0   # the CRF moved some labels away from the walk's argmax: the comparison is not idle
