"""AffinityNet's training labels cached next to the CAM folder: CRF label folders, PSA's cell tables, and the datasets that read them.

``<cam_dir>_crf_<alpha>/<id>.png`` (the CRF labels make_cam also writes) and
``<cam_dir>_cells_<la>_<ha>_s<stride>/<id>.png`` (:func:`caee.method.affinity_labels.cell_label_table`).
Each folder's record holds what made its files (the CAM folder's run, the CRF settings, the alphas,
the stride); files made otherwise are refused, or with ``overwrite`` recomputed. Missing files are
computed from the CAMs in a process pool, each rank of a torchrun group taking its share.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Mapping

import torch
from torch.utils.data import Dataset

from caee.core import distributed
from caee.core.config import CrfConfig
from caee.core.errors import CaeeError
from caee.core.io import claim_folder, load_cam_npz, load_image, load_label_png, save_label_png
from caee.core.layout import cell_label_dir
from caee.core.parallel import run_pool, workers_for
from caee.data import SegmentationDataset, SplitIndex
from caee.data.splits import check_label_values
from caee.data.transforms import AffinityAugment
from caee.stages.common import finish_label_folders, open_label_folders, run_id
from caee.method.affinity import confident_labels, downsample_labels
from caee.method.affinity_labels import cell_table_from_cams, cells_from_table
from caee.method.crf import crf_cam_labels, label_folder_settings

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
    run = run_id(Path(cam_dir))
    open_label_folders({d: label_folder_settings(run, a, crf_cfg) for a, d in dirs.items()}, overwrite, "train_affinity")
    jobs = []
    for i, image_id in enumerate(index.ids):
        todo = [(a, str(d / f"{image_id}.png")) for a, d in dirs.items() if not (d / f"{image_id}.png").is_file()]
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
    finish_label_folders(list(dirs.values()), index.split)
    return dirs


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
    cams = run_id(Path(cam_dir))
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
    open_label_folders({out_dir: _table_settings(cam_dir, la_alpha, ha_alpha, stride, crf_cfg)}, overwrite, "train_affinity")
    params = crf_cfg
    jobs = [(str(index.image_path(i)), str(cam_dir / f"{image_id}.npz"), str(out_dir / f"{image_id}.png"),
             float(la_alpha), float(ha_alpha), stride, params, index.num_classes)
            for i, image_id in enumerate(index.ids) if not (out_dir / f"{image_id}.png").is_file()]
    if jobs:
        _require_cams([j[1] for j in jobs], index, "the affinity labels")
        logger.info("computing %d cell label tables (CRF alphas %g / %g, stride %d) from %s -> %s",
                    len(jobs), la_alpha, ha_alpha, stride, cam_dir, out_dir)
        run_pool(_cell_job, distributed.shard(jobs), workers if workers is not None else workers_for(crf_cfg.workers))
    finish_label_folders([out_dir], index.split)
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
