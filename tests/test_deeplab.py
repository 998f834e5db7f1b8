"""DeepLab: heads, loss, label checks, multi-scale + flip inference, overfitting, resume, eval-only."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from caee.core.config import NetConfig, config_from_dict
from caee.data import load_split
from caee.core import records
from caee.core.errors import CaeeError
from caee.core.io import load_label_png, save_label_png
from caee.models import ResNet38
from caee.models.deeplab import ASPP, DeepLab, LargeFOV, build_deeplab, default_head_channels
from caee.method.segment import predict
from caee.stages import train_deeplab
from caee.stages.train_deeplab import check_label_dir, segmentation_loss

NUM_CLASSES = 2
SIZE = 32


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors here are tiny: extra intra-op threads only add contention on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- a tiny custom dataset drawn here


def _draw(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Grey noisy background, a red square (class 1) and a blue disc (class 2); (image, label)."""
    image = np.clip(rng.normal(120, 12, (size, size, 3)), 0, 255)
    label = np.zeros((size, size), np.uint8)
    x0, y0 = rng.integers(1, size // 2 - 4, 2)
    image[y0:y0 + 12, x0:x0 + 12] = (220, 30, 30)
    label[y0:y0 + 12, x0:x0 + 12] = 1
    cy, cx = rng.integers(size // 2 + 2, size - 8, 2)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
    image[disc] = (30, 40, 220)
    label[disc] = 2
    return image.astype(np.uint8), label


def make_dataset(root: Path, n: int = 4, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = [f"img{i}" for i in range(n)]
    rows = ["image_id,square,disc"]
    for image_id in ids:
        image, label = _draw(rng)
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.png")
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", label)
        present = [int((label == k).any()) for k in (1, 2)]
        rows.append(f"{image_id},{present[0]},{present[1]}")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return ids


def make_config(tmp_path: Path, work: str = "work", **deeplab):
    root = tmp_path / "data"
    if not root.exists():
        make_dataset(root)
    td = {"net": {"backbone": "tinycnn", "width": 0.5}, "head": "largefov", "head_dilations": [2],
          "label_dir": str(root / "SegmentationClass"), "split": "train",
          "head_dropout": 0.0, "batch_size": 4, "epochs": 60, "optimizer": "adam", "schedule": "onecycle", "lr": 0.02,
          "head_lr_mult": 1.0, "bias_lr_mult": 1.0, "weight_decay": 0.0,
          "crop_size": 0, "resize_long": [0, 0], "hflip": True, "amp": False, "log_every": 10,
          "checkpoint_every": 1000}
    td.update(deeplab)
    return config_from_dict({
        "work_dir": str(tmp_path / work), "device": "cpu",
        "data": {"dataset": "custom", "root": str(root), "labels_csv": "labels.csv", "mask_dir": "SegmentationClass",
                 "eval_mask_dir": "SegmentationClass", "train_split": "train", "cam_split": "train",
                 "val_split": "train", "num_workers": 0},
        "eval": {"workers": 1}, "crf": {"workers": 1},
        "train_deeplab": td,
    })


# ---------------------------------------------------------------- model


def test_heads_shapes_stride_and_head_modules():
    torch.manual_seed(0)
    backbone = ResNet38(width=0.0625).eval()
    for head, dil in (("largefov", None), ("aspp", None)):
        net = DeepLab(backbone, 21, head, head_channels=64, dilations=dil).eval()
        with torch.no_grad():
            out = net(torch.randn(2, 3, 64, 48))
        assert out.shape == (2, 21, 8, 6)  # output stride 8, not upsampled
        assert net.output_stride == 8
        assert net.head_modules() == [net.head]
    assert isinstance(DeepLab(backbone, 21, "largefov", 64).head, LargeFOV)
    assert [b.dilation for b in DeepLab(backbone, 21, "aspp").head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert DeepLab(backbone, 21, "largefov", 64).head.fc6.dilation == (12, 12)
    with pytest.raises(CaeeError, match="head"):
        DeepLab(backbone, 21, "psp")


def test_default_head_channels_and_builder():
    assert default_head_channels("resnet38", 1.0, 4096) == 1024
    assert default_head_channels("resnet38", 0.0625, 256) == 64
    assert default_head_channels("vgg16", 1.0, 512) == 1024
    assert default_head_channels("tinycnn", 1.0, 64) == 256
    net = build_deeplab(NetConfig(backbone="tinycnn", width=0.5), 3, "largefov", 0, [2])
    assert net.head.fc6.out_channels == 128 and net.head.fc6.in_channels == 32
    assert net.output_stride == 4
    assert net.head.fc8.out_channels == 3


def test_aspp_is_the_sum_of_its_branches():
    torch.manual_seed(0)
    aspp = ASPP(8, 5, (1, 2, 3)).eval()
    x = torch.randn(1, 8, 10, 10)
    ref = sum(F.conv2d(x, b.weight, b.bias, padding=d, dilation=d) for b, d in zip(aspp.branches, (1, 2, 3)))
    torch.testing.assert_close(aspp(x), ref)


def test_largefov_matches_its_definition():
    torch.manual_seed(0)
    head = LargeFOV(4, 3, mid_ch=6, dilation=3).eval()
    x = torch.randn(1, 4, 9, 9)
    h = F.relu(F.conv2d(x, head.fc6.weight, head.fc6.bias, padding=3, dilation=3))
    h = F.relu(F.conv2d(h, head.fc7.weight, head.fc7.bias))
    torch.testing.assert_close(head(x), F.conv2d(h, head.fc8.weight, head.fc8.bias))


# ---------------------------------------------------------------- loss


def test_segmentation_loss_ignores_255_and_survives_an_empty_batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :4] = 255
    loss, _ = segmentation_loss(logits, target)
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    valid = target != 255
    logp = torch.log_softmax(up, 1).permute(0, 2, 3, 1)[valid]
    ref = -logp.gather(1, target[valid][:, None]).mean()
    torch.testing.assert_close(loss, ref)
    empty, acc = segmentation_loss(logits, torch.full((2, 8, 8), 255))
    assert empty.item() == 0.0 and np.isnan(acc)
    empty.backward()  # still differentiable


# ---------------------------------------------------------------- label check


@pytest.fixture
def labelled(tmp_path):
    cfg = make_config(tmp_path)
    index = load_split(cfg.data, "train")
    label_dir = tmp_path / "labels"
    for i in index.ids:
        save_label_png(label_dir / f"{i}.png", load_label_png(tmp_path / "data" / "SegmentationClass" / f"{i}.png"))
    return index, label_dir


def test_label_check_counts_pixels_per_class(labelled):
    index, label_dir = labelled
    lab = load_label_png(label_dir / "img1.png")
    lab[:2, :3] = 255
    save_label_png(label_dir / "img1.png", lab)
    expected = np.zeros(NUM_CLASSES + 2, np.int64)
    for i in index.ids:
        counts = np.bincount(load_label_png(label_dir / f"{i}.png").ravel(), minlength=256)
        expected += np.concatenate([counts[:NUM_CLASSES + 1], counts[255:]])
    hist = check_label_dir(index, label_dir, workers=2)
    np.testing.assert_array_equal(hist, expected)
    assert hist[-1] == 6 and hist.sum() == 4 * SIZE * SIZE


def test_label_check_catches_a_wrong_value(labelled):
    index, label_dir = labelled
    lab = load_label_png(label_dir / "img2.png")
    lab[5, 5] = 7  # C = 2
    save_label_png(label_dir / "img2.png", lab)
    with pytest.raises(CaeeError, match=r"img2\.png: values \[7\]"):
        check_label_dir(index, label_dir, workers=2)


def test_label_check_catches_a_missing_file(labelled):
    index, label_dir = labelled
    (label_dir / "img3.png").unlink()
    with pytest.raises(CaeeError, match=r"img3\.png: missing") as e:
        check_label_dir(index, label_dir, workers=1)
    assert "1 of 4 label maps" in str(e.value)


def test_label_check_catches_a_size_mismatch(labelled):
    index, label_dir = labelled
    save_label_png(label_dir / "img0.png", np.zeros((SIZE, SIZE + 1), np.uint8))
    with pytest.raises(CaeeError, match=r"img0\.png: size 33x32 differs from its image .*img0\.png \(32x32\)"):
        check_label_dir(index, label_dir, workers=2)


def test_stage_refuses_bad_labels_before_training(labelled, tmp_path):
    index, label_dir = labelled
    (label_dir / "img1.png").unlink()
    cfg = make_config(tmp_path, label_dir=str(label_dir))
    with pytest.raises(CaeeError, match="img1.png: missing"):
        train_deeplab.main(cfg)
    assert not (tmp_path / "work" / "train_deeplab" / "last.pth").exists()


def test_default_inputs_follow_the_pseudo_label_stage():
    cfg = config_from_dict({"work_dir": "/w", "data": {"cam_split": "train_aug"}})
    assert train_deeplab.resolve_inputs(cfg) == ("train_aug", Path("/w/pseudo_labels"))
    cfg = config_from_dict({"work_dir": "/w", "pseudo_labels": {"out_dir": "/pl", "split": "s.txt"}})
    assert train_deeplab.resolve_inputs(cfg) == ("s.txt", Path("/pl"))
    cfg = config_from_dict({"work_dir": "/w", "pseudo_labels": {"out_dir": "/pl"},
                            "train_deeplab": {"label_dir": "/gt", "split": "train"}})
    assert train_deeplab.resolve_inputs(cfg) == ("train", Path("/gt"))


# ---------------------------------------------------------------- inference


class _Hand(nn.Module):
    """A fixed, position- and orientation-sensitive net: 3x3 conv (asymmetric weights) + 2x2 average pool."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 3, 3, 3, generator=g))
            self.conv.bias.copy_(torch.randn(4, generator=g))

    def forward(self, x):
        return F.avg_pool2d(self.conv(x), 2)


def test_multiscale_flip_prediction_matches_a_direct_computation():
    torch.manual_seed(0)
    model = _Hand().eval()
    image = torch.randn(3, 20, 26)
    scales = [0.5, 1.0, 1.5]
    probs = predict(model, image, scales, flip=True)
    # direct: 6 separate passes, mirrored in numpy, probabilities averaged
    ref = np.zeros((4, 20, 26))
    for s in scales:
        size = (round(20 * s), round(26 * s))
        for mirror in (False, True):
            x = image[None] if s == 1.0 else F.interpolate(image[None], size=size, mode="bilinear",
                                                           align_corners=False)
            if mirror:
                x = torch.from_numpy(x.numpy()[..., ::-1].copy())
            with torch.no_grad():
                out = F.interpolate(model(x), size=(20, 26), mode="bilinear", align_corners=False)[0].numpy()
            if mirror:
                out = out[..., ::-1]
            e = np.exp(out - out.max(0))
            ref += e / e.sum(0)
    ref /= 6
    assert probs.shape == (4, 20, 26)
    np.testing.assert_allclose(probs.numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(0).numpy(), 1.0, atol=1e-5)
    # without flip only the three unmirrored passes count, so the result differs
    assert not torch.allclose(predict(model, image, scales, flip=False), probs, atol=1e-3)


def test_single_scale_prediction_of_a_constant_net_is_its_softmax():
    bias = torch.tensor([0.5, -1.0, 2.0])
    model = lambda x: bias.view(1, 3, 1, 1).expand(x.shape[0], 3, x.shape[-2] // 8, x.shape[-1] // 8)  # noqa: E731
    probs = predict(model, torch.zeros(3, 16, 24), [1.0, 2.0], flip=True)
    np.testing.assert_allclose(probs.numpy(), torch.softmax(bias, 0)[:, None, None].expand(3, 16, 24).numpy(),
                               rtol=1e-6)


# ---------------------------------------------------------------- the stage end to end


def test_tiny_deeplab_overfits_then_eval_only_with_flip_and_crf(tmp_path):
    cfg = make_config(tmp_path)
    res = train_deeplab.main(cfg)
    out = tmp_path / "work" / "train_deeplab"
    assert res["without_crf"]["miou"] > 0.8, res
    assert res["without_crf"]["num_evaluated"] == 4 and res["split"] == "train"
    assert set(res["without_crf"]["iou"]) == {"background", "square", "disc"}
    assert res["init"] == "random" and "SegmentationClass" in res["label_source"]
    assert res["crf"] is False and res["flip"] is False and res["multi_scale"] is False
    saved = json.loads((out / "results_train.json").read_text())
    assert saved["miou"] == pytest.approx(res["miou"])
    pred = Image.open(out / "pred_train" / "img0.png")
    assert pred.mode == "P" and pred.size == (SIZE, SIZE)
    assert saved["init"] == "random" and records.read(out)["complete"] == ["all"]
    squares = sum(int((load_label_png(tmp_path / "data" / "SegmentationClass" / f"img{i}.png") == 1).sum())
                  for i in range(4))
    assert json.loads((out / "label_histogram.json").read_text())["pixels"]["square"] == squares
    assert (out / "model.pth").is_file() and (out / "config.yaml").is_file()

    pytest.importorskip("pydensecrf")
    cfg2 = make_config(tmp_path, eval_only=True, test_scales=[1.0, 1.5], test_flip=True, test_crf=True)
    res2 = train_deeplab.main(cfg2)
    assert res2["eval_only"] and res2["flip"] and res2["multi_scale"] and res2["crf"]
    assert res2["init"] == "random" and res2["label_source"] == res["label_source"]
    assert res2["without_crf"]["miou"] > 0.8 and res2["with_crf"]["miou"] > 0.7
    assert res2["miou"] == res2["with_crf"]["miou"]
    assert sorted(p.name for p in (out / "pred_train_crf").glob("*.png")) == [f"img{i}.png" for i in range(4)]
    done = json.loads((out / "results_train.json").read_text())
    assert done["crf"] is True and done["flip"] is True and done["num_images"] == 4


def _weights(work: Path) -> dict:
    return torch.load(work / "train_deeplab" / "model.pth", weights_only=True)["model"]


def test_resume_continues_the_schedule(tmp_path):
    # 4 images, batch 2: 2 steps per epoch; 3 + 3 steps resume in the middle of epoch 2
    common = dict(batch_size=2, epochs=4, optimizer="sgd", schedule="poly", lr=0.05, momentum=0.9,
                  head_lr_mult=10.0, bias_lr_mult=2.0, weight_decay=5e-4)
    full = make_config(tmp_path, work="full", max_steps=6, **common)
    train_deeplab.main(full)
    half = make_config(tmp_path, work="half", max_steps=3, **common)
    train_deeplab.main(half)
    after_half = _weights(tmp_path / "half")
    rest = make_config(tmp_path, work="half", max_steps=6, **common)
    train_deeplab.main(rest)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "half")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(after_half[k], a[k]) for k in a)  # the second half did train
    steps = [json.loads(line)["step"] for line in (tmp_path / "half" / "train_deeplab" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6
