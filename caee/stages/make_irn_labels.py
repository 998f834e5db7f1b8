"""Pseudo labels by IRN's semantic walk of the CAMs along the trained boundary map.

Input:  data.root (images of irn.split, default data.cam_split); the CAMs (irn.cam_dir, default
        <work_dir>/cam_cgnet); the boundary network <work_dir>/train_irn/model.pth (or irn.weights).
Output: <out_dir>/<id>.png palette label maps and <out_dir>/record.json (out_dir = irn.out_dir,
        default <work_dir>/pseudo_labels_irn).

    caee make-irn-labels --config configs/voc/r38_irn.yaml data.root=/data/VOC2012

Per image of ``irn.split`` (default ``data.cam_split``): the boundary map of the trained network
(:func:`caee.method.irn.edge_map`: image and mirror padded to ``irn.crop_size``), the image's CAMs
brought to the boundary grid (``irn.cam_grid``), the walk :func:`caee.method.irn.semantic_walk`
(``beta``, ``2^exp_times`` steps, ``radius``), and :func:`caee.method.irn.sem_seg_labels`
(upsampling, division by the maximum, background at ``sem_seg_bg_thres``).

Output: ``<out_dir>/<id>.png`` (default ``<work_dir>/pseudo_labels_irn``); existing ones are
skipped unless ``irn.overwrite``; the folder's record says the split is complete once every image has its PNG.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from caee.core import distributed
from caee.core.config import Config, expand_work_dir
from caee.core.errors import CaeeError
from caee.core.io import load_cam_npz, load_image, save_label_png
from caee.core.layout import Layout
from caee.core.logs import show_progress
from caee.data import ensure_dataset, load_split, normalize_image
from caee.method.irn import cams_to_grid, edge_map, sem_seg_labels, semantic_walk
from caee.models.irn import load_irn
from caee.stages import table
from caee.stages.common import finish_label_stage, start_label_stage

logger = logging.getLogger(__name__)

def grid_cams(cams: torch.Tensor, size: tuple[int, int], how: str, stride: int) -> torch.Tensor:
    """Full-resolution CAMs on the ``size`` boundary grid (``irn.cam_grid``)."""
    if how == "cell_mean":
        return cams_to_grid(cams, stride)
    return F.interpolate(cams.float().unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]


def describe(cfg: Config) -> tuple[str, str]:
    """The row of the results table: (output, how it was produced)."""
    ic = cfg.irn
    return ("pseudo labels (IRN)", f"IRN: boundary network on relation labels (fg {ic.conf_fg_thres:g} / bg "
            f"{ic.conf_bg_thres:g}), walk beta {ic.beta:g}, 2^{ic.exp_times} steps, radius {ic.radius}, "
            f"background {ic.sem_seg_bg_thres:g}")


def main(cfg: Config) -> Path:
    t0 = time.perf_counter()
    cfg = expand_work_dir(cfg)
    ic, row = cfg.irn, table.stage("make_irn_labels")
    weights, out_dir, cam_dir = row.input(cfg, "irn"), row.output(Layout(cfg)), row.input(cfg, "cams")
    split = ic.split or cfg.data.cam_split
    env, record = start_label_stage(cfg, "make_irn_labels", out_dir, ic.overwrite)
    ensure_dataset(cfg.data)
    index = load_split(cfg.data, split)
    distributed.barrier()
    model, _ = load_irn(weights, ic.net)
    model = model.to(env.device).eval()
    stride = model.edge_stride
    todo = [i for i, image_id in enumerate(index.ids) if ic.overwrite or not (out_dir / f"{image_id}.png").is_file()]
    mine = distributed.shard(todo)
    logger.info("IRN pseudo labels of %d images of %s (%d to do) -> %s: CAMs %s (%s), weights %s, beta %g, "
                "2^%d steps, radius %d, bg %g", len(index.ids), split, len(todo), out_dir, cam_dir, ic.cam_grid,
                weights, ic.beta, ic.exp_times, ic.radius, ic.sem_seg_bg_thres)
    for i in tqdm(mine, desc="IRN labels", disable=not show_progress(), dynamic_ncols=True):
        image_id = index.ids[i]
        image = load_image(index.image_path(i))
        keys, cams = load_cam_npz(cam_dir / f"{image_id}.npz", index.num_classes)
        if cams.shape[1:] != image.shape[:2]:
            raise CaeeError(f"{cam_dir / image_id}.npz: CAMs are {cams.shape[2]}x{cams.shape[1]} but the image "
                            f"{index.image_path(i)} is {image.shape[1]}x{image.shape[0]}; regenerate the CAMs")
        save_label_png(out_dir / f"{image_id}.png", _one_image(model, image, keys, cams, cfg, stride, env.device))
    finish_label_stage(out_dir, record, index.ids, split, t0)
    return out_dir


def _one_image(model, image: np.ndarray, keys: np.ndarray, cams: np.ndarray, cfg: Config, stride: int,
               device: torch.device) -> np.ndarray:
    ic = cfg.irn
    size = image.shape[:2]
    if keys.size == 0:
        return np.zeros(size, np.uint8)
    edge = edge_map(model, normalize_image(torch.from_numpy(image).to(device)), ic.crop_size, stride)
    grid = grid_cams(torch.from_numpy(cams).to(device), tuple(edge.shape), ic.cam_grid, stride)
    rw = semantic_walk(grid, edge, ic.beta, ic.exp_times, ic.radius)
    return sem_seg_labels(rw, keys, size, ic.sem_seg_bg_thres, stride)
