"""Pseudo labels of one image by PSA's random walk (the per-image steps of the pseudo-label stage).

:func:`embed_image` gives AffinityNet's embeddings of the padded image, :func:`random_walk_scores`
propagates the background + CAM scores with the transition matrix of :mod:`caee.method.random_walk`
and upsamples them, :func:`labels_from_scores` takes the argmax (or a dense CRF). Order and
padding follow PSA (docs/METHOD.md §6).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caee.method.affinity import offset_affinity, pair_indices
from caee.core.config import CrfConfig
from caee.method.crf import crf_labels_from_scores
from caee.data import normalize_image
from caee.core.errors import CaeeError
from caee.method.random_walk import (TransitionPattern, cam_scores_with_background, random_walk, transition_matrix,
                              transition_pattern)


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
                       crf: CrfConfig | None = None) -> np.ndarray:
    """``(K+1, H, W)`` random-walk scores -> ``(H, W)`` uint8 labels in ``{0} ∪ (keys + 1)``.

    Without ``crf``: argmax (ties to the lower channel, background first). With ``crf`` (needs the
    uint8 ``image``): the scores, clipped at 0 and normalised per pixel, are the CRF's unary.
    """
    lut = np.concatenate([[0], np.asarray(keys, np.int64).reshape(-1) + 1]).astype(np.uint8)
    if lut.shape[0] != scores.shape[0]:
        raise CaeeError(f"{scores.shape[0]} score channels but {lut.shape[0] - 1} class keys + background")
    if crf is None:
        return lut[np.argmax(scores, axis=0)]
    probs = np.maximum(scores, 0.0)
    probs = probs / np.maximum(probs.sum(axis=0, keepdims=True), 1e-12)
    return crf_labels_from_scores(image, probs, crf, lut)
