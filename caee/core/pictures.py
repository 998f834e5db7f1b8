"""Pictures of CAMs for looking at results (no plotting window: matplotlib is used for its colormap only).

* :func:`cam_grid`: one image in a row: image | ground truth | one CAM overlay per present class.
* :func:`compare_cams`: several images, one per row: image | ground truth | CAM A | CAM B, each CAM
  shown as the maximum over the image's classes (the layout of the supplementary's Fig. III).

Every function returns a uint8 (H, W, 3) RGB array; :func:`save_picture` writes it as a PNG.
"""
from __future__ import annotations

import io
from pathlib import Path

import os
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from caee.core.io import atomic_write, voc_palette

CAPTION_H = 14          # px of the caption strip above each panel
_PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
_MISSING_GT = np.uint8(96)  # grey panel where there is no ground truth


def colorize_label(label: np.ndarray | None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) label map -> (H, W, 3) uint8 in VOC palette colours (grey when ``label`` is None)."""
    if label is None:
        return np.full((*shape, 3), _MISSING_GT, np.uint8)  # type: ignore[misc]
    return _PALETTE[np.asarray(label, dtype=np.uint8)]


def cam_overlay(image: np.ndarray, cam: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """image (H, W, 3) uint8 blended with the jet colours of ``cam`` (H, W) in [0, 1]."""
    jet = colormaps["jet"](np.clip(np.asarray(cam, np.float32), 0.0, 1.0))[..., :3] * 255.0
    out = (1.0 - weight) * np.asarray(image, np.float32) + weight * jet
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _caption(panel: np.ndarray, text: str) -> np.ndarray:
    """Put a black strip with ``text`` above ``panel``."""
    strip = Image.new("RGB", (panel.shape[1], CAPTION_H))
    ImageDraw.Draw(strip).text((2, 1), text, fill=(255, 255, 255), font=ImageFont.load_default())
    return np.concatenate([np.asarray(strip), panel], axis=0)


def cam_grid(image: np.ndarray, gt: np.ndarray | None, keys: Sequence[int], cams: np.ndarray,
             class_names: Sequence[str]) -> np.ndarray:
    """image | ground truth | CAM overlay of each class, in one row with captions.

    image: (H, W, 3) uint8; gt: (H, W) uint8 label map or None; keys: (K,) 0-based class ids;
    cams: (K, H, W) in [0, 1]. Returns (CAPTION_H + H, (2 + K) * W, 3) uint8.
    """
    image = np.asarray(image, np.uint8)
    h, w = image.shape[:2]
    panels = [_caption(image, "image"), _caption(colorize_label(gt, (h, w)), "ground truth")]
    for k, cam in zip(keys, np.asarray(cams)):
        panels.append(_caption(cam_overlay(image, cam), class_names[int(k)]))
    return np.concatenate(panels, axis=1)


def _fit(panel: np.ndarray, h: int, w: int, nearest: bool) -> np.ndarray:
    """Resize ``panel`` to fit in h x w keeping its aspect ratio; pad with black (centred)."""
    ph, pw = panel.shape[:2]
    s = min(h / ph, w / pw)
    nh, nw = max(1, round(ph * s)), max(1, round(pw * s))
    if (nh, nw) != (ph, pw):
        resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
        panel = np.asarray(Image.fromarray(panel).resize((nw, nh), resample))
    out = np.zeros((h, w, 3), np.uint8)
    top, left = (h - nh) // 2, (w - nw) // 2
    out[top:top + nh, left:left + nw] = panel
    return out


def _max_cam(cams: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    cams = np.asarray(cams, np.float32)
    return cams.max(axis=0) if cams.shape[0] else np.zeros(shape, np.float32)


def compare_cams(rows: Sequence[tuple], titles: Sequence[str] = ("image", "ground truth", "OC CAM", "CGNet CAM"),
                 cell: tuple[int, int] | None = None) -> np.ndarray:
    """A Fig. III-style table: one row per image, columns image | GT | CAM A | CAM B.

    rows: ``(image (H, W, 3) uint8, gt (H, W) uint8 or None, cams_a (Ka, H, W), cams_b (Kb, H, W))``;
    each CAM column shows the maximum over the given classes as a jet overlay. Panels are fitted
    (aspect kept, black padding) into cells of ``cell = (h, w)`` (default: the first image's size).
    Returns (CAPTION_H + n * h, 4 * w, 3) uint8 with ``titles`` above the columns.
    """
    if not rows:
        raise ValueError("compare_cams needs at least one row")
    ch, cw = cell or np.asarray(rows[0][0]).shape[:2]
    lines = []
    for image, gt, cams_a, cams_b in rows:
        image = np.asarray(image, np.uint8)
        shape = image.shape[:2]
        panels = [(image, False), (colorize_label(gt, shape), True),
                  (cam_overlay(image, _max_cam(cams_a, shape)), False),
                  (cam_overlay(image, _max_cam(cams_b, shape)), False)]
        lines.append(np.concatenate([_fit(p, ch, cw, nearest) for p, nearest in panels], axis=1))
    header = np.concatenate([_caption(np.zeros((0, cw, 3), np.uint8), t) for t in titles], axis=1)
    return np.concatenate([header] + lines, axis=0)


def save_picture(path: str | os.PathLike, picture: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 picture as a PNG (atomically); an identical file is left alone."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(picture, np.uint8)).save(buffer, format="PNG")
    path = Path(path)
    if path.is_file() and path.read_bytes() == buffer.getvalue():
        return
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


def compare_labels(rows: Sequence[tuple], titles: Sequence[str] = ("image", "ground truth", "DeepLab"),
                   cell: tuple[int, int] | None = None) -> np.ndarray:
    """A Fig. IV-style table: one row per image, columns image | label map | label map | ...

    rows: ``(image (H, W, 3) uint8, label_1 (H, W) or None, label_2, ...)`` in palette colours.
    """
    if not rows:
        raise ValueError("compare_labels needs at least one row")
    ch, cw = cell or np.asarray(rows[0][0]).shape[:2]
    lines = []
    for image, *labels in rows:
        image = np.asarray(image, np.uint8)
        panels = [_fit(image, ch, cw, False)] + [_fit(colorize_label(lab, image.shape[:2]), ch, cw, True)
                                                 for lab in labels]
        lines.append(np.concatenate(panels, axis=1))
    header = np.concatenate([_caption(np.zeros((0, cw, 3), np.uint8), t) for t in titles], axis=1)
    return np.concatenate([header] + lines, axis=0)
