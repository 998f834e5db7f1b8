"""Dataset roots, split lists and image-level labels.

Every dataset is read from a VOC-style root::

    <root>/<data.image_dir>/<id>.jpg (or .png / .jpeg)
    <root>/<data.mask_dir>/<id>.png          training masks (VOC: SegmentationClassAug)
    <root>/<data.eval_mask_dir>/<id>.png     evaluation ground truth (VOC: SegmentationClass)
    <root>/ImageSets/Segmentation/<split>.txt

A split list holds one image per line; only the first whitespace-separated token counts and
its file stem is the id, so PSA-style lines (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``)
also work. ``split`` may also be a path to a ``.txt`` list (relative to the root or absolute).

Image-level labels come from the masks (class k present when any pixel equals k) and are cached
without pickle in ``<root>/cls_labels.npz`` (``ids``: unicode array, ``labels``: (N, C) uint8,
``source``: the mask folders they came from; a cache from other mask folders is not reused).
Delete that file after editing masks in place. A read-only root caches under ``~/.cache/caee/``.
Custom datasets (and any dataset with ``data.labels_csv`` set) take the labels from a CSV instead
(see :mod:`caee.data.custom`).
"""
from __future__ import annotations

import contextlib
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import re
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from caee.core.config import DataConfig
from caee.data.classes import COCO_CLASSES, VOC_CLASSES, synthetic_class_names
from caee.data.files import LABELS_CACHE, SPLIT_DIR, save_labels_cache
from caee.core.errors import CaeeError, not_found
from caee.core.io import load_label_png

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".JPEG", ".PNG")
_PREPARE_HINT = {
    "voc": "prepare it with tools/prepare_voc.py --voc VOCdevkit/VOC2012 --sbd benchmark_RELEASE",
    "coco": "prepare it with tools/prepare_coco.py --coco <coco root> --out <root>",
    "custom": "see caee/data/custom.py for the expected layout",
    "synthetic": "caee.data.ensure_dataset (called by every stage) generates it",
}


# ---------------------------------------------------------------- the index


@dataclasses.dataclass
class SplitIndex:
    """The images of one split: ids, multi-hot labels and where the files are.

    labels: (N, C) float32 multi-hot image-level labels over the C foreground classes.
    """
    ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    image_paths: list[Path] = dataclasses.field(repr=False)
    mask_dir: Path | None = None
    eval_mask_dir: Path | None = None
    split: str = ""
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image_path(self, i: int) -> Path:
        return self.image_paths[i]

    def mask_path(self, i: int) -> Path | None:
        """Training mask of image ``i``; None when the dataset has no training mask folder.

        The path is returned whenever the folder exists; the file itself may be missing.
        """
        return None if self.mask_dir is None else self.mask_dir / f"{self.ids[i]}.png"

    def eval_mask_path(self, i: int) -> Path | None:
        """Evaluation ground truth of image ``i``; None when there is no ground-truth folder.

        The path is returned whenever the folder exists; not every image need have a file there
        (VOC: only the 1,464 train / 1,449 val images do), so callers check ``exists()``.
        """
        return None if self.eval_mask_dir is None else self.eval_mask_dir / f"{self.ids[i]}.png"

    def subset(self, indices) -> "SplitIndex":
        """A new index holding images ``indices`` (in that order)."""
        idx = [int(i) for i in indices]
        return dataclasses.replace(self, ids=[self.ids[i] for i in idx], labels=self.labels[idx],
                                   image_paths=[self.image_paths[i] for i in idx])


# ---------------------------------------------------------------- public entry points


def dataset_class_names(data_cfg: DataConfig) -> list[str]:
    """Foreground class names (C of them; label k = names[k - 1])."""
    ds = data_cfg.dataset
    if ds == "voc":
        return list(VOC_CLASSES)
    if ds == "coco":
        return list(COCO_CLASSES)
    if ds == "synthetic":
        path = Path(data_cfg.root) / "class_names.txt"
        if path.is_file():
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if len(names) != data_cfg.synthetic.num_classes:
                raise CaeeError(
                    f"{path} lists {len(names)} classes but data.synthetic.num_classes = "
                    f"{data_cfg.synthetic.num_classes}; delete {data_cfg.root} to regenerate or fix the config")
            return names
        return synthetic_class_names(data_cfg.synthetic.num_classes)
    if ds == "custom":
        from caee.data.custom import read_labels_csv

        return read_labels_csv(_labels_csv_path(data_cfg))[0]
    raise CaeeError(f"config key 'data.dataset': unknown dataset {ds!r}")


def ensure_dataset(data_cfg: DataConfig) -> None:
    """Make sure ``data.root`` holds the dataset: generate the synthetic one if needed, else check it exists."""
    root = Path(data_cfg.root)
    if data_cfg.dataset == "synthetic":
        from caee.data.synthetic import ensure_synthetic

        ensure_synthetic(root, data_cfg.synthetic)
        return
    if not root.is_dir():
        raise CaeeError(f"data.root = {root} does not exist (dataset: {data_cfg.dataset}); set data.root to the "
                        f"dataset folder; {_PREPARE_HINT.get(data_cfg.dataset, '')}")


def split_file(data_cfg: DataConfig, split: str) -> Path:
    """Where the list of ``split`` lives."""
    root = Path(data_cfg.root)
    if split.endswith(".txt"):
        return root / split  # an absolute path stays as it is
    return root / SPLIT_DIR / f"{split}.txt"


_PLAIN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def read_split_file(path: str | os.PathLike) -> list[str]:
    """Image ids listed in ``path``, '#' comments and blank lines skipped, a UTF-8 BOM and CRLF
    line ends accepted.

    A line is an id, used verbatim (``train_00007.v2`` stays that id), or PSA's
    ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` whose first path's file name without its
    image extension is the id. Anything else (spaces inside an id, '..' anywhere, an empty file
    name) is refused, and so is an id listed twice (it would count twice in every mean)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from Windows editors is not part of the first id
    except FileNotFoundError:
        raise CaeeError(f"split list not found: {path}; check data.root and the split name (expected "
                        f"<root>/{SPLIT_DIR}/<split>.txt)") from None
    except IsADirectoryError:
        raise CaeeError(f"split list {path} is a folder, not a text file; check data.root and the split name") from None
    except UnicodeDecodeError as e:
        raise CaeeError(f"{path}: not UTF-8 text (byte {e.start}); save the split list as UTF-8") from None
    first_line: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            image_id = _line_id(line, path, n)
            if image_id in first_line:
                raise CaeeError(f"{path} line {n}: image {image_id!r} is already listed on line "
                                f"{first_line[image_id]}; list each image once")
            first_line[image_id] = n
    if not first_line:
        raise CaeeError(f"split list {path} is empty")
    return list(first_line)


def _line_id(line: str, path: Path, n: int) -> str:
    tokens = line.split()
    if any(".." in t.replace("\\", "/").split("/") for t in tokens):
        raise CaeeError(f"{path} line {n}: {line!r} has a '..' component; list plain image ids or "
                        "/JPEGImages/<id>.jpg paths")
    if "/" in tokens[0] and len(tokens) <= 2:  # PSA style: image path [mask path]
        name = tokens[0].rsplit("/", 1)[-1]
        stem, dot, ext = name.rpartition(".")
        image_id = stem if dot and f".{ext.lower()}" in IMAGE_EXTS else name
    elif len(tokens) == 1:
        image_id = tokens[0]
    else:
        raise CaeeError(f"{path} line {n}: {line!r} is not one image id (ids cannot contain spaces)")
    if not image_id:
        raise CaeeError(f"{path} line {n}: {line!r} names no image (an empty file name); list <id> or "
                        "/JPEGImages/<id>.jpg")
    if not _PLAIN_ID.fullmatch(image_id) or ".." in image_id:
        raise CaeeError(f"{path} line {n}: {image_id!r} is not a plain image id (letters, digits, '_', '-', '.'; "
                        "no folders or spaces)")
    return image_id


def load_split(data_cfg: DataConfig, split: str) -> SplitIndex:
    """Index of the images of ``split`` with their image-level labels; checks every image exists."""
    root = Path(data_cfg.root)
    if not root.is_dir():
        raise CaeeError(f"data.root = {root} does not exist; {_PREPARE_HINT.get(data_cfg.dataset, '')}")
    names = dataset_class_names(data_cfg)
    list_path = split_file(data_cfg, split)
    ids = read_split_file(list_path)
    image_paths = _resolve_images(data_cfg, ids, list_path)
    mask_dir = _existing_dir(root / data_cfg.mask_dir) if data_cfg.mask_dir else None
    eval_dir = _existing_dir(root / data_cfg.eval_mask_dir) if data_cfg.eval_mask_dir else None
    if mask_dir is None and eval_dir is not None and data_cfg.mask_dir:
        logger.warning("data.mask_dir %s does not exist; using the ground truth in %s as training masks",
                       root / data_cfg.mask_dir, eval_dir)
        mask_dir = eval_dir
    if data_cfg.labels_csv or data_cfg.dataset == "custom":
        labels = _labels_from_csv(data_cfg, ids, names)
    else:
        labels = _labels_from_masks(root, ids, image_paths, len(names), mask_dir, eval_dir)
    return SplitIndex(ids=ids, labels=labels.astype(np.float32), class_names=names, image_paths=image_paths,
                      mask_dir=mask_dir, eval_mask_dir=eval_dir, split=split, root=root)


# ---------------------------------------------------------------- images


def _existing_dir(path: Path) -> Path | None:
    return path if path.is_dir() else None


def _image_dirs(data_cfg: DataConfig) -> list[Path]:
    root = Path(data_cfg.root)
    dirs = [root / data_cfg.image_dir]
    if data_cfg.dataset == "coco":  # the original COCO folders work without the JPEGImages links
        dirs += [root / "train2014", root / "val2014"]
    return dirs


def _resolve_images(data_cfg: DataConfig, ids: list[str], list_path: Path) -> list[Path]:
    """Path of every image (first existing extension); CaeeError listing the first missing ones."""
    listings = []
    for d in _image_dirs(data_cfg):
        try:  # one directory listing is far cheaper than a stat per candidate file
            listings.append((d, set(os.listdir(d))))
        except (FileNotFoundError, NotADirectoryError):
            continue
    if not listings:
        raise CaeeError(f"image folder {_image_dirs(data_cfg)[0]} does not exist; check data.root and data.image_dir")
    paths, missing = [], []
    for image_id in ids:
        found = next((d / (image_id + ext) for d, names in listings for ext in IMAGE_EXTS if image_id + ext in names),
                     None)
        if found is None:
            missing.append(image_id)
        paths.append(found)
    if missing:
        where = " or ".join(str(d) for d, _ in listings)
        raise CaeeError(f"{len(missing)} of {len(ids)} images listed in {list_path} are missing from {where} "
                        f"(first: {', '.join(missing[:5])}; looked for {'/'.join(IMAGE_EXTS[:3])}); check data.root / "
                        "data.image_dir or remove them from the list")
    return paths


# ---------------------------------------------------------------- labels


def check_label_values(label: np.ndarray, num_classes: int, path: str | os.PathLike) -> None:
    """CaeeError when ``label`` holds values outside {0..C, 255}."""
    bad = (label > num_classes) & (label != 255)
    if bad.any():
        values = sorted(set(np.unique(label[bad]).tolist()))[:8]
        raise CaeeError(f"{path}: label values {values} outside 0..{num_classes} and 255 (the dataset has "
                        f"{num_classes} classes); fix or regenerate this label map")


def labels_from_mask(label: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) uint8 multi-hot: classes 1..C present in ``label`` (values already checked)."""
    counts = np.bincount(label.ravel(), minlength=256)
    return (counts[1:num_classes + 1] > 0).astype(np.uint8)


def check_mask_size(label: np.ndarray, image_path: str | os.PathLike, path: str | os.PathLike) -> None:
    """CaeeError when the (H, W) mask read from ``path`` is not the size of its image (header read only).

    An unreadable image is left to the image reader, which names it where the image is used
    (evaluating a folder of predictions reads the masks but not the images)."""
    from PIL import Image

    try:
        with Image.open(image_path) as img:
            width, height = img.size
    except (OSError, SyntaxError):
        return
    if label.shape != (height, width):
        raise CaeeError(f"{path}: mask is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
                        f"{width}x{height}; fix or regenerate the mask")


def _mask_labels(paths: tuple[Path, ...], image_path: Path, num_classes: int) -> np.ndarray:
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise CaeeError(f"mask {not_found(paths[0])}; image-level labels are derived from the masks, so every "
                        "listed image needs one (or give the labels in a CSV via data.labels_csv)")
    label = load_label_png(path)
    check_label_values(label, num_classes, path)
    check_mask_size(label, image_path, path)
    return labels_from_mask(label, num_classes)


def _labels_from_masks(root: Path, ids: list[str], image_paths: list[Path], num_classes: int,
                       mask_dir: Path | None, eval_dir: Path | None) -> np.ndarray:
    """(N, C) uint8 labels of ``ids``, from the cache when present, else computed from the masks and cached."""
    source = "masks:" + ",".join(str(d.resolve()) for d in (mask_dir, eval_dir) if d is not None)
    cache = load_labels_cache(root, num_classes, source)
    todo = [i for i in ids if i not in cache]
    if todo:
        dirs = [d for d in (mask_dir, eval_dir) if d is not None]
        if not dirs:
            raise CaeeError(f"no masks under {root} to derive image-level labels from (neither data.mask_dir nor "
                            "data.eval_mask_dir exists); add masks or give the labels in a CSV via data.labels_csv")
        candidates = [tuple(d / f"{i}.png" for d in dirs) for i in todo]
        image_of = dict(zip(ids, image_paths))
        workers = min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            rows = list(tqdm(ex.map(_mask_labels, candidates, [image_of[i] for i in todo], [num_classes] * len(todo),
                                    chunksize=64),
                             total=len(todo), desc="image labels from masks", disable=len(todo) < 2000,
                             leave=False))
        cache.update(zip(todo, rows))
        _store_labels_cache(root, cache, num_classes, source)
    return np.stack([cache[i] for i in ids]).astype(np.uint8)


def _user_cache_path(root: Path) -> Path:
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "caee" / f"cls_labels_{key}.npz"


def read_labels_cache(path: str | os.PathLike, num_classes: int) -> dict[str, np.ndarray]:
    """id -> (C,) uint8 from a labels .npz; CaeeError when unreadable or holding another class count."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, labels = z["ids"], z["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise CaeeError(f"{path}: unreadable image-label cache ({e}); delete it and it will be rebuilt from the masks") \
            from None
    if labels.ndim != 2 or labels.shape[0] != ids.shape[0] or labels.shape[1] != num_classes:
        raise CaeeError(f"{path}: image labels have shape {labels.shape} but the dataset has {num_classes} classes "
                        "(a labels file from another dataset?); delete it and it will be rebuilt from the masks")
    return {str(i): row.astype(np.uint8) for i, row in zip(ids, labels)}


def _labels_source(path: Path) -> str:
    """What a labels cache records it was derived from ("" when it records nothing)."""
    with contextlib.suppress(OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        with np.load(path, allow_pickle=False) as z:
            return str(z["source"]) if "source" in z.files else ""
    return ""


def load_labels_cache(root: Path, num_classes: int, source: str = "") -> dict[str, np.ndarray]:
    """The cached labels of ``root`` (its own cls_labels.npz first, then the per-user cache).

    source: the masks the caller derives labels from (``masks:<dirs>``); a cache derived from other
    masks (another data.mask_dir under the same root) is left out, not reused."""
    out: dict[str, np.ndarray] = {}
    for path in (_user_cache_path(root), root / LABELS_CACHE):
        if path.is_file():
            recorded = _labels_source(path)
            if source and recorded.startswith("masks:") and recorded != source:
                logger.info("%s holds labels derived from other masks (%s); they are derived again", path,
                            recorded.removeprefix("masks:"))
                continue
            out.update(read_labels_cache(path, num_classes))
    return out


def _store_labels_cache(root: Path, cache: dict[str, np.ndarray], num_classes: int, source: str) -> None:
    ids = sorted(cache)
    labels = np.stack([cache[i] for i in ids]) if ids else np.zeros((0, num_classes), np.uint8)
    for path in (root / LABELS_CACHE, _user_cache_path(root)):
        try:
            save_labels_cache(path, ids, labels, source)
            return
        except (OSError, CaeeError) as e:  # the writer names a read-only / full disk in a CaeeError
            logger.debug("cannot write %s: %s", path, e)
    logger.warning("cannot cache image-level labels under %s or %s; they are kept in memory only and recomputed "
                   "next time", root, _user_cache_path(root).parent)


def _labels_csv_path(data_cfg: DataConfig) -> Path:
    if not data_cfg.labels_csv:
        raise CaeeError("config key 'data.labels_csv' must name the labels CSV for dataset: custom "
                        "(see caee/data/custom.py for the format)")
    path = Path(data_cfg.labels_csv)
    if not path.is_absolute() and not path.is_file():
        path = Path(data_cfg.root) / path
    return path


def _labels_from_csv(data_cfg: DataConfig, ids: list[str], names: list[str]) -> np.ndarray:
    from caee.data.custom import read_labels_csv

    path = _labels_csv_path(data_cfg)
    csv_names, table = read_labels_csv(path)
    if len(csv_names) != len(names):
        raise CaeeError(f"{path} has {len(csv_names)} class columns but dataset {data_cfg.dataset!r} has "
                        f"{len(names)} classes; fix the CSV header (image_id,<class_1>,...,<class_C>)")
    missing = [i for i in ids if i not in table]
    if missing:
        raise CaeeError(f"{len(missing)} images of the split have no row in {path} (first: {', '.join(missing[:5])}); "
                        "add them to the CSV")
    return np.stack([table[i] for i in ids])
