"""Joint image / label-map augmentation (torchvision.transforms.v2) and ImageNet normalisation.

Transforms take and return a dict: ``{"image": tv_tensors.Image uint8 (3, H, W), <key>:
tv_tensors.Mask uint8 (H, W), ...}``. Geometric steps move the image and every mask together
(masks resized with nearest neighbour); photometric steps touch the image only. Output images are
float (3, h, w), normalised; masks keep their dtype.

Training pipeline (PSA / OC-CSE): random long-side resize (uniform integer in ``resize_long``),
horizontal flip, colour jitter, ImageNet normalisation, random crop ``crop_size`` padding the
image with 0 (= the mean colour, after normalisation) and masks with 255 (ignore).

AffinityNet (PSA's train_aff.py) crops differently: :class:`AffinityAugment` (colour jitter on the
whole image, random crop box of :func:`random_crop_box` padding the uint8 image with 0 = black,
normalisation, horizontal flip; no rescale). The box and the flip are returned so that the CRF
scores are cropped and flipped with the same ones.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from caee.core.errors import CaeeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomLongSideResize(v2.Transform):
    """Resize so that the longer side is a uniform random integer in [low, high] (aspect kept).

    Images: bilinear with antialiasing; masks: nearest (torchvision's mask kernel).
    """

    def __init__(self, low: int, high: int) -> None:
        super().__init__()
        if not 0 < low <= high:
            raise CaeeError(f"resize_long must be [low, high] with 0 < low <= high, got [{low}, {high}]")
        self.low, self.high = int(low), int(high)

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.query_size(flat_inputs)
        long_side = int(torch.randint(self.low, self.high + 1, ()).item())
        scale = long_side / max(h, w)
        return {"size": [max(1, round(h * scale)), max(1, round(w * scale))]}

    def transform(self, inpt, params: dict):
        return self._call_kernel(F.resize, inpt, size=params["size"],
                                 interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def _normalise_steps() -> list[v2.Transform]:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def build_train_transform(train_cfg) -> v2.Compose:
    """The training augmentation of a :class:`caee.core.config.TrainConfig` (resize_long, hflip, color_jitter, crop_size).

    ``resize_long: [0, 0]`` or ``crop_size: 0`` switch that step off.
    """
    steps: list[v2.Transform] = []
    if len(train_cfg.resize_long) != 2:
        raise CaeeError(f"config key 'resize_long' must be [low, high], got {train_cfg.resize_long}")
    if train_cfg.resize_long[1] > 0:
        steps.append(RandomLongSideResize(*train_cfg.resize_long))
    if train_cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    jitter = list(train_cfg.color_jitter)
    if len(jitter) != 4:
        raise CaeeError(f"config key 'color_jitter' must be [brightness, contrast, saturation, hue], got {jitter}")
    if any(j > 0 for j in jitter):
        steps.append(v2.ColorJitter(*jitter))
    steps += _normalise_steps()
    if train_cfg.crop_size > 0:
        steps.append(v2.RandomCrop(train_cfg.crop_size, pad_if_needed=True,
                                   fill={tv_tensors.Image: 0.0, tv_tensors.Mask: 255}))
    return v2.Compose(steps)


@dataclasses.dataclass(frozen=True)
class CropBox:
    """Where a crop's content comes from (PSA's crop geometry).

    Rows ``img_top .. img_top+height`` of the image go to rows ``cont_top .. cont_top+height`` of
    the ``crop x crop`` output (likewise columns); the rest of the output is padding.
    """
    cont_top: int
    cont_left: int
    img_top: int
    img_left: int
    height: int
    width: int

    def as_list(self) -> list[int]:
        return [self.cont_top, self.cont_left, self.img_top, self.img_left, self.height, self.width]


def _crop_offsets(size: int, crop: int, generator: torch.Generator | None) -> tuple[int, int]:
    """(output offset, image offset) along one side: a larger image is cut at a uniform random
    offset, a smaller one is placed at a uniform random offset in the output (PSA)."""
    space = size - crop
    offset = int(torch.randint(abs(space) + 1, (), generator=generator))
    return (0, offset) if space > 0 else (offset, 0)


def random_crop_box(height: int, width: int, crop: int, generator: torch.Generator | None = None) -> CropBox:
    """A random ``crop x crop`` box on a ``height x width`` image, as PSA's random crop draws it."""
    cont_top, img_top = _crop_offsets(height, crop, generator)
    cont_left, img_left = _crop_offsets(width, crop, generator)
    return CropBox(cont_top, cont_left, img_top, img_left, min(crop, height), min(crop, width))


def crop_with_box(image: torch.Tensor, box: CropBox, crop: int, fill: float = 0) -> torch.Tensor:
    """``(..., H, W)`` -> ``(..., crop, crop)``: the box's content, ``fill`` elsewhere."""
    out = image.new_full((*image.shape[:-2], crop, crop), fill)
    out[..., box.cont_top:box.cont_top + box.height, box.cont_left:box.cont_left + box.width] = \
        image[..., box.img_top:box.img_top + box.height, box.img_left:box.img_left + box.width]
    return out


class AffinityAugment:
    """PSA's AffinityNet training augmentation (train_aff.py), in its order: colour jitter on the
    whole image, random crop ``crop_size`` padding the uint8 image with 0 (black, not the mean
    colour), ImageNet normalisation, horizontal flip with probability 1/2. No rescale.

    :meth:`draw` picks the box and the flip, :meth:`image` applies them, so that the caller can
    move the CRF scores with the same ones.
    """

    def __init__(self, crop_size: int, hflip: bool = True, color_jitter: list[float] | None = None) -> None:
        if crop_size <= 0:
            raise CaeeError(f"train_affinity.crop_size must be > 0 for PSA's crop, got {crop_size}")
        jitter = list(color_jitter or [0, 0, 0, 0])
        if len(jitter) != 4:
            raise CaeeError(f"config key 'color_jitter' must be [brightness, contrast, saturation, hue], got {jitter}")
        self.crop_size = crop_size
        self.hflip = hflip
        self.jitter = v2.ColorJitter(*jitter) if any(j > 0 for j in jitter) else None

    def draw(self, height: int, width: int) -> tuple[CropBox, bool]:
        box = random_crop_box(height, width, self.crop_size)
        flip = self.hflip and bool(torch.rand(()) < 0.5)
        return box, flip

    def image(self, image: torch.Tensor, box: CropBox, flip: bool) -> torch.Tensor:
        """uint8 ``(3, H, W)`` -> float ``(3, crop, crop)`` normalised."""
        if self.jitter is not None:
            image = self.jitter(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        out = normalize_image(crop_with_box(image, box, self.crop_size, 0).movedim(0, -1))
        return out.flip(-1) if flip else out


def build_eval_transform() -> v2.Compose:
    """Normalisation only (no geometry), for evaluation and inference."""
    return v2.Compose(_normalise_steps())


def normalize_image(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB (H, W, 3) or (N, H, W, 3), numpy or tensor -> float32 (3, H, W) / (N, 3, H, W), normalised.

    A tensor stays on its device (upload uint8, normalise on the GPU).
    """
    x = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) or (N, H, W, 3) RGB image, got shape {tuple(x.shape)}")
    x = x.movedim(-1, -3).to(torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_image`: float (3, H, W) / (N, 3, H, W) -> uint8 (H, W, 3) / (N, H, W, 3).

    Same device as the input; call ``.cpu().numpy()`` for pictures.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    x = (image.detach().float() * std + mean) * 255.0
    return x.round().clamp(0, 255).to(torch.uint8).movedim(-3, -1).contiguous()
