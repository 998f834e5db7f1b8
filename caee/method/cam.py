"""Multi-scale + flip CAM inference (docs/METHOD.md §4).

For every pass (scale ``s``, optionally its horizontal flip) the image is resized to
``round(H*s) x round(W*s)`` and run through the classifier; the class maps are un-flipped,
upsampled to ``H x W`` (bilinear, align_corners=False), passed through ReLU and summed over all
passes. Only the image's classes are kept and each map is divided by its own maximum (+1e-5), so
the result lies in [0, 1).

How the scaled input is made (``resize``):

- ``pil_bicubic`` (official, OC-CSE / PSA ``VOC12ClsDatasetMSF``): the uint8 image is resized with
  PIL bicubic, then normalised. Runs on the CPU, one image at a time, before the upload.
- ``bilinear``: the normalised tensor is resized with ``F.interpolate`` (bilinear, no
  antialiasing), on the model's device. Cheaper, but on textured images it changes the CAMs at
  scale 0.5 (no antialiasing) enough to move the thresholded labels.

The two passes of a flip pair share one forward, and images of the same size are batched
together, so a scale costs one forward per group of equal-sized images.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from caee.data.transforms import normalize_image
from caee.core.errors import CaeeError

EPS = 1e-5
RESIZE_MODES = ("pil_bicubic", "bilinear")


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """The input size of the pass at ``scale``: ``(round(h*s), round(w*s))``, at least 1 px."""
    return max(1, round(h * scale)), max(1, round(w * scale))


def _as_uint8_tensor(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        t = image
    else:
        image = np.asarray(image)
        # torch cannot share a read-only buffer (e.g. np.asarray of a PIL image): copy it then
        t = torch.from_numpy(np.array(image) if not image.flags.writeable else np.ascontiguousarray(image))
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[-1] != 3:
        raise CaeeError(f"CAM inference expects a uint8 (H, W, 3) RGB image, got {tuple(t.shape)} {t.dtype}")
    return t


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _pil_bicubic(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, h, w, 3) uint8 on the CPU, each image resized by PIL bicubic."""
    h, w = size
    resized = [Image.fromarray(im.numpy()).resize((w, h), Image.Resampling.BICUBIC) for im in images.cpu()]
    return torch.stack([torch.from_numpy(np.array(im)) for im in resized])


class _ScaledInputs:
    """The normalised (B, 3, round(H*s), round(W*s)) input of each scale, made as ``resize`` says."""

    def __init__(self, images: torch.Tensor, device: torch.device, resize: str):
        self.resize, self.device = resize, device
        self.images = images  # (B, H, W, 3) uint8
        self.full = normalize_image(images.to(device, non_blocking=True))  # (B, 3, H, W)

    def __call__(self, scale: float) -> torch.Tensor:
        h, w = self.full.shape[-2:]
        size = scaled_size(h, w, scale)
        if size == (h, w):
            return self.full
        if self.resize == "bilinear":
            return F.interpolate(self.full, size=size, mode="bilinear", align_corners=False)
        return normalize_image(_pil_bicubic(self.images, size).to(self.device, non_blocking=True))


def _summed_maps(model: nn.Module, inputs: _ScaledInputs, channels: list[int], scales: Sequence[float],
                 flip: bool, amp: bool) -> torch.Tensor:
    """(B, len(channels), H, W) float32 sum over all passes of ReLU(upsampled class maps) of the
    given channels."""
    x = inputs.full
    b, _, h, w = x.shape
    top = max(channels)
    select = torch.tensor(channels, device=x.device)
    total = torch.zeros(b, len(channels), h, w, device=x.device, dtype=torch.float32)
    for s in scales:
        xs = inputs(s)
        if flip:
            xs = torch.cat([xs, xs.flip(-1)])
        if x.device.type == "cuda":
            xs = xs.contiguous(memory_format=torch.channels_last)
        with _autocast(x.device, amp):
            _, maps = model(xs)
        if top >= maps.shape[1]:
            raise CaeeError(f"class id {top} is out of range for a model with {maps.shape[1]} "
                            "classes: do the checkpoint and the dataset have the same classes?")
        maps = maps.index_select(1, select).float()
        if flip:
            maps = torch.cat([maps[:b], maps[b:].flip(-1)])
        up = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False).relu_()
        total += up[:b] + up[b:] if flip else up
    return total


@torch.inference_mode()
def multiscale_cams(model: nn.Module, images: Sequence, keys: Sequence, scales: Sequence[float] = (1.0,),
                    flip: bool = True, device: torch.device | str | None = None, amp: bool = True,
                    resize: str = "pil_bicubic") -> list[np.ndarray]:
    """Normalised multi-scale CAMs of several images (equal-sized ones share each forward).

    model: a CamClassifier (or any module whose forward returns ``(logits, maps (B, C, h, w))``),
    already on ``device`` and in eval mode. images: uint8 (H_i, W_i, 3) tensors / arrays.
    keys: per image, 0-based class ids to keep (in that order). device: where to run (default:
    the model's). amp: bf16 autocast on CUDA. resize: how the scaled inputs are made
    (``pil_bicubic`` official, or ``bilinear``; see the module docstring).
    Returns per image (K_i, H_i, W_i) float32 in [0, 1).
    """
    if len(images) != len(keys):
        raise CaeeError(f"got {len(images)} images but {len(keys)} key lists")
    if not scales:
        raise CaeeError("config key 'cam.scales' must list at least one scale")
    if resize not in RESIZE_MODES:
        raise CaeeError(f"config key 'cam.resize' must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    tensors = [_as_uint8_tensor(im) for im in images]
    key_arrays = [np.asarray(k, dtype=np.int64).reshape(-1) for k in keys]
    out: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((int(t.shape[0]), int(t.shape[1])), []).append(i)
    for (h, w), members in groups.items():
        union = sorted({int(k) for i in members for k in key_arrays[i]})
        if not union:
            for i in members:
                out[i] = np.zeros((0, h, w), np.float32)
            continue
        inputs = _ScaledInputs(torch.stack([tensors[i] for i in members]), device, resize)
        # only the classes present in some image of the group are upsampled (2-3 of 20 on VOC)
        total = _summed_maps(model, inputs, union, scales, flip, amp)
        pos = {k: j for j, k in enumerate(union)}
        for row, i in enumerate(members):
            cams = total[row, [pos[int(k)] for k in key_arrays[i]]]
            cams = cams / (cams.amax(dim=(1, 2), keepdim=True) + EPS)
            out[i] = cams.cpu().numpy()
    return out  # type: ignore[return-value]


def multiscale_cam(model: nn.Module, image, keys, scales: Sequence[float] = (1.0,), flip: bool = True,
                   device: torch.device | str | None = None, amp: bool = True,
                   resize: str = "pil_bicubic") -> np.ndarray:
    """Normalised multi-scale CAMs of one image.

    image: uint8 (H, W, 3) tensor or array; keys: (K,) 0-based class ids to keep.
    Returns (K, H, W) float32 in [0, 1): each map divided by its own maximum + 1e-5.
    """
    return multiscale_cams(model, [image], [keys], scales, flip, device, amp, resize)[0]


def image_keys(label) -> np.ndarray:
    """(K,) int64 0-based class ids of a multi-hot (C,) label vector."""
    return np.flatnonzero(np.asarray(label).reshape(-1) > 0.5).astype(np.int64)
