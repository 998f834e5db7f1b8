"""Stage 5: pseudo labels by random walk of the CAMs with AffinityNet's affinities (PSA, METHOD.md section 6).

Per image of ``pseudo_labels.split`` (default ``data.cam_split``):

1. The normalised image is zero-padded at the bottom and right to a multiple of the feature
   stride (8; zero = the ImageNet mean colour after normalisation, as PSA pads), so that the
   ``h x w = ceil(H/8) x ceil(W/8)`` embeddings tile the padded image exactly.
2. Affinities ``exp(-mean_c |f_i - f_j|)`` of every pixel pair within ``radius`` (both directions,
   self-affinity 1; ``psa_border: true`` uses PSA's smaller pair set instead), raised to ``beta``,
   column-normalised: the transition matrix ``T`` (:mod:`caee.random_walk`).
3. Scores: background ``(1 - max_c CAM_c)^alpha`` + the image's CAMs (from ``cam_dir``), zero-padded
   like the image and average-pooled by 8; ``steps`` random-walk steps ``X @ T^steps``.
4. Bilinear upsampling (align_corners=False) to the padded size, crop to ``H x W``, argmax over
   background + the image's classes (its CAM keys), optionally a dense CRF on the normalised
   scores (``pseudo_labels.crf``, settings of the ``crf`` section).

Output: ``<out_dir>/<id>.png`` palette PNGs (0 = background, k+1 = class k), written atomically;
existing ones are skipped unless ``overwrite``; under torchrun each rank takes ``ids[rank::world]``;
``<out_dir>/DONE`` (JSON with the settings) is written last, once every image has its PNG.
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing as mp
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from caee import distributed, provenance
from caee.affinity import offset_affinity, pair_indices
from caee.affinity_labels import crf_params, crf_workers
from caee.config import Config, expand_work_dir
from caee.crf import CrfParams, available_cpus, crf_labels_from_scores
from caee.data import ensure_dataset, load_split, normalize_image
from caee.errors import CaeeError
from caee.io import load_cam_npz, load_image, save_label_png, write_json
from caee.models.affinitynet import load_affinitynet
from caee.random_walk import (TransitionPattern, cam_scores_with_background, random_walk, transition_matrix,
                              transition_pattern)
from caee.stages.common import claim_folder, default_path, start_stage

logger = logging.getLogger(__name__)

DONE = "DONE"


@dataclass(frozen=True)
class WalkParams:
    """Random-walk settings (PSA: alpha 16, beta 8, 256 steps, radius 5)."""
    alpha: float = 16.0
    beta: float = 8.0
    steps: int = 256
    radius: int = 5
    psa_border: bool = False


class PairCache:
    """Pair indices per feature size and device; a few sizes kept (images come in many sizes)."""

    def __init__(self, radius: int, psa_border: bool, max_entries: int = 32):
        self.radius, self.psa_border, self.max_entries = radius, psa_border, max_entries
        self._store: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, TransitionPattern]] = OrderedDict()

    def get(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, TransitionPattern]:
        """``(from_idx, to_idx, pattern)`` of the ``h x w`` grid: its pairs and the sparsity pattern
        of its transition matrix (one image)."""
        key = (h, w, str(device))
        if key in self._store:
            self._store.move_to_end(key)
        else:
            from_idx, to_idx = pair_indices(h, w, self.radius, self.psa_border, device=device)
            self._store[key] = (from_idx, to_idx, transition_pattern(from_idx, to_idx, h * w, 1, device))
            if len(self._store) > self.max_entries:
                self._store.popitem(last=False)
        return self._store[key]


@torch.inference_mode()
def embed_image(model: nn.Module, image: np.ndarray | torch.Tensor, stride: int, device: torch.device
                ) -> torch.Tensor:
    """AffinityNet embeddings of a whole image.

    image: uint8 ``(H, W, 3)``. The normalised image is zero-padded (bottom, right) to a multiple
    of ``stride``. Returns float32 ``(D, ceil(H/stride), ceil(W/stride))`` on ``device``.
    """
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
    x = normalize_image(t.to(device))
    hh, ww = x.shape[-2:]
    x = F.pad(x, (0, -ww % stride, 0, -hh % stride))
    return model(x.unsqueeze(0))[0].float()


@torch.inference_mode()
def random_walk_scores(features: torch.Tensor, cams: torch.Tensor, params: WalkParams, stride: int,
                       pairs: PairCache | None = None) -> torch.Tensor:
    """Random-walk scores at image resolution.

    features: ``(D, h, w)`` embeddings of the padded image; cams: ``(K, H, W)`` in [0, 1] with
    ``h = ceil(H/stride)``, ``w = ceil(W/stride)``. Returns float32 ``(K+1, H, W)``: channel 0
    background, channel k the k-th CAM, after ``params.steps`` steps, bilinearly upsampled.
    """
    dev = features.device
    _, hh, ww = cams.shape
    scores = cam_scores_with_background(cams.to(dev, torch.float32), params.alpha, stride)
    h, w = features.shape[-2:]
    if tuple(scores.shape[-2:]) != (h, w):
        raise CaeeError(f"the {hh}x{ww} CAMs pool to {tuple(scores.shape[-2:])} cells but the embeddings are "
                        f"{(h, w)}: are the CAMs from this image at its original size?")
    pairs = pairs or PairCache(params.radius, params.psa_border)
    from_idx, to_idx, pattern = pairs.get(h, w, dev)
    aff = offset_affinity(features.unsqueeze(0), params.radius, params.psa_border)[0]
    trans = transition_matrix(aff, from_idx, to_idx, h * w, params.beta, pattern)
    rw = random_walk(scores, trans, params.steps)
    up = F.interpolate(rw.unsqueeze(0), size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    return up[0, :, :hh, :ww].float()


def labels_from_scores(scores: np.ndarray, keys: np.ndarray, image: np.ndarray | None = None,
                       crf: CrfParams | None = None) -> np.ndarray:
    """``(K+1, H, W)`` random-walk scores -> ``(H, W)`` uint8 labels in ``{0} ∪ (keys + 1)``.

    Without ``crf``: argmax (ties to the lower channel, background first). With ``crf`` (needs the
    uint8 ``image``): the scores, clipped at 0 and normalised per pixel, are the CRF's unary.
    """
    lut = np.concatenate([[0], np.asarray(keys, np.int64) + 1]).astype(np.uint8)
    if crf is None:
        return lut[np.argmax(scores, axis=0)]
    probs = np.maximum(scores, 0.0)
    probs = probs / np.maximum(probs.sum(axis=0, keepdims=True), 1e-12)
    return crf_labels_from_scores(image, probs, crf, lut)


def _crf_write(job: tuple[str, np.ndarray, np.ndarray, CrfParams, str]) -> None:
    image_path, scores, keys, params, out_path = job
    save_label_png(out_path, labels_from_scores(scores.astype(np.float32), keys, load_image(image_path), params))


class _CrfWriter:
    """Runs the CRF + PNG write of finished random walks in worker processes while the device
    computes the next images (spawned workers: safe next to CUDA). ``workers <= 1``: inline."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None
        self.pending: list[concurrent.futures.Future] = []
        if workers > 1:
            self.pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))

    def submit(self, job) -> None:
        if self.pool is None:
            _crf_write(job)
            return
        self.pending.append(self.pool.submit(_crf_write, job))
        if len(self.pending) >= 2 * self.workers:  # bound the scores held in memory
            self.pending.pop(0).result()

    def close(self) -> None:
        if self.pool is None:
            return
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown(cancel_futures=True)


def _walk_params(cfg: Config) -> WalkParams:
    pc = cfg.pseudo_labels
    if pc.steps < 0:
        raise CaeeError(f"pseudo_labels.steps must be >= 0, got {pc.steps}")
    return WalkParams(alpha=pc.alpha, beta=pc.beta, steps=pc.steps, radius=pc.radius, psa_border=pc.psa_border)


def main(cfg: Config) -> Path:
    cfg = expand_work_dir(cfg)
    env = start_stage(cfg, "make_pseudo_labels", loader_workers=0)
    pc = cfg.pseudo_labels
    ensure_dataset(cfg.data)
    split = pc.split or cfg.data.cam_split
    index = load_split(cfg.data, split)
    cam_dir = default_path(pc.cam_dir, cfg, "cam_cgnet")
    out_dir = default_path(pc.out_dir, cfg, "pseudo_labels")
    weights = default_path(pc.weights, cfg, "train_affinity", "model.pth")
    if not cam_dir.is_dir():
        raise CaeeError(f"CAM folder {cam_dir} does not exist; run make_cam.py on split '{split}' or set "
                        "pseudo_labels.cam_dir")
    if not weights.is_file():
        raise CaeeError(f"AffinityNet weights not found: {weights}; run train_affinity.py or set pseudo_labels.weights")
    params = _walk_params(cfg)
    claim_folder(out_dir)
    if distributed.is_main():
        settings = provenance.without(provenance.settings_of(cfg, "make_pseudo_labels"), "pseudo_labels.split",
                                      "pseudo_labels.out_dir", "data.train_split", "data.cam_split", "data.val_split")
        provenance.check_folder(out_dir, settings, "pseudo_labels", pc.overwrite,
                                next(out_dir.glob("*.png"), None) is not None)
        (out_dir / DONE).unlink(missing_ok=True)
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
    crf = crf_params(cfg.crf) if pc.crf else None
    # the ranks of a torchrun group share the machine's cores
    writer = _CrfWriter((crf_workers(cfg.crf) or max(1, available_cpus() // distributed.world_size()))
                        if crf else 1)
    try:
        for i in tqdm(mine, desc="pseudo labels", disable=not distributed.is_main(), dynamic_ncols=True):
            _one_image(model, index, i, cam_dir, out_dir, params, stride, pairs, env.device, crf, writer)
    finally:
        writer.close()
    distributed.barrier()
    if distributed.is_main():
        missing = [image_id for image_id in index.ids if not (out_dir / f"{image_id}.png").is_file()]
        if missing:
            raise CaeeError(f"{len(missing)} pseudo labels are missing in {out_dir} (first: {missing[:3]}); re-run")
        write_json(out_dir / DONE, {"split": split, "images": len(index.ids), "cam_dir": str(cam_dir),
                                    "weights": str(weights), "alpha": params.alpha, "beta": params.beta,
                                    "steps": params.steps, "radius": params.radius,
                                    "psa_border": params.psa_border, "crf": pc.crf})
        logger.info("pseudo labels of %d images in %s", len(index.ids), out_dir)
    return out_dir


def _one_image(model: nn.Module, index, i: int, cam_dir: Path, out_dir: Path, params: WalkParams, stride: int,
               pairs: PairCache, device: torch.device, crf: CrfParams | None, writer: _CrfWriter) -> None:
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
