"""Prepare PASCAL VOC 2012 + SBD for caee.

    python tools/prepare_voc.py --voc VOCdevkit/VOC2012 --sbd benchmark_RELEASE [--out data/VOC2012]

Writes under ROOT (``--out``, default ``data/VOC2012``: configs/voc/r38.yaml's ``data.root``):

- ``SegmentationClassAug/<id>.png``: palette label maps of every train_aug / train / val image.
  VOC's own ``SegmentationClass`` masks (with their 255 boundaries) take precedence and are copied;
  the others are converted from SBD's ``dataset/cls/<id>.mat`` (``GTcls.Segmentation``, 0..20).
- ``ImageSets/Segmentation/train_aug.txt`` = VOC train + SBD train + SBD val - VOC val
  (10,582 images; a different count is reported loudly).
- ``cls_labels.npz``: image-level labels of train_aug, train and val. ``--labels xml`` (default,
  as the official ``cls_labels.npy`` of PSA / OC-CSE, made by their ``make_cls_labels.py``): every
  ``<name>`` of ``Annotations/<id>.xml`` that is a VOC class, so objects marked difficult or
  truncated, or absent from the masks, count. ``--labels masks``: the classes present in the masks.
  The log says how many images of each split get other labels from the XML than from the masks.

With ``--out`` elsewhere, ROOT gets symlinks to VOC's JPEGImages and SegmentationClass and copies
of its train/val lists. Existing masks are kept unless ``--overwrite``. Then use
``data.dataset: voc``, ``data.root: ROOT``, ``data.train_split: train_aug``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from tqdm import tqdm

from caee.core.errors import guarded
from caee.core.config import DataConfig
from caee.data.classes import VOC_CLASSES
from caee.data.files import LABELS_CACHE, SPLIT_DIR, save_labels_cache
from caee.data.splits import check_label_values, labels_from_mask, load_split, read_split_file
from caee.core.errors import CaeeError
from caee.core.io import atomic_write, load_label_png, save_label_png, write_text

logger = logging.getLogger("prepare_voc")
TRAIN_AUG_SIZE = 10582
NUM_CLASSES = 20


def load_sbd_mat(path: str | os.PathLike) -> np.ndarray:
    """(H, W) uint8 class map from an SBD ``cls/<id>.mat`` file."""
    from scipy.io import loadmat

    try:
        gt = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"]
        label = np.asarray(gt.Segmentation)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CaeeError(f"{path}: not an SBD class file with GTcls.Segmentation ({e})") from None
    if label.ndim != 2:
        raise CaeeError(f"{path}: GTcls.Segmentation has shape {label.shape}, expected (H, W)")
    check_label_values(label, NUM_CLASSES, path)
    return label.astype(np.uint8)


def _make_mask(job: tuple[str, str, str]) -> str:
    """``(kind, source, target)``: copy a VOC PNG or convert an SBD .mat; returns the target."""
    kind, src, dst = job
    if kind == "copy":
        with open(src, "rb") as f, atomic_write(dst) as g:
            g.write(f.read())
    else:
        save_label_png(dst, load_sbd_mat(src))
    return dst


def labels_from_xml(path: str | os.PathLike) -> np.ndarray:
    """(20,) uint8 multi-hot of a VOC ``Annotations/<id>.xml``: every ``<name>`` element anywhere in the
    file whose text is a VOC class (object names; part names such as 'hand' are not classes).
    Like the official labels, 'difficult' and 'truncated' objects count and the text is not stripped."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise CaeeError(f"annotation not found: {path}; use --labels masks to take the labels from the masks") \
            from None
    except (ET.ParseError, OSError) as e:
        raise CaeeError(f"{path}: unreadable VOC annotation ({e})") from None
    index = {name: k for k, name in enumerate(VOC_CLASSES)}
    label = np.zeros(NUM_CLASSES, np.uint8)
    for el in tree.getroot().iter("name"):
        if el.text in index:
            label[index[el.text]] = 1
    return label


def _write_labels(out: Path, annotations: Path, splits: dict[str, list[str]]) -> dict[str, int]:
    """Write ``out/cls_labels.npz`` from the XML files; returns, per split, how many images have
    other labels than their masks (in ``out/SegmentationClassAug``)."""
    ids = sorted({i for members in splits.values() for i in members})
    xml = {i: labels_from_xml(annotations / f"{i}.xml") for i in ids}
    save_labels_cache(out / LABELS_CACHE, ids, np.stack([xml[i] for i in ids]))
    differ: dict[str, int] = {}
    for split, members in splits.items():
        changed = [i for i in members if not np.array_equal(
            xml[i], labels_from_mask(load_label_png(out / "SegmentationClassAug" / f"{i}.png"), NUM_CLASSES))]
        differ[split] = len(changed)
        logger.info("%s: %d of %d images have other labels in the XML annotations than in the masks%s", split,
                    len(changed), len(members), f" (first: {', '.join(changed[:5])})" if changed else "")
    return differ


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CaeeError(f"{what} not found: {path}")
    return path


def _link_voc(voc: Path, out: Path) -> None:
    """Make ``out`` a VOC-like root pointing at ``voc``'s images and ground truth."""
    for name in ("JPEGImages", "SegmentationClass"):
        if not (out / name).exists():
            os.symlink((voc / name).resolve(), out / name, target_is_directory=True)
    for split in ("train", "val"):
        dst = out / SPLIT_DIR / f"{split}.txt"
        if not dst.exists():
            write_text(dst, (voc / SPLIT_DIR / f"{split}.txt").read_text())


def build_train_aug(voc_train: list[str], voc_val: list[str], sbd_train: list[str], sbd_val: list[str]) -> list[str]:
    """VOC train + SBD train + SBD val - VOC val, sorted."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def prepare(voc: Path, sbd: Path, out: Path, workers: int, expected: int, overwrite: bool,
            labels: str = "xml") -> dict[str, int]:
    """Returns, with ``labels="xml"``, per split the number of images whose XML labels differ from
    their masks' (empty with ``labels="masks"``)."""
    voc_masks = _require(voc / "SegmentationClass", "VOC SegmentationClass folder")
    _require(voc / "JPEGImages", "VOC JPEGImages folder")
    sbd_cls = _require(sbd / "dataset" / "cls", "SBD dataset/cls folder (--sbd should be benchmark_RELEASE)")
    if labels == "xml":
        _require(voc / "Annotations", "VOC Annotations folder (or use --labels masks)")
    voc_train = read_split_file(_require(voc / SPLIT_DIR / "train.txt", "VOC train list"))
    voc_val = read_split_file(_require(voc / SPLIT_DIR / "val.txt", "VOC val list"))
    sbd_train = read_split_file(_require(sbd / "dataset" / "train.txt", "SBD train list"))
    sbd_val = read_split_file(_require(sbd / "dataset" / "val.txt", "SBD val list"))
    train_aug = build_train_aug(voc_train, voc_val, sbd_train, sbd_val)
    counts = (f"VOC train {len(voc_train)}, SBD train {len(sbd_train)}, SBD val {len(sbd_val)}, "
              f"VOC val {len(voc_val)} -> train_aug {len(train_aug)}")
    logger.info(counts)
    if expected and len(train_aug) != expected:
        logger.warning("!" * 78)
        logger.warning("train_aug has %d images, expected %d (%s); check the VOC and SBD versions",
                       len(train_aug), expected, counts)
        logger.warning("!" * 78)

    if labels == "xml":  # before any conversion: every image needs its annotation
        have = set(os.listdir(voc / "Annotations"))
        no_xml = [i for i in sorted(set(train_aug) | set(voc_train) | set(voc_val)) if f"{i}.xml" not in have]
        if no_xml:
            raise CaeeError(f"{len(no_xml)} images have no {voc / 'Annotations'}/<id>.xml (first: "
                            f"{', '.join(no_xml[:5])}); use --labels masks to take the labels from the masks")

    out.mkdir(parents=True, exist_ok=True)
    (out / SPLIT_DIR).mkdir(parents=True, exist_ok=True)
    if out.resolve() != voc.resolve():
        _link_voc(voc, out)
    aug_dir = out / "SegmentationClassAug"
    aug_dir.mkdir(exist_ok=True)
    jobs, missing = [], []
    for image_id in sorted(set(train_aug) | set(voc_train) | set(voc_val)):
        dst = aug_dir / f"{image_id}.png"
        if dst.exists() and not overwrite:
            continue
        if (voc_masks / f"{image_id}.png").is_file():
            jobs.append(("copy", str(voc_masks / f"{image_id}.png"), str(dst)))
        elif (sbd_cls / f"{image_id}.mat").is_file():
            jobs.append(("mat", str(sbd_cls / f"{image_id}.mat"), str(dst)))
        else:
            missing.append(image_id)
    if missing:
        raise CaeeError(f"{len(missing)} images have neither {voc_masks}/<id>.png nor {sbd_cls}/<id>.mat "
                        f"(first: {', '.join(missing[:5])}); check --voc / --sbd")
    if workers > 1 and len(jobs) > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as ex:
            list(tqdm(ex.map(_make_mask, jobs, chunksize=32), total=len(jobs), desc="SegmentationClassAug"))
    else:
        for job in tqdm(jobs, desc="SegmentationClassAug"):
            _make_mask(job)
    write_text(out / SPLIT_DIR / "train_aug.txt", "".join(f"{i}\n" for i in train_aug))

    # every listed image and mask must exist; then the image-level labels
    splits = {"train_aug": train_aug, "train": voc_train, "val": voc_val}
    for split, ids in splits.items():
        lost = [i for i in ids if not (aug_dir / f"{i}.png").is_file()]
        if lost:
            raise CaeeError(f"{len(lost)} masks of {split} are missing from {aug_dir} (first: {', '.join(lost[:5])})")
    cache = out / LABELS_CACHE
    if cache.exists():
        cache.unlink()  # rebuilt below
    differ = _write_labels(out, voc / "Annotations", splits) if labels == "xml" else {}
    data_cfg = DataConfig(dataset="voc", root=str(out))
    for split in splits:
        index = load_split(data_cfg, split)  # checks the images; with --labels masks derives and caches the labels
        logger.info("%s: %d images, %d labels (from the %s)", split, len(index), int(index.labels.sum()),
                    "XML annotations" if labels == "xml" else "masks")
    logger.info("done: data.dataset=voc data.root=%s data.train_split=train_aug", out)
    return differ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc", required=True, help="VOCdevkit/VOC2012")
    p.add_argument("--sbd", required=True, help="benchmark_RELEASE (holds dataset/cls, dataset/train.txt, ...)")
    p.add_argument("--out", default="data/VOC2012",
                   help="output root (default: data/VOC2012, the data.root of configs/voc/r38.yaml; "
                        "give the --voc folder to write into it)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="conversion processes")
    p.add_argument("--expected-count", type=int, default=TRAIN_AUG_SIZE,
                   help="expected train_aug size (0 = do not check)")
    p.add_argument("--overwrite", action="store_true", help="rewrite existing SegmentationClassAug masks")
    p.add_argument("--labels", choices=("xml", "masks"), default="xml",
                   help="image-level labels from Annotations/<id>.xml (official cls_labels.npy) or from the masks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return guarded(lambda: prepare(Path(args.voc), Path(args.sbd), Path(args.out), args.workers,
                                   args.expected_count, args.overwrite, args.labels))


if __name__ == "__main__":
    sys.exit(main())
