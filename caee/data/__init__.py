"""Datasets: VOC / COCO / custom / synthetic roots, split indexes, torch datasets and augmentation.

Names are imported on first use (PEP 562), so ``caee.data.splits`` / ``caee.data.synthetic`` (and
the tools built on them) load without importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "caee.data.classes": ["VOC_CLASSES", "COCO_CLASSES", "COCO_CATEGORY_IDS", "COCO_ID_TO_LABEL"],
    "caee.data.splits": ["SplitIndex", "dataset_class_names", "ensure_dataset", "load_split", "read_split_file",
                         "check_label_values"],
    "caee.data.datasets": ["ClassificationDataset", "InferenceDataset", "SegmentationDataset", "collate_list"],
    "caee.data.transforms": ["build_train_transform", "build_eval_transform", "normalize_image", "denormalize",
                             "IMAGENET_MEAN", "IMAGENET_STD"],
    "caee.data.synthetic": ["generate_synthetic"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'caee.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:
    from caee.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES, COCO_ID_TO_LABEL, VOC_CLASSES  # noqa: F401
    from caee.data.datasets import (ClassificationDataset, InferenceDataset, SegmentationDataset,  # noqa: F401
                                    collate_list)
    from caee.data.splits import (SplitIndex, check_label_values, dataset_class_names, ensure_dataset,  # noqa: F401
                                  load_split, read_split_file)
    from caee.data.synthetic import generate_synthetic  # noqa: F401
    from caee.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, build_eval_transform,  # noqa: F401
                                      build_train_transform, denormalize, normalize_image)
