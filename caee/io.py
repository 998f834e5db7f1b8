"""Reading and writing the artifacts passed between stages.

Every writer is atomic: data goes to a temporary file in the target folder, which is then renamed
over the target, so a crash never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from caee.errors import CaeeError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file next to ``path``; on success rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------- label PNGs (VOC palette)

def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened); 255 (ignore) is white."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    palette[255 * 3: 256 * 3] = [255, 255, 255]
    return palette


_PALETTE = voc_palette()


def save_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Save an (H, W) label map of class indices (0..C, 255 = ignore) as a palette PNG."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be (H, W), got shape {label.shape}")
    if label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(_PALETTE)
    with atomic_write(path) as f:
        img.save(f, format="PNG")


def load_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as (H, W) uint8 class indices (palette indices, or a grey image)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise CaeeError(f"{path}: label PNG must be a palette or greyscale image, got mode {img.mode}")
            return np.array(img, dtype=np.uint8)
    except FileNotFoundError:
        raise CaeeError(f"label file not found: {path}") from None
    except (OSError, SyntaxError) as e:
        raise CaeeError(f"{path}: unreadable label PNG ({e})") from None


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an RGB image as (H, W, 3) uint8."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except FileNotFoundError:
        raise CaeeError(f"image not found: {path}") from None
    except (OSError, SyntaxError) as e:
        raise CaeeError(f"{path}: unreadable image ({e})") from None


# ---------------------------------------------------------------- CAM files

def save_cam_npz(path: str | os.PathLike, keys: np.ndarray, cams: np.ndarray) -> None:
    """Save the CAMs of one image.

    keys: (K,) 0-based foreground class ids present in the image.
    cams: (K, H, W) float16/float32 in [0, 1], at the original image size.
    """
    keys = np.asarray(keys, dtype=np.int64)
    cams = np.asarray(cams)
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise ValueError(f"cams must be (K, H, W) with K = len(keys) = {len(keys)}, got {cams.shape}")
    with atomic_write(path) as f:
        np.savez(f, keys=keys, cams=cams)


def load_cam_npz(path: str | os.PathLike, dtype: np.dtype | None = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Load ``(keys (K,) int64, cams (K, H, W) float32)`` written by :func:`save_cam_npz`
    (``dtype=None``: the CAMs as stored, float16 / float32)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = z["keys"].astype(np.int64)
            cams = z["cams"] if dtype is None else z["cams"].astype(dtype)
    except FileNotFoundError:
        raise CaeeError(f"CAM file not found: {path}") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise CaeeError(f"{path}: unreadable or truncated CAM file ({e}); delete it and re-run make_cam.py") from None
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise CaeeError(f"{path}: expected cams (K, H, W) with K = len(keys), got {cams.shape} and {keys.shape}")
    return keys, cams
