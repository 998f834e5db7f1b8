"""Prepare MS-COCO 2014 for caee: semantic masks, split lists and image-level labels.

    pip install pycocotools          # needed by this tool only
    python tools/prepare_coco.py --coco COCO --out ROOT

COCO holds ``annotations/instances_{train,val}2014.json`` and ``{train,val}2014/*.jpg``. Writes:

- ``ROOT/SegmentationClass/<id>.png``: 0 background, 1..80 (category ids 1..90 mapped to 1..80 in
  the standard order), 255 on crowd regions not covered by a non-crowd instance. Painting order:
  crowd regions first, then instances from the largest to the smallest area, so a small object on
  top of a large one (a cup on a table) stays visible.
- ``ROOT/ImageSets/Segmentation/{train,val}.txt`` (ids = file names without ``.jpg``); images without
  any non-crowd instance are left out unless ``--keep-empty``.
- ``ROOT/JPEGImages/<id>.jpg`` symlinks to the originals (``--no-links`` when ROOT is the COCO folder:
  the loader also looks in ``train2014`` / ``val2014``).
- ``ROOT/cls_labels.npz``: image-level labels (classes with pixels in the mask).

Then use ``data.dataset: coco``, ``data.root: ROOT``, ``data.mask_dir: SegmentationClass``.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from caee.core.errors import guarded
from caee.data.classes import COCO_ID_TO_LABEL
from caee.data.files import LABELS_CACHE, SPLIT_DIR, save_labels_cache
from caee.data.splits import labels_from_mask
from caee.core.errors import CaeeError
from caee.core.io import save_label_png, write_text

logger = logging.getLogger("prepare_coco")
_COCO = None  # the pycocotools COCO object of the split being converted (shared with forked workers)


def paint_semantic_mask(height: int, width: int, anns: list[dict], decode: Callable[[dict], np.ndarray]) -> np.ndarray:
    """(H, W) uint8 label map from instance annotations; ``decode(ann)`` gives the (H, W) binary mask."""
    mask = np.zeros((height, width), np.uint8)
    for ann in anns:
        if ann.get("iscrowd", 0):
            mask[decode(ann) > 0] = 255
    for ann in sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -float(a.get("area", 0))):
        label = COCO_ID_TO_LABEL.get(int(ann["category_id"]))
        if label is None:
            raise CaeeError(f"annotation {ann.get('id')}: unknown COCO category id {ann['category_id']}")
        mask[decode(ann) > 0] = label
    return mask


def _convert(job: tuple[int, str, str, bool]) -> tuple[str, np.ndarray | None]:
    img_id, file_name, out, keep_empty = job
    info = _COCO.imgs[img_id]
    anns = _COCO.loadAnns(_COCO.getAnnIds(imgIds=img_id, iscrowd=None))
    image_id = Path(file_name).stem
    if not keep_empty and not any(not a.get("iscrowd", 0) for a in anns):
        return image_id, None
    mask = paint_semantic_mask(info["height"], info["width"], anns, _COCO.annToMask)
    save_label_png(Path(out) / "SegmentationClass" / f"{image_id}.png", mask)
    return image_id, labels_from_mask(mask, len(COCO_ID_TO_LABEL))


def prepare(coco_root: Path, out: Path, splits: list[str], workers: int, keep_empty: bool, links: bool) -> None:
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise CaeeError("tools/prepare_coco.py needs pycocotools: pip install pycocotools") from None
    global _COCO
    all_ids, all_labels = [], []
    for split in splits:
        ann_file = coco_root / "annotations" / f"instances_{split}2014.json"
        if not ann_file.is_file():
            raise CaeeError(f"annotation file not found: {ann_file}; --coco must hold annotations/")
        _COCO = COCO(str(ann_file))
        jobs = [(i, _COCO.imgs[i]["file_name"], str(out), keep_empty) for i in sorted(_COCO.imgs)]
        (out / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:  # fork shares _COCO
                results = list(tqdm(pool.imap(_convert, jobs, chunksize=64), total=len(jobs), desc=split))
        else:
            results = [_convert(j) for j in tqdm(jobs, desc=split)]
        kept = [(i, lab) for i, lab in results if lab is not None]
        write_text(out / SPLIT_DIR / f"{split}.txt", "".join(f"{i}\n" for i, _ in kept))
        logger.info("%s: %d images, %d kept", split, len(results), len(kept))
        if links:
            (out / "JPEGImages").mkdir(exist_ok=True)
            for image_id, _ in kept:
                link = out / "JPEGImages" / f"{image_id}.jpg"
                if not link.exists():
                    os.symlink((coco_root / f"{split}2014" / f"{image_id}.jpg").resolve(), link)
        all_ids += [i for i, _ in kept]
        all_labels += [lab for _, lab in kept]
    save_labels_cache(out / LABELS_CACHE, all_ids, np.stack(all_labels) if all_labels else np.zeros((0, 80)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco", required=True, help="COCO root with annotations/ and train2014/, val2014/")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--keep-empty", action="store_true", help="also list images without any instance")
    p.add_argument("--no-links", action="store_true", help="do not create JPEGImages symlinks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return guarded(lambda: prepare(Path(args.coco), Path(args.out), args.splits, args.workers, args.keep_empty,
                                   not args.no_links))


if __name__ == "__main__":
    sys.exit(main())
