"""AffinityNet training labels from the low/high-alpha CRF labels of the CAMs (PSA, METHOD.md section 6).

The CRF label PNGs live next to the CAM folder: ``crf_dir(cam_dir, alpha)/<id>.png`` (make_cam.py
writes them when ``cam.crf_alphas`` lists the alphas). Missing ones are computed here from the
CAMs with :func:`caee.crf.crf_cam_labels` and cached into those folders, so a second run (or the
pseudo-label stage) reads them back.

Per training sample: both maps go through the same joint augmentation as the image (crop padding
= 255, "no score"), then :func:`caee.affinity.confident_labels` merges them and
:func:`caee.affinity.downsample_labels` takes them to the feature grid (stride 8).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from caee import distributed
from caee.affinity import confident_labels, downsample_labels
from caee.config import CrfConfig
from caee.crf import CrfParams, crf_cam_labels, run_pool
from caee.data import SegmentationDataset, SplitIndex
from caee.errors import CaeeError
from caee.io import load_cam_npz, load_image, save_label_png
from caee.stages.common import crf_dir

logger = logging.getLogger(__name__)


def crf_params(crf_cfg: CrfConfig) -> CrfParams:
    """The :class:`CrfParams` of the config's ``crf`` section."""
    return CrfParams(iterations=crf_cfg.iterations, gaussian_sxy=crf_cfg.gaussian_sxy,
                     gaussian_compat=crf_cfg.gaussian_compat, bilateral_sxy=crf_cfg.bilateral_sxy,
                     bilateral_srgb=crf_cfg.bilateral_srgb, bilateral_compat=crf_cfg.bilateral_compat,
                     min_prob=crf_cfg.min_prob)


def crf_workers(crf_cfg: CrfConfig) -> int | None:
    """``crf.workers`` for :func:`caee.crf.run_pool` (0 = all cores -> None)."""
    return None if crf_cfg.workers <= 0 else crf_cfg.workers


def _crf_job(job: tuple[str, str, list[tuple[float, str]], CrfParams]) -> int:
    """One image: CRF labels at every missing alpha from one CAM load. Returns the files written."""
    image_path, cam_path, todo, params = job
    image = load_image(image_path)
    keys, cams = load_cam_npz(cam_path)
    if cams.shape[1:] != image.shape[:2]:
        raise CaeeError(f"{cam_path}: CAMs are {cams.shape[2]}x{cams.shape[1]} but the image {image_path} is "
                        f"{image.shape[1]}x{image.shape[0]}; regenerate the CAMs with make_cam.py")
    for alpha, out_path in todo:
        save_label_png(out_path, crf_cam_labels(image, keys, cams, alpha, params))
    return len(todo)


def ensure_crf_labels(index: SplitIndex, cam_dir: str | Path, alphas: Sequence[float], crf_cfg: CrfConfig,
                      workers: int | None = None) -> dict[float, Path]:
    """Make sure ``crf_dir(cam_dir, a)/<id>.png`` exists for every image of ``index`` and alpha ``a``.

    Missing PNGs are computed from ``<cam_dir>/<id>.npz`` in a process pool (``workers``: None =
    ``crf.workers``), each rank of a torchrun group taking its share; all ranks wait for each other
    at the end. Returns ``{alpha: folder}``.
    """
    cam_dir = Path(cam_dir)
    dirs = {float(a): crf_dir(cam_dir, a) for a in alphas}
    jobs = []
    params = crf_params(crf_cfg)
    for i, image_id in enumerate(index.ids):
        todo = [(a, str(d / f"{image_id}.png")) for a, d in dirs.items() if not (d / f"{image_id}.png").is_file()]
        if todo:
            jobs.append((str(index.image_path(i)), str(cam_dir / f"{image_id}.npz"), todo, params))
    if jobs:
        missing_cams = [j[1] for j in jobs if not Path(j[1]).is_file()]
        if missing_cams:
            raise CaeeError(f"{len(missing_cams)} CAM files needed for the CRF labels are missing (first: "
                            f"{', '.join(missing_cams[:3])}); run make_cam.py for split '{index.split}' or set "
                            "train_affinity.cam_dir")
        n_files = sum(len(j[2]) for j in jobs)
        logger.info("computing %d missing CRF label maps (alphas %s) of %d images from %s",
                    n_files, ", ".join(f"{a:g}" for a in dirs), len(jobs), cam_dir)
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        mine = distributed.shard(jobs)
        run_pool(_crf_job, mine, workers if workers is not None else crf_workers(crf_cfg))
    distributed.barrier()
    return dirs


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


@dataclasses.dataclass
class LabelStats:
    """Fractions of feature pixels per kind over a set of label maps (for the log)."""
    background: float
    foreground: float
    unsure: float


def label_stats(labels: torch.Tensor) -> LabelStats:
    """labels: ``(..., h, w)`` affinity labels -> fractions of background / foreground / 255."""
    n = max(labels.numel(), 1)
    bg = int((labels == 0).sum())
    unsure = int((labels == 255).sum())
    return LabelStats(bg / n, (labels.numel() - bg - unsure) / n, unsure / n)
