"""IRN's class-boundary route from CAMs to pseudo labels (Ahn, Cho, Kwak, CVPR 2019; docs/METHOD.md §12).

Four steps, each a pure function here (arrays / tensors / a network in, arrays / tensors out):

1. :func:`ir_labels` -- inter-pixel relation labels from full-resolution CAMs: two hard label maps
   (background = a constant score ``conf_fg_thres`` resp. ``conf_bg_thres`` competing with the
   CAMs in an argmax), each cleaned by a dense CRF whose unary trusts the hard label with
   probability ``gt_prob``; confident foreground from the first, confident background where both
   say background, 255 elsewhere.
2. :func:`boundary_affinity` -- the affinity of a pixel pair is ``1 - max`` of the boundary map
   over the cells of the straight path between them (:func:`path_cells`); pairs are those of
   :func:`caee.method.affinity.pair_indices` (IRN's search directions are PSA's offsets).
3. :func:`boundary_loss` -- IRN's pair loss: ``((L_bg + L_fg) / 2 + L_neg) / 2``.
4. :func:`semantic_walk` + :func:`sem_seg_labels` -- the CAMs on the boundary grid, damped by
   ``1 - boundary``, walked ``2^exp_times`` steps with the column-normalised ``A^beta`` (caee's
   sparse walk, :mod:`caee.method.random_walk`: the same matrix IRN builds densely), upsampled
   by the grid stride, divided by their maximum, background where no class beats
   ``sem_seg_bg_thres``.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caee.core.config import CrfConfig
from caee.core.errors import CaeeError
from caee.method.affinity import affinity_loss, pair_indices, pair_offsets
from caee.method.crf import dense_crf
from caee.method.random_walk import random_walk, transition_matrix

logger = logging.getLogger(__name__)

IGNORE = 255


# ---------------------------------------------------------------- 1. relation labels from CAMs


def hard_labels(cams: np.ndarray, bg_score: float) -> np.ndarray:
    """``(K, H, W)`` CAMs -> ``(H, W)`` int64 channel index: 0 where no CAM exceeds ``bg_score``
    (ties go to the background), else ``1 + argmax_k cams``."""
    cams = np.asarray(cams, dtype=np.float32)
    scores = np.concatenate([np.full((1,) + cams.shape[1:], bg_score, np.float32), cams], axis=0)
    return np.argmax(scores, axis=0)


def label_unary_probs(labels: np.ndarray, n_labels: int, gt_prob: float) -> np.ndarray:
    """Probabilities whose ``-log`` is pydensecrf's ``unary_from_labels(zero_unsure=False)``:
    ``gt_prob`` for each pixel's label, ``(1 - gt_prob) / (n_labels - 1)`` for every other one.
    labels: ``(H, W)`` ints in ``0..n_labels-1``. Returns ``(n_labels, H, W)`` float32."""
    if n_labels < 2:
        raise CaeeError(f"a label unary needs at least 2 labels, got {n_labels}")
    if not 0.0 < gt_prob < 1.0:
        raise CaeeError(f"irn.crf_gt_prob must be in (0, 1), got {gt_prob}")
    probs = np.full((n_labels,) + labels.shape, (1.0 - gt_prob) / (n_labels - 1), np.float32)
    np.put_along_axis(probs, labels[None].astype(np.int64), np.float32(gt_prob), axis=0)
    return probs


def crf_hard_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float,
                    params: CrfConfig) -> np.ndarray:
    """The dense CRF's argmax channel for a hard label map (IRN's ``crf_inference_label``)."""
    q = dense_crf(image, label_unary_probs(labels, n_labels, gt_prob), params)
    return np.argmax(q, axis=0)


def ir_labels(image: np.ndarray, keys: np.ndarray, cams: np.ndarray, fg_thres: float, bg_thres: float,
              params: CrfConfig, gt_prob: float = 0.7) -> np.ndarray:
    """IRN's relation labels (step/cam_to_ir_label.py) of one image.

    image: ``(H, W, 3)`` uint8; keys: ``(K,)`` 0-based class ids; cams: ``(K, H, W)`` at the
    image's resolution, each normalised by its maximum. Returns ``(H, W)`` uint8: the class
    (``key + 1``) where the ``fg_thres`` map says foreground, 0 where both maps say background,
    255 where only the ``bg_thres`` map says foreground. No keys: all background.
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or cams.shape[0] != keys.size:
        raise CaeeError(f"cams must be (K, H, W) with K = len(keys) = {keys.size}, got {cams.shape}")
    if keys.size == 0:
        return np.zeros(cams.shape[1:], np.uint8)
    lut = np.concatenate([[0], keys + 1]).astype(np.uint8)
    n = lut.size
    fg = lut[crf_hard_labels(image, hard_labels(cams, fg_thres), n, gt_prob, params)]
    bg = lut[crf_hard_labels(image, hard_labels(cams, bg_thres), n, gt_prob, params)]
    return combine_confident(fg, bg)


def combine_confident(fg_conf: np.ndarray, bg_conf: np.ndarray) -> np.ndarray:
    """IRN's merge: ``fg_conf``'s classes; its background -> 255; background of both -> 0."""
    out = np.asarray(fg_conf, np.uint8).copy()
    out[fg_conf == 0] = IGNORE
    out[(fg_conf == 0) & (bg_conf == 0)] = 0
    return out


def reduce_labels(label: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """Labels of a crop on the boundary grid: pixel ``(stride*i + stride//2, stride*j + stride//2)``
    of each cell, which is what IRN's ``pil_rescale(label, 1/stride, NEAREST)`` picks (PIL samples
    the source pixel under the centre of each output pixel). ``(..., H, W)`` -> ``(..., ceil((H -
    stride//2) / stride), ...)``, i.e. ``H / stride`` for the crop sizes used (multiples of stride)."""
    o = stride // 2
    return label[..., o::stride, o::stride].contiguous()


# ---------------------------------------------------------------- 2. paths and boundary -> affinity


def path_cells(dy: int, dx: int) -> list[tuple[int, int]]:
    """The cells of IRN's path from ``(0, 0)`` to ``(dy, dx)``: every ``(y, x)`` of the bounding box
    of the two ends whose squared distance from the line through them, ``(dy*x - dx*y)^2 /
    (dy^2 + dx^2)``, is below 1. Both ends are included; order: row-major."""
    if dy == 0 and dx == 0:
        raise CaeeError("a path needs two distinct ends")
    length_sq = dy * dy + dx * dx
    return [(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
            if (dy * x - dx * y) ** 2 < length_sq]


def _from_region(h: int, w: int, radius: int, dy: int, dx: int, psa_border: bool) -> tuple[int, int, int, int]:
    """Rows [y0, y1) and columns [x0, x1) the pairs of offset (dy, dx) start from (as pair_indices)."""
    if psa_border:
        return 0, h - radius + 1, radius - 1, w - radius + 1
    return 0, h - dy, max(0, -dx), w - max(0, dx)


def boundary_affinity(edge: torch.Tensor, radius: int = 5, psa_border: bool = False) -> torch.Tensor:
    """``a_ij = 1 - max_{k on path(i, j)} edge_k`` for the pairs of
    :func:`caee.method.affinity.pair_indices` ``(h, w, radius, psa_border)``, in the same order.

    edge: ``(B, h, w)`` boundary probabilities. The max keeps one argmax per pair, so the gradient
    goes to one cell as with IRN's max-pool. Returns ``(B, P)``.
    """
    if edge.dim() != 3:
        raise CaeeError(f"boundary map must be (B, h, w), got {tuple(edge.shape)}")
    b, h, w = edge.shape
    out = []
    for dy, dx in pair_offsets(radius):
        y0, y1, x0, x1 = _from_region(h, w, radius, dy, dx, psa_border)
        if y1 <= y0 or x1 <= x0:
            continue
        along = torch.stack([edge[:, y0 + cy:y1 + cy, x0 + cx:x1 + cx] for cy, cx in path_cells(dy, dx)])
        out.append((1.0 - along.max(dim=0).values).flatten(1))
    return torch.cat(out, dim=1) if out else edge.new_zeros(b, 0)


# ---------------------------------------------------------------- 3. the boundary loss


def boundary_loss(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IRN's class-boundary loss (train_irn.py without the displacement terms, which do not reach
    the boundary branch): ``L = ((L_bg + L_fg) / 2 + L_neg) / 2`` with
    ``L_bg = sum_{bg pairs} -log(a + 1e-5) / (n_bg + 1e-5)`` (likewise ``L_fg``) and
    ``L_neg = sum_{neg pairs} -log(1 + 1e-5 - a) / (n_neg + 1e-5)``, counts over the whole batch.

    aff, bg_pos, fg_pos, neg: ``(B, P)`` (:func:`caee.method.affinity.pair_label_targets`).
    Returns ``(loss, {"bg": L_bg, "fg": L_fg, "neg": L_neg})``.
    """
    # the same terms and weights as PSA's AffinityNet loss: ((bg + fg) / 2 + neg) / 2 = bg/4 + fg/4 + neg/2
    return affinity_loss(aff, bg_pos, fg_pos, neg)


# ---------------------------------------------------------------- 4. the walk and the labels


def cams_to_grid(cams: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """Full-resolution ``(K, H, W)`` CAMs on the boundary grid ``(K, ceil(H/s), ceil(W/s))``: the
    mean of each ``s x s`` cell over its pixels inside the image.

    Why the cell mean: IRN's walk output is upsampled with ``interpolate(scale_factor=s,
    align_corners=False)``, which places grid value ``i`` at the centre of pixels ``[s*i, s*i+s)``;
    a CAM that is itself a bilinear upsample of a coarser map (caee's CAMs at stride 8, or 4 for
    tinycnn) is linear inside a cell, so its cell mean is its value at that centre, which is also
    what IRN's own stride-4 CAM (a bilinear resize of the stride-16 output) holds there.
    """
    if cams.dim() != 3:
        raise CaeeError(f"cams must be (K, H, W), got {tuple(cams.shape)}")
    if cams.shape[0] == 0:
        h, w = -(-cams.shape[1] // stride), -(-cams.shape[2] // stride)
        return cams.new_zeros(0, h, w, dtype=torch.float32)
    # ceil_mode without padding: a border cell is divided by its pixels inside the image
    return F.avg_pool2d(cams.float().unsqueeze(0), stride, stride, ceil_mode=True)[0]


def semantic_walk(cams: torch.Tensor, edge: torch.Tensor, beta: float = 10.0, exp_times: int = 8,
                  radius: int = 5) -> torch.Tensor:
    """IRN's ``propagate_to_edge`` by caee's sparse walk.

    cams: ``(K, h, w)`` on the boundary grid; edge: ``(h, w)`` boundary probabilities. The scores
    ``cams * (1 - edge)`` are multiplied by ``T^(2^exp_times)``, ``T`` the column-normalised
    ``A^beta`` of :func:`boundary_affinity` over every pair within ``radius`` (unit diagonal).
    Returns ``(K, h, w)`` float32.
    """
    if edge.dim() != 2 or tuple(edge.shape) != tuple(cams.shape[-2:]):
        raise CaeeError(f"boundary map {tuple(edge.shape)} and CAM grid {tuple(cams.shape)} differ; "
                        "bring the CAMs to the boundary grid first (cams_to_grid)")
    h, w = edge.shape
    edge = edge.float()
    x = cams.float() * (1.0 - edge)
    if cams.shape[0] == 0:
        return x
    aff = boundary_affinity(edge.unsqueeze(0), radius, psa_border=False)[0]
    from_idx, to_idx = pair_indices(h, w, radius, psa_border=False, device=edge.device)
    trans = transition_matrix(aff, from_idx, to_idx, h * w, beta)
    return random_walk(x, trans, steps=1 << int(exp_times))


def sem_seg_labels(rw: torch.Tensor, keys: np.ndarray, size: tuple[int, int], bg_thres: float = 0.25,
                   stride: int = 4) -> np.ndarray:
    """IRN's make_sem_seg_labels post-processing: ``(K, h, w)`` walk scores, upsampled ``stride``
    times (bilinear, align_corners False), cropped to ``size = (H, W)``, divided by their maximum
    over all classes and pixels; background where no class exceeds ``bg_thres`` (ties go to the
    background). Returns ``(H, W)`` uint8 in ``{0} ∪ (keys + 1)``; all background without keys
    or when no score is positive (IRN would divide by zero)."""
    keys = np.asarray(keys, np.int64).reshape(-1)
    if rw.shape[0] != keys.size:
        raise CaeeError(f"{rw.shape[0]} walk channels but {keys.size} class keys")
    hh, ww = size
    if keys.size == 0:
        return np.zeros((hh, ww), np.uint8)
    up = F.interpolate(rw.float().unsqueeze(0), scale_factor=stride, mode="bilinear", align_corners=False)
    up = up[0, :, :hh, :ww]
    if tuple(up.shape[-2:]) != (hh, ww):
        raise CaeeError(f"a {tuple(rw.shape[-2:])} grid at stride {stride} does not cover a {hh}x{ww} image")
    peak = up.max()
    if not peak > 0:
        return np.zeros((hh, ww), np.uint8)
    scores = torch.cat([up.new_full((1, hh, ww), bg_thres), up / peak])
    lut = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return lut[scores.argmax(0).cpu().numpy()]


@torch.inference_mode()
def edge_map(model: nn.Module, image: torch.Tensor, pad_to: int, stride: int = 4) -> torch.Tensor:
    """The boundary map IRN's ``EdgeDisplacement`` gives for one image.

    image: normalised ``(3, H, W)``. The image and its mirror are zero-padded (bottom, right) to
    ``pad_to x pad_to`` (to a multiple of 16 above that: a departure only for images larger than
    the crop, which IRN would cut), run as one batch; both logit maps are cut to
    ``ceil(H/stride) x ceil(W/stride)``, the mirror's flipped back, and
    ``sigmoid(mean of the two logits)`` returned as ``(h, w)``.
    ``model(x)`` must return ``(B, 1, H'/stride, W'/stride)`` boundary logits.
    """
    _, hh, ww = image.shape
    th = max(pad_to, -(-hh // 16) * 16)
    tw = max(pad_to, -(-ww // 16) * 16)
    pair = torch.stack([image, image.flip(-1)])
    pair = F.pad(pair, (0, tw - ww, 0, th - hh))
    logits = model(pair)[:, 0, :math.ceil(hh / stride), :math.ceil(ww / stride)]
    return torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)
