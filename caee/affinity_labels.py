"""AffinityNet training labels from the low/high-alpha CRF labels of the CAMs (PSA, docs/METHOD.md §6).

The CRF label PNGs live in one folder per alpha next to the CAM folder (the stage names them;
make_cam.py writes them when ``cam.crf_alphas`` lists the alphas). Missing ones are computed here from the
CAMs with :func:`caee.crf.crf_cam_labels` and cached into those folders, so a second run (or the
pseudo-label stage) reads them back.

Per training sample: both maps go through the same joint augmentation as the image (crop padding
= 255, "no score"), then :func:`caee.affinity.confident_labels` merges them and
:func:`caee.affinity.downsample_labels` takes them to the feature grid (stride 8).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from torch.utils.data import Dataset

from caee import distributed
from caee.affinity import confident_labels, downsample_labels
from caee.config import CrfConfig
from caee.crf import crf_cam_labels
from caee.data import SegmentationDataset, SplitIndex
from caee.errors import CaeeError
from caee.io import load_cam_npz, load_image, save_label_png
from caee.parallel import run_pool, workers_for

logger = logging.getLogger(__name__)


def _crf_job(job: tuple[str, str, list[tuple[float, str]], CrfConfig]) -> int:
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


def ensure_crf_labels(index: SplitIndex, cam_dir: str | Path, crf_dirs: Mapping[float, Path], crf_cfg: CrfConfig,
                      workers: int | None = None) -> dict[float, Path]:
    """Make sure ``crf_dirs[a]/<id>.png`` exists for every image of ``index`` and alpha ``a``
    (the stage names the folders: next to the CAM folder).

    Missing PNGs are computed from ``<cam_dir>/<id>.npz`` in a process pool (``workers``: None =
    ``crf.workers``), each rank of a torchrun group taking its share; all ranks wait for each other
    at the end. Returns ``{alpha: folder}``.
    """
    cam_dir = Path(cam_dir)
    dirs = {float(a): Path(d) for a, d in crf_dirs.items()}
    jobs = []
    for i, image_id in enumerate(index.ids):
        todo = [(a, str(d / f"{image_id}.png")) for a, d in dirs.items() if not (d / f"{image_id}.png").is_file()]
        if todo:
            jobs.append((str(index.image_path(i)), str(cam_dir / f"{image_id}.npz"), todo, crf_cfg))
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
        run_pool(_crf_job, mine, workers if workers is not None else workers_for(crf_cfg.workers))
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
