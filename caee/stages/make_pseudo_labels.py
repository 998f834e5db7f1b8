"""Stage 5: pseudo labels by random walk of the CAMs with AffinityNet's affinities (PSA).

Input:  data.root (images of pseudo_labels.split, default data.cam_split); the CAMs
        <work_dir>/cam_cgnet/<id>.npz (or pseudo_labels.cam_dir: any CAM folder, OC or CGNet);
        the AffinityNet <work_dir>/train_affinity/model.pth (or pseudo_labels.weights, e.g. PSA's
        res38_aff.pth, whose architecture is then train_affinity.net).
Output: <out_dir>/<id>.png palette label maps (default <work_dir>/pseudo_labels) and
        <out_dir>/record.json; log and config in <work_dir>/make_pseudo_labels/.
        Existing PNGs are kept unless pseudo_labels.overwrite=true.

    caee make-pseudo-labels --config configs/voc/r38.yaml data.root=/data/VOC2012
    torchrun --nproc_per_node 4 -m caee make-pseudo-labels --config configs/voc/r38.yaml

Per image of ``pseudo_labels.split`` (default ``data.cam_split``):

1. The normalised image is zero-padded at the bottom and right to a multiple of the feature
   stride (8; zero = the ImageNet mean colour after normalisation, as PSA pads), so that the
   ``h x w = ceil(H/8) x ceil(W/8)`` embeddings tile the padded image exactly.
2. Affinities ``exp(-mean_c |f_i - f_j|)`` of every pixel pair within ``radius`` (both directions,
   self-affinity 1; ``psa_border: true`` uses PSA's smaller pair set instead), raised to ``beta``,
   column-normalised: the transition matrix ``T`` (:mod:`caee.method.random_walk`).
3. Scores: background ``(1 - max_c CAM_c)^alpha`` + the image's CAMs (from ``cam_dir``), zero-padded
   like the image and average-pooled by 8; ``steps`` random-walk steps ``X @ T^steps``.
4. Bilinear upsampling (align_corners=False) to the padded size, crop to ``H x W``, argmax over
   background + the image's classes (its CAM keys), optionally a dense CRF on the normalised
   scores (``pseudo_labels.crf``, settings of the ``crf`` section).

Output: ``<out_dir>/<id>.png`` palette PNGs (0 = background, k+1 = class k), written atomically;
existing ones are skipped unless ``overwrite``; under torchrun each rank takes ``ids[rank::world]``;
``<out_dir>/record.json`` (settings, inputs) says the split is complete once every image has its PNG.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from caee.core import distributed
from caee.core.config import Config, CrfConfig, expand_work_dir
from caee.data import ensure_dataset, load_split
from caee.core.errors import CaeeError, not_found
from caee.core.logs import show_progress
from caee.core.io import load_cam_npz, load_image, save_label_png
from caee.models.affinitynet import load_affinitynet
from caee.core.parallel import ProcessWriter, workers_for
from caee.method.pseudo_labels import PairCache, WalkParams, embed_image, labels_from_scores, random_walk_scores
from caee.core.layout import Layout
from caee.stages import table
from caee.stages.common import finish_label_stage, start_label_stage

logger = logging.getLogger(__name__)

def write_crf_labels(job: tuple[str, np.ndarray, np.ndarray, CrfConfig, str]) -> None:
    """One job of the background CRF writer: (image path, scores, keys, CRF settings, output PNG)."""
    image_path, scores, keys, params, out_path = job
    save_label_png(out_path, labels_from_scores(scores.astype(np.float32), keys, load_image(image_path), params))


def _walk_params(cfg: Config) -> WalkParams:
    pc = cfg.pseudo_labels
    if pc.steps < 0:
        raise CaeeError(f"pseudo_labels.steps must be >= 0, got {pc.steps}")
    return WalkParams(alpha=pc.alpha, beta=pc.beta, steps=pc.steps, radius=pc.radius, psa_border=pc.psa_border)


def describe(cfg: Config) -> tuple[str, str]:
    """The row of the results table: (output, how it was produced)."""
    pl, grid = cfg.pseudo_labels, cfg.train_affinity.embed_stride
    return ("pseudo labels", f"random walk on AffinityNet affinities (beta {pl.beta:g}, t {pl.steps}, alpha "
            f"{pl.alpha:g}{f', grid stride {grid}' if grid else ''}){', + CRF' if pl.crf else ''}")


def main(cfg: Config) -> Path:
    cfg = expand_work_dir(cfg)
    row = table.stage("make_pseudo_labels")
    out_dir = row.output(Layout(cfg))
    pc = cfg.pseudo_labels
    split = pc.split or cfg.data.cam_split
    cam_dir, weights = row.input(cfg, "cams"), row.input(cfg, "affinitynet")
    if not cam_dir.is_dir():
        raise CaeeError(f"CAM folder {cam_dir} does not exist; run make_cam.py on split '{split}' or set "
                        "pseudo_labels.cam_dir")
    if not weights.is_file():
        raise CaeeError(f"AffinityNet weights {not_found(weights)}; run train_affinity.py or set pseudo_labels.weights")
    params = _walk_params(cfg)
    t0 = time.perf_counter()
    env, record = start_label_stage(cfg, "make_pseudo_labels", out_dir, pc.overwrite)
    ensure_dataset(cfg.data)
    index = load_split(cfg.data, split)
    distributed.barrier()

    model, meta = load_affinitynet(weights, cfg.train_affinity.net)
    model = model.to(env.device).eval()
    stride = model.feature_stride
    if "radius" in meta and int(meta["radius"]) != params.radius:
        logger.warning("AffinityNet was trained with radius %s but pseudo_labels.radius = %d", meta["radius"],
                       params.radius)
    todo = [i for i, image_id in enumerate(index.ids) if pc.overwrite or not (out_dir / f"{image_id}.png").is_file()]
    mine = distributed.shard(todo)
    logger.info("pseudo labels of %d images of %s (%d to do, %d on this rank) -> %s: CAMs %s, AffinityNet %s, "
                "alpha %g, beta %g, %d steps, radius %d (%s pairs), CRF %s, device %s", len(index.ids), split,
                len(todo), len(mine), out_dir, cam_dir, weights, params.alpha, params.beta, params.steps,
                params.radius, "PSA" if params.psa_border else "all", "on" if pc.crf else "off", env.device)
    pairs = PairCache(params.radius, params.psa_border)
    crf = cfg.crf if pc.crf else None
    writer = ProcessWriter(write_crf_labels, workers_for(cfg.crf.workers) if crf else 1)
    try:
        for i in tqdm(mine, desc="pseudo labels", disable=not show_progress(), dynamic_ncols=True):
            _one_image(model, index, i, cam_dir, out_dir, params, stride, pairs, env.device, crf, writer)
    finally:
        writer.close()
    finish_label_stage(out_dir, record, index.ids, split, t0)
    logger.info("pseudo labels of %d images in %s", len(index.ids), out_dir)
    return out_dir


def _one_image(model: nn.Module, index, i: int, cam_dir: Path, out_dir: Path, params: WalkParams, stride: int,
               pairs: PairCache, device: torch.device, crf: CrfConfig | None, writer: ProcessWriter) -> None:
    image_id = index.ids[i]
    out_path = out_dir / f"{image_id}.png"
    image = load_image(index.image_path(i))
    keys, cams = load_cam_npz(cam_dir / f"{image_id}.npz", index.num_classes)
    if cams.shape[1:] != image.shape[:2]:
        raise CaeeError(f"{cam_dir / image_id}.npz: CAMs are {cams.shape[2]}x{cams.shape[1]} but the image "
                        f"{index.image_path(i)} is {image.shape[1]}x{image.shape[0]}; regenerate the CAMs")
    if keys.size == 0:  # nothing to propagate: all background
        save_label_png(out_path, np.zeros(image.shape[:2], np.uint8))
        return
    feats = embed_image(model, image, stride, device)
    scores = random_walk_scores(feats, torch.from_numpy(cams), params, stride, pairs).cpu().numpy()
    if crf is None:
        save_label_png(out_path, labels_from_scores(scores, keys))
    else:
        writer.submit((str(index.image_path(i)), scores, keys, crf, str(out_path)))
