"""Where a dataset root keeps its split lists and image-level labels, and the labels file format:
shared by the split index (:mod:`caee.data.splits`), the synthetic generator and the prepare tools."""
from __future__ import annotations

import os

import numpy as np

from caee.core.io import atomic_write

SPLIT_DIR = "ImageSets/Segmentation"
LABELS_CACHE = "cls_labels.npz"


def save_labels_cache(path: str | os.PathLike, ids: list[str], labels: np.ndarray, source: str = "") -> None:
    """Write ``ids`` (unicode array) and ``labels`` ((N, C) uint8) to an .npz (no pickle).

    source: what the labels were derived from, when that can change under the same root
    (``masks:<mask dirs>``); "" for labels a prepare tool or the generator wrote with the data."""
    labels = np.asarray(labels, np.uint8).reshape(len(ids), -1)
    with atomic_write(path) as f:
        np.savez(f, ids=np.array(ids, dtype=np.str_), labels=labels, source=np.array(source, dtype=np.str_))
