"""Custom datasets: an image folder, split lists and a labels CSV (masks optional).

Layout (paths relative to ``data.root``; set ``data.dataset: custom``)::

    <data.image_dir>/<id>.jpg            images (.jpg, .jpeg or .png)
    ImageSets/Segmentation/<split>.txt   one image id per line (``split`` may also be a path to a .txt)
    <data.labels_csv>                    image-level labels, see below (absolute, relative to the
                                         working directory, or relative to data.root)
    <data.mask_dir>/<id>.png             optional training masks (0 background, 1..C, 255 ignore)
    <data.eval_mask_dir>/<id>.png        optional ground truth for evaluation

The labels CSV has a header ``image_id,<class_1>,...,<class_C>`` naming the C foreground classes
in label order (mask value k = class_k), then one row per image with 0/1 entries::

    image_id,cat,dog,car
    img_0001,1,0,0
    img_0002,0,1,1

Every image of a split needs a row; extra rows are ignored. Blank lines are skipped.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from caee.core.errors import CaeeError, not_found


def read_labels_csv(path: str | os.PathLike) -> tuple[list[str], dict[str, np.ndarray]]:
    """Parse a labels CSV into ``(class_names, {image_id: (C,) uint8 multi-hot})``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from spreadsheet exports
    except (FileNotFoundError, IsADirectoryError):
        raise CaeeError(f"labels CSV {not_found(path)}; set data.labels_csv (see caee/data/custom.py)") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
    if not rows:
        raise CaeeError(f"{path}: empty labels CSV; expected a header image_id,<class_1>,...,<class_C>")
    header = [h.strip() for h in rows[0]]
    if header[0] != "image_id" or len(header) < 2:
        raise CaeeError(f"{path}: the header must be image_id,<class_1>,...,<class_C>, got {','.join(header)}")
    names = header[1:]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise CaeeError(f"{path}: class names in the header must be non-empty and distinct")
    table: dict[str, np.ndarray] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise CaeeError(f"{path} line {line_no}: {len(row)} fields, expected {len(header)} (image_id + "
                            f"{len(names)} classes)")
        image_id, values = row[0].strip(), [v.strip() for v in row[1:]]
        if any(v not in ("0", "1") for v in values):
            raise CaeeError(f"{path} line {line_no}: label entries must be 0 or 1, got {','.join(values)}")
        if image_id in table:
            raise CaeeError(f"{path} line {line_no}: image {image_id!r} is listed twice")
        table[image_id] = np.array([v == "1" for v in values], np.uint8)
    return names, table
