"""AffinityNet training labels from the low/high-alpha CRF results of the CAMs (PSA, docs/METHOD.md §6).

Two rules (``train_affinity.label_rule``):

``psa`` (default, PSA's train_aff.py): the image and the la / ha CRF *posteriors* are cropped
(zero padding) and flipped together, the posteriors average-pooled over ``stride x stride`` cells;
per cell: argmax of la and of ha; label = la's class; la background -> 255 (unsure); ha
background -> 0; largest pooled score < 1e-5 (a cell of crop padding) -> 255.
Storage: the crops are not rescaled, so every cell a crop can produce is a ``stride x stride``
window of the image at an integer offset, clipped by the image border (the padding adds zeros).
:func:`cell_label_table` evaluates the rule once for every such window, from the float
posteriors, and stores the result: one uint8 per window, ``(H+s-1) x (W+s-1)``, as a PNG in
``cell_label_dir(cam_dir, la, ha, stride)``. A crop's cell labels are then a lookup
(:func:`cells_from_table`), the same numbers as pooling the cropped posteriors (the argmax of a
mean is the argmax of the sum; a horizontal flip of a crop whose size is a multiple of the stride
flips whole cells). Exact up to float rounding where two pooled scores tie to ~1e-7 (the sums
are float64, PSA's means float32), and far smaller than the posteriors (README).

``top_left`` (caee's earlier rule): the argmax label PNGs of each alpha are merged per pixel and
the top-left pixel of each cell is taken. Details below.

The CRF label PNGs live in one folder per alpha next to the CAM folder (the stage names them;
make_cam.py writes them when ``cam.crf_alphas`` lists the alphas). Missing ones are computed here from the
CAMs with :func:`caee.method.crf.crf_cam_labels` and cached into those folders, so a second run (or the
pseudo-label stage) reads them back.

Per training sample: both maps go through the same joint augmentation as the image (crop padding
= 255, "no score"), then :func:`caee.method.affinity.confident_labels` merges them and
:func:`caee.method.affinity.downsample_labels` takes them to the feature grid (stride 8).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from caee.core import distributed

from caee.core import provenance
from caee.method.affinity import confident_labels, downsample_labels
from caee.core.config import CrfConfig
from caee.method.crf import crf_cam_labels, dense_crf, label_folder_settings
from caee.data import SegmentationDataset, SplitIndex
from caee.data.splits import check_label_values
from caee.data.transforms import AffinityAugment, CropBox
from caee.core.errors import CaeeError
from caee.core.io import claim_folder, load_cam_npz, load_image, load_label_png, save_label_png
from caee.core.layout import cell_label_dir
from caee.core.parallel import run_pool, workers_for

logger = logging.getLogger(__name__)


def _crf_job(job: tuple[str, str, list[tuple[float, str]], CrfConfig, int]) -> int:
    """One image: CRF labels at every missing alpha from one CAM load. Returns the files written."""
    image_path, cam_path, todo, params, num_classes = job
    image = load_image(image_path)
    keys, cams = load_cam_npz(cam_path, num_classes)  # a key out of range would write a wrong label
    if cams.shape[1:] != image.shape[:2]:
        raise CaeeError(f"{cam_path}: CAMs are {cams.shape[2]}x{cams.shape[1]} but the image {image_path} is "
                        f"{image.shape[1]}x{image.shape[0]}; regenerate the CAMs with make_cam.py")
    for alpha, out_path in todo:
        save_label_png(out_path, crf_cam_labels(image, keys, cams, alpha, params))
    return len(todo)


def _require_cams(paths: list[str], index: SplitIndex, what: str) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise CaeeError(f"{len(missing)} CAM files needed for {what} are missing (first: {', '.join(missing[:3])}); "
                        f"run make_cam.py for split '{index.split}' or set train_affinity.cam_dir")


def ensure_crf_labels(index: SplitIndex, cam_dir: str | Path, crf_dirs: Mapping[float, Path], crf_cfg: CrfConfig,
                      workers: int | None = None, overwrite: bool = False) -> dict[float, Path]:
    """Make sure ``crf_dirs[a]/<id>.png`` exists for every image of ``index`` and alpha ``a``
    (the stage names the folders: next to the CAM folder).

    Each folder records what made its labels (:func:`caee.method.crf.label_folder_settings`): labels made
    from other CAMs or with other CRF settings are refused, or with ``overwrite`` recomputed (only
    in such a folder: AffinityNet's own settings do not change these labels).
    Missing PNGs are computed from ``<cam_dir>/<id>.npz`` in a process pool (``workers``: None =
    ``crf.workers``), each rank of a torchrun group taking its share; all ranks wait for each other
    at the end. Returns ``{alpha: folder}``.
    """
    cam_dir = Path(cam_dir)
    dirs = {float(a): Path(d) for a, d in crf_dirs.items()}
    cams = provenance.folder_fingerprint(cam_dir)
    settings = {a: label_folder_settings(cams, a, crf_cfg) for a in dirs}
    # every rank decides which folders hold other labels before rank 0 rewrites their records
    redo = {a for a, d in dirs.items() if next(d.glob("*.png"), None) is not None
            and provenance.folder_fingerprint(d) != provenance.fingerprint(settings[a])}
    distributed.barrier()
    if distributed.is_main():
        for a in sorted(redo):  # all checked before any record changes
            provenance.refuse_other_settings(dirs[a], settings[a], "train_affinity", overwrite, True)
        for a, d in dirs.items():
            claim_folder(d)  # locked; a killed run's temp files removed
            provenance.record_settings(d, settings[a])
    distributed.barrier()
    jobs = []
    for i, image_id in enumerate(index.ids):
        todo = [(a, str(d / f"{image_id}.png")) for a, d in dirs.items()
                if a in redo or not (d / f"{image_id}.png").is_file()]
        if todo:
            jobs.append((str(index.image_path(i)), str(cam_dir / f"{image_id}.npz"), todo, crf_cfg, index.num_classes))
    if jobs:
        _require_cams([j[1] for j in jobs], index, "the CRF labels")
        n_files = sum(len(j[2]) for j in jobs)
        logger.info("computing %d CRF label maps (alphas %s) of %d images from %s",
                    n_files, ", ".join(f"{a:g}" for a in dirs), len(jobs), cam_dir)
        for d in dirs.values():
            claim_folder(d, main=distributed.is_main())
        mine = distributed.shard(jobs)
        run_pool(_crf_job, mine, workers if workers is not None else workers_for(crf_cfg.workers))
    distributed.barrier()
    return dirs


# ---------------------------------------------------------------- PSA's rule on pooled posteriors

NO_SCORE = 1e-5  # PSA: a cell whose largest pooled score (la or ha) is below this has no score -> 255
IGNORE = 255


def cam_crf_scores(cams: np.ndarray, alpha: float) -> np.ndarray:
    """``(K, H, W)`` CAMs -> ``(1+K, H, W)`` CRF input: background ``(1 - max_c cam)^alpha``, then
    the CAMs (PSA's scores, as :func:`caee.method.crf.crf_cam_labels` builds them)."""
    cams = np.asarray(cams, dtype=np.float32)
    bg = np.power(1.0 - np.clip(cams.max(axis=0), 0.0, 1.0), alpha)[None]
    return np.concatenate([bg, cams], axis=0)


def _window_sums(scores: np.ndarray, s: int) -> np.ndarray:
    """``(L, H, W)`` -> ``(L, H+s-1, W+s-1)`` float64: sums over every ``s x s`` window that meets
    the image, the image padded with zeros; entry ``[a, b]`` is the window at ``(a-s+1, b-s+1)``."""
    n, h, w = scores.shape
    padded = np.pad(scores.astype(np.float64), ((0, 0), (s - 1, s - 1), (s - 1, s - 1)))
    c = np.zeros((n, h + 2 * s - 1, w + 2 * s - 1))
    c[:, 1:, 1:] = padded.cumsum(1).cumsum(2)
    return c[:, s:, s:] - c[:, :-s, s:] - c[:, s:, :-s] + c[:, :-s, :-s]


def cell_label_table(la_post: np.ndarray, ha_post: np.ndarray, stride: int,
                     label_values: np.ndarray | None = None) -> np.ndarray:
    """PSA's cell label of every ``stride x stride`` window of the image.

    la_post, ha_post: ``(L, H, W)`` CRF posteriors at the low and high alpha, channel 0 the
    background, the same class in the same channel of both. label_values: ``(L,)`` label of each
    channel (default ``0..L-1``). Returns ``(H+s-1, W+s-1)`` uint8: entry ``[a, b]`` is the label of
    the window whose top-left pixel is ``(a-s+1, b-s+1)`` (rows/columns outside the image count 0,
    like PSA's crop padding): la's class; 255 where la's argmax is background; 0 where ha's is;
    255 where the largest mean score of both is below 1e-5. Ties go to the first channel.
    """
    if la_post.shape != ha_post.shape or la_post.ndim != 3:
        raise CaeeError(f"la and ha posteriors must be (L, H, W) of one shape, got {la_post.shape} and {ha_post.shape}")
    lut = np.arange(la_post.shape[0]) if label_values is None else np.asarray(label_values).reshape(-1)
    la_sum, ha_sum = _window_sums(la_post, stride), _window_sums(ha_post, stride)
    no_score = np.maximum(la_sum.max(0), ha_sum.max(0)) < NO_SCORE * stride * stride
    la_arg, ha_arg = la_sum.argmax(0), ha_sum.argmax(0)
    out = lut.astype(np.uint8)[la_arg]
    out[la_arg == 0] = IGNORE
    out[ha_arg == 0] = 0
    out[no_score] = IGNORE
    return out


def cell_table_from_cams(image: np.ndarray, keys: np.ndarray, cams: np.ndarray, la_alpha: float,
                         ha_alpha: float, stride: int, params: CrfConfig | None = None) -> np.ndarray:
    """:func:`cell_label_table` of the la / ha CRF posteriors of ``cams`` (``(K, H, W)``, classes
    ``keys``, 0-based) on ``image`` ``(H, W, 3)`` uint8; labels ``0`` and ``keys + 1``."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    h, w = image.shape[:2]
    if keys.size == 0:  # background only: la and ha both say background -> 0 everywhere
        return np.zeros((h + stride - 1, w + stride - 1), np.uint8)
    la = dense_crf(image, cam_crf_scores(cams, la_alpha), params)
    ha = dense_crf(image, cam_crf_scores(cams, ha_alpha), params)
    return cell_label_table(la, ha, stride, np.concatenate([[0], keys + 1]))


def cells_from_table(table: np.ndarray, box: CropBox, flip: bool, crop: int, stride: int) -> np.ndarray:
    """The ``(crop/s, crop/s)`` uint8 cell labels of a crop (box, then flip) from its image's table.

    Cell ``(i, j)`` of the crop covers output pixels ``[s*i, s*i+s) x [s*j, s*j+s)``, which come
    from the image window at ``(img_top - cont_top + s*i, img_left - cont_left + s*j)``; cells whose
    window misses the image are crop padding (255).
    """
    n = crop // stride
    ys = box.img_top - box.cont_top + stride * np.arange(n) + stride - 1
    xs = box.img_left - box.cont_left + stride * np.arange(n) + stride - 1
    vy = (ys >= 0) & (ys < table.shape[0])
    vx = (xs >= 0) & (xs < table.shape[1])
    out = np.full((n, n), IGNORE, np.uint8)
    out[np.ix_(vy, vx)] = table[np.ix_(ys[vy], xs[vx])]
    return np.ascontiguousarray(out[:, ::-1]) if flip else out


def _cell_job(job: tuple[str, str, str, float, float, int, CrfConfig, int]) -> None:
    image_path, cam_path, out_path, la_alpha, ha_alpha, stride, params, num_classes = job
    image = load_image(image_path)
    keys, cams = load_cam_npz(cam_path, num_classes)  # a key >= 255 would wrap to background in the uint8 table
    if cams.shape[1:] != image.shape[:2]:
        raise CaeeError(f"{cam_path}: CAMs are {cams.shape[2]}x{cams.shape[1]} but the image {image_path} is "
                        f"{image.shape[1]}x{image.shape[0]}; regenerate the CAMs with make_cam.py")
    save_label_png(out_path, cell_table_from_cams(image, keys, cams, la_alpha, ha_alpha, stride, params))


def _table_settings(cam_dir: Path, la_alpha: float, ha_alpha: float, stride: int, crf_cfg: CrfConfig) -> dict:
    """What determines a cell table: the CRF settings, alphas, stride and the CAMs (the fingerprint
    make_cam recorded in the CAM folder; None for a folder made elsewhere)."""
    cams = provenance.folder_fingerprint(cam_dir)
    crf = {f"crf.{k}": v for k, v in dataclasses.asdict(crf_cfg).items() if k != "workers"}
    return {**crf, "la_alpha": float(la_alpha), "ha_alpha": float(ha_alpha), "stride": int(stride), "cams": cams}


def ensure_cell_tables(index: SplitIndex, cam_dir: str | Path, la_alpha: float, ha_alpha: float, stride: int,
                       crf_cfg: CrfConfig, workers: int | None = None, overwrite: bool = False) -> Path:
    """Make sure ``cell_label_dir(cam_dir, la, ha, stride)/<id>.png`` (:func:`cell_table_from_cams`)
    exists for every image of ``index``; missing ones are computed from ``<cam_dir>/<id>.npz`` in
    a process pool, each rank of a torchrun group taking its share. Returns the folder.

    The folder records what made its tables (CRF settings, alphas, stride, the CAM folder's
    settings): tables made otherwise are refused, or with ``overwrite`` recomputed."""
    cam_dir = Path(cam_dir)
    out_dir = cell_label_dir(cam_dir, la_alpha, ha_alpha, stride)
    if distributed.is_main():
        claim_folder(out_dir)  # locked; a killed run's temp files removed
        if overwrite:
            for p in out_dir.glob("*.png"):
                p.unlink()
        provenance.check_folder(out_dir, _table_settings(cam_dir, la_alpha, ha_alpha, stride, crf_cfg),
                                "train_affinity", overwrite, any(out_dir.glob("*.png")))
    distributed.barrier()
    params = crf_cfg
    jobs = [(str(index.image_path(i)), str(cam_dir / f"{image_id}.npz"), str(out_dir / f"{image_id}.png"),
             float(la_alpha), float(ha_alpha), stride, params, index.num_classes)
            for i, image_id in enumerate(index.ids) if not (out_dir / f"{image_id}.png").is_file()]
    if jobs:
        _require_cams([j[1] for j in jobs], index, "the affinity labels")
        logger.info("computing %d cell label tables (CRF alphas %g / %g, stride %d) from %s -> %s",
                    len(jobs), la_alpha, ha_alpha, stride, cam_dir, out_dir)
        run_pool(_cell_job, distributed.shard(jobs), workers if workers is not None else workers_for(crf_cfg.workers))
    distributed.barrier()
    return out_dir


class CellLabelDataset(Dataset):
    """AffinityNet samples with PSA's labels (``label_rule: psa``).

    Items: ``image`` float (3, crop, crop) normalised (:class:`caee.data.transforms.AffinityAugment`);
    ``aff_label`` uint8 (crop/s, crop/s) (0 = bg, 1..C, 255 = unsure / padding); ``crop_box`` long
    (7,): the box (:meth:`CropBox.as_list`) and the flip; ``idx``, ``id``.
    """

    def __init__(self, index: SplitIndex, table_dir: str | Path, augment: AffinityAugment, stride: int):
        if augment.crop_size % stride:
            raise CaeeError(f"train_affinity.crop_size={augment.crop_size} must be a multiple of the feature "
                            f"stride {stride}")
        self.index, self.table_dir, self.augment, self.stride = index, Path(table_dir), augment, stride

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(load_image(self.index.image_path(i))).permute(2, 0, 1)
        path = self.table_dir / f"{self.index.ids[i]}.png"
        table = load_label_png(path)
        h, w = image.shape[-2:]
        s = self.stride
        if table.shape != (h + s - 1, w + s - 1):
            raise CaeeError(f"{path}: cell label table is {table.shape[1]}x{table.shape[0]}, expected "
                            f"{w + s - 1}x{h + s - 1} for its {w}x{h} image at stride {s}; delete the folder to rebuild it")
        check_label_values(table, self.index.num_classes, path)
        box, flip = self.augment.draw(h, w)
        cells = cells_from_table(table, box, flip, self.augment.crop_size, s)
        return {"image": self.augment.image(image, box, flip), "aff_label": torch.from_numpy(cells),
                "crop_box": torch.tensor(box.as_list() + [int(flip)]), "idx": i, "id": self.index.ids[i]}


# ---------------------------------------------------------------- top-left pixel of argmax labels


class AffinityLabelDataset(Dataset):
    """Items: ``image`` float (3, h, w) normalised; ``aff_label`` uint8 ``(ceil(h/stride), ceil(w/stride))``
    confident labels on the feature grid (0 = bg, 1..C, 255 = unsure / no score); ``idx``, ``id``.

    ``la_dir`` / ``ha_dir``: the low- and high-alpha CRF label folders; ``transform`` the joint
    training transform (its crop pads labels with 255).
    """

    def __init__(self, index: SplitIndex, la_dir: str | Path, ha_dir: str | Path, transform=None,
                 stride: int = 8):
        self.base = SegmentationDataset(index, {"la": la_dir, "ha": ha_dir}, transform)
        self.stride = stride

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        label = confident_labels(item["la"].to(torch.uint8), item["ha"].to(torch.uint8))
        return {"image": item["image"], "aff_label": downsample_labels(label, self.stride),
                "idx": item["idx"], "id": item["id"]}
