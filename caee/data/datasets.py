"""Torch datasets over a :class:`caee.data.splits.SplitIndex`.

- :class:`ClassificationDataset`: augmented image + image-level label (classifier, CGNet).
- :class:`InferenceDataset`: the raw uint8 image at full size (multi-scale CAM inference); use
  :func:`collate_list` since sizes differ.
- :class:`SegmentationDataset`: image + one or more label maps read from folders (pseudo labels,
  CRF la/ha labels, ground truth) with the same joint augmentation (AffinityNet, DeepLab).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from caee.data.splits import SplitIndex, check_label_values
from caee.data.transforms import build_eval_transform
from caee.core.errors import CaeeError
from caee.core.io import load_image, load_label_png


def _read_image(path: Path) -> tv_tensors.Image:
    """uint8 (3, H, W)."""
    return tv_tensors.Image(torch.from_numpy(load_image(path)).permute(2, 0, 1))


def collate_list(batch: list[dict]) -> list[dict]:
    """Collate that keeps the samples as they are (a list of dicts), for images of different sizes."""
    return list(batch)


class ClassificationDataset(Dataset):
    """Items: ``image`` float (3, h, w) normalised, ``label`` (C,) float32, ``idx`` int."""

    def __init__(self, index: SplitIndex, transform: Callable | None = None) -> None:
        self.index = index
        self.transform = transform if transform is not None else build_eval_transform()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        out = self.transform({"image": _read_image(self.index.image_path(i))})
        return {"image": out["image"].as_subclass(torch.Tensor), "label": torch.from_numpy(self.index.labels[i]),
                "idx": i}


class InferenceDataset(Dataset):
    """Items: ``image`` uint8 (H, W, 3) tensor at full size, ``label`` (C,) float32, ``idx``, ``id``."""

    def __init__(self, index: SplitIndex) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(load_image(self.index.image_path(i)))
        return {"image": image, "label": torch.from_numpy(self.index.labels[i]), "idx": i, "id": self.index.ids[i]}


class SegmentationDataset(Dataset):
    """Image + label maps under the same joint transform.

    ``label_dir``: one folder (returned as ``mask``), a dict ``{key: folder}`` (each returned under
    its key, e.g. ``{"la": ..., "ha": ...}`` for AffinityNet), or None for the index's training
    masks (``data.mask_dir``). Files are ``<folder>/<id><label_ext>``, label maps of the image's size
    with values 0..C or 255.

    Items: ``image`` float (3, h, w) normalised, each key long (h, w) with 255 = ignore,
    ``label`` (C,) float32, ``idx``, ``id``.
    """

    def __init__(self, index: SplitIndex, label_dir: str | os.PathLike | dict[str, str | os.PathLike] | None = None,
                 transform: Callable | None = None, label_ext: str = ".png") -> None:
        self.index = index
        if label_dir is None:
            if index.mask_dir is None:
                raise CaeeError(f"split '{index.split}' has no mask folder (data.mask_dir); give a label folder")
            label_dir = index.mask_dir
        dirs = label_dir if isinstance(label_dir, dict) else {"mask": label_dir}
        reserved = {"image", "label", "idx", "id"} & set(dirs)
        if reserved:
            raise ValueError(f"label map keys {sorted(reserved)} clash with the item's own keys")
        self.label_dirs = {k: Path(v) for k, v in dirs.items()}
        for key, d in self.label_dirs.items():
            if not d.is_dir():
                raise CaeeError(f"label folder {d} ({key}) does not exist; run the stage that writes it or fix the path")
        self.label_ext = label_ext
        self.transform = transform if transform is not None else build_eval_transform()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        image = _read_image(self.index.image_path(i))
        sample: dict = {"image": image}
        image_id = self.index.ids[i]
        for key, d in self.label_dirs.items():
            path = d / f"{image_id}{self.label_ext}"
            label = load_label_png(path)
            if label.shape != tuple(image.shape[-2:]):
                raise CaeeError(f"{path}: label map is {label.shape[1]}x{label.shape[0]} but its image "
                                f"{self.index.image_path(i)} is {image.shape[-1]}x{image.shape[-2]}; regenerate it")
            check_label_values(label, self.index.num_classes, path)
            sample[key] = tv_tensors.Mask(torch.from_numpy(label))
        out = self.transform(sample)
        item = {"image": out["image"].as_subclass(torch.Tensor)}
        for key in self.label_dirs:
            item[key] = out[key].as_subclass(torch.Tensor).long()
        item.update(label=torch.from_numpy(self.index.labels[i]), idx=i, id=image_id)
        return item
