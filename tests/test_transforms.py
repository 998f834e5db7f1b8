import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from caee.core.config import TrainConfig
from caee.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, RandomLongSideResize, build_eval_transform,
                                  build_train_transform, denormalize, normalize_image)
from caee.core.errors import CaeeError


def _cfg(**kw) -> TrainConfig:
    base = dict(resize_long=[0, 0], hflip=False, color_jitter=[0, 0, 0, 0], crop_size=0)
    return TrainConfig(**{**base, **kw})


def _sample(h, w, mask=None, seed=0):
    rng = np.random.default_rng(seed)
    img = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
    if mask is None:
        mask = torch.ones(h, w, dtype=torch.uint8)
    return {"image": tv_tensors.Image(img), "mask": tv_tensors.Mask(mask)}


def test_normalize_exact_values():
    img = np.array([[[0, 128, 255]]], np.uint8)  # (1, 1, 3)
    x = normalize_image(img)
    assert x.shape == (3, 1, 1) and x.dtype == torch.float32
    want = [(0 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (128 / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
            (255 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    assert torch.allclose(x.flatten(), torch.tensor(want), atol=1e-6)
    assert abs(want[0] - (-0.485 / 0.229)) < 1e-9


def test_normalize_batch_and_roundtrip():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = normalize_image(torch.from_numpy(img))
    assert x.shape == (2, 3, 5, 7)
    assert np.array_equal(denormalize(x).numpy(), img)
    assert np.array_equal(denormalize(x[1]).numpy(), img[1])
    with pytest.raises(ValueError):
        normalize_image(np.zeros((5, 7), np.uint8))


def test_eval_transform_equals_normalize_image():
    s = _sample(9, 11)
    out = build_eval_transform()(s)
    want = normalize_image(s["image"].permute(1, 2, 0).numpy())
    assert torch.allclose(out["image"], want, atol=1e-6)
    assert torch.equal(out["mask"], s["mask"])


@pytest.mark.parametrize("h,w", [(20, 30), (80, 100), (64, 10)])
def test_crop_size_and_padding(h, w):
    torch.manual_seed(0)
    t = build_train_transform(_cfg(crop_size=64))
    out = t(_sample(h, w))
    assert out["image"].shape == (3, 64, 64) and out["mask"].shape == (64, 64)
    pad = out["mask"] == 255
    # original pixels (mask 1) keep their count where the image fits, pads are exactly 0 / 255
    assert int((out["mask"] == 1).sum()) == min(h, 64) * min(w, 64)
    assert torch.all(out["image"][:, pad] == 0.0)
    assert set(out["mask"].unique().tolist()) <= {1, 255}


def test_padding_is_mean_colour():
    torch.manual_seed(0)
    out = build_train_transform(_cfg(crop_size=32))(_sample(8, 8))
    pad = out["mask"] == 255
    rgb = denormalize(out["image"])[pad]
    want = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8)
    assert torch.all(rgb == want)


def test_flip_moves_image_and_mask_together():
    h, w = 6, 50
    cols = torch.arange(w, dtype=torch.uint8).repeat(h, 1)        # mask value = original column
    img = torch.stack([cols * 5, cols, cols]).to(torch.uint8)     # red = 5 * column
    t = build_train_transform(_cfg(hflip=True))
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = t({"image": tv_tensors.Image(img), "mask": tv_tensors.Mask(cols), "la": tv_tensors.Mask(cols)})
        red = denormalize(out["image"])[..., 0].long()
        assert torch.equal(red, out["mask"].long() * 5)
        assert torch.equal(out["mask"], out["la"])
        seen.add(int(out["mask"][0, 0]))
    assert seen == {0, w - 1}  # both flipped and unflipped happened


def test_resize_long_side_and_mask_values():
    mask = torch.zeros(30, 40, dtype=torch.uint8)
    mask[5:20, 5:25] = 3
    mask[4, :] = 255
    t = build_train_transform(_cfg(resize_long=[17, 90]))
    sizes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = t(_sample(30, 40, mask))
        h, w = out["mask"].shape
        assert out["image"].shape[-2:] == (h, w)
        assert 17 <= max(h, w) <= 90 and w == max(h, w) and abs(h / w - 0.75) < 0.05
        assert set(out["mask"].unique().tolist()) <= {0, 3, 255}
        sizes.add(w)
    assert len(sizes) > 5


def test_resize_exact_size():
    torch.manual_seed(0)
    r = RandomLongSideResize(60, 60)
    out = r(_sample(30, 40))
    assert out["image"].shape == (3, 45, 60) and out["mask"].shape == (45, 60)
    with pytest.raises(CaeeError):
        RandomLongSideResize(50, 40)


def test_colour_jitter_touches_image_only():
    s = _sample(16, 16, torch.arange(256, dtype=torch.uint8).view(16, 16))
    t = build_train_transform(_cfg(color_jitter=[0.4, 0.4, 0.4, 0.1]))
    torch.manual_seed(3)
    out = t(s)
    assert torch.equal(out["mask"], s["mask"])
    assert not torch.allclose(out["image"], build_eval_transform()(s)["image"])


def test_full_default_pipeline_shapes():
    cfg = TrainConfig(crop_size=48, resize_long=[40, 70])
    torch.manual_seed(0)
    out = build_train_transform(cfg)(_sample(50, 60))
    assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 48, 48)
    assert out["mask"].shape == (48, 48) and out["mask"].dtype == torch.uint8
    with pytest.raises(CaeeError):
        build_train_transform(TrainConfig(color_jitter=[0.3, 0.3]))
