"""Segmentation metrics: confusion matrices, IoU, and the CAM background-threshold sweep.

Conventions (shared by every function here):

* Label maps are ``(H, W)`` with 0 = background, 1..C = foreground classes, 255 = ignore.
  A confusion matrix has ``N = C + 1`` rows and columns: rows = ground truth, columns = prediction.
  Pixels whose ground truth is 255 are skipped, whatever the prediction says there.
* IoU rule: a class absent from both the ground truth and the prediction (its row and column of the
  accumulated matrix are all zero) has IoU NaN and is left out of the mean (mIoU = nanmean). A class
  that is predicted but absent from the ground truth has IoU 0 and does count. Precision is NaN for a
  class never predicted, recall NaN for a class absent from the ground truth.
* CAM tie rule: the background channel is the constant threshold stacked in FRONT of the CAMs and the
  label is the argmax, whose first maximum wins. So a pixel is foreground only where its largest CAM
  is strictly greater than the threshold (``max == threshold`` -> background), and among equal CAMs
  the first one in ``keys`` order wins. Comparisons happen in the CAMs' float dtype (float16 is
  promoted to float32) with the threshold cast to that dtype, so the sweep and :func:`cam_to_label`
  agree bit for bit.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from caee.core.errors import CaeeError

IGNORE = 255


def _check_gt(gt: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (flat gt as intp, flat valid mask); error on GT values outside 0..n-1 and 255."""
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise CaeeError(f"ground-truth label map must be (H, W), got shape {gt.shape}")
    flat = gt.reshape(-1).astype(np.intp, copy=False)
    valid = flat != IGNORE
    if valid.any():
        lo, hi = flat[valid].min(), flat[valid].max()
        if lo < 0 or hi >= n:
            raise CaeeError(
                f"ground-truth values must be 0..{n - 1} or 255, found {lo}..{hi}: "
                f"check num_classes ({n - 1}) and the label PNGs")
    return flat, valid


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix of one image.

    gt: (H, W) uint8, 0..C or 255 (ignored). pred: (H, W) int, 0..C where gt is not 255.
    num_classes: C, the number of foreground classes. Returns (C+1, C+1) int64, rows = gt.
    """
    n = int(num_classes) + 1
    pred = np.asarray(pred)
    if pred.shape != np.shape(gt):
        raise CaeeError(f"prediction shape {pred.shape} differs from ground-truth shape {np.shape(gt)}")
    g, valid = _check_gt(gt, n)
    p = pred.reshape(-1)[valid].astype(np.intp, copy=False)
    g = g[valid]
    if p.size and (p.min() < 0 or p.max() >= n):
        raise CaeeError(f"prediction values must lie in 0..{n - 1} where ground truth is not 255, "
                        f"found {p.min()}..{p.max()}")
    return np.bincount(g * n + p, minlength=n * n).reshape(n, n).astype(np.int64, copy=False)


def iou_from_confusion(conf: np.ndarray) -> dict:
    """Scores from an (N, N) confusion matrix (rows = gt, cols = prediction).

    Returns a dict: ``iou``, ``precision``, ``recall`` ((N,) float64, NaN where undefined, see the
    module docstring), ``miou`` (nanmean of ``iou``; NaN if every class is absent),
    ``pixel_accuracy`` (trace / total; NaN for an empty matrix) and ``num_pixels``.
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise CaeeError(f"confusion matrix must be square (N, N), got {conf.shape}")
    tp = np.diag(conf)
    gt_count = conf.sum(axis=1)
    pred_count = conf.sum(axis=0)
    union = gt_count + pred_count - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        precision = np.where(pred_count > 0, tp / pred_count, np.nan)
        recall = np.where(gt_count > 0, tp / gt_count, np.nan)
    total = conf.sum()
    present = ~np.isnan(iou)
    return {
        "iou": iou,
        "precision": precision,
        "recall": recall,
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "num_pixels": int(total),
    }


def _cam_dtype(cams: np.ndarray) -> np.dtype:
    # float16 CAMs are compared in float32; float64 stays float64.
    return np.result_type(cams.dtype, np.float32)


def _check_cams(keys: np.ndarray, cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    cams = np.asarray(cams)
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise CaeeError(f"cams must be (K, H, W) with K = len(keys) = {len(keys)}, got {cams.shape}")
    if keys.size and (keys.min() < 0 or keys.max() >= IGNORE - 1):
        raise CaeeError(f"CAM keys must be 0-based foreground class ids below 254, got {keys.tolist()}")
    return keys, cams.astype(_cam_dtype(cams), copy=False)


def _key_lut(keys: np.ndarray) -> np.ndarray:
    """Channel index of a [bg, cams...] stack -> label (0 = bg, keys[i] + 1)."""
    return np.concatenate([[0], keys + 1]).astype(np.uint8)


def cam_to_label(keys: np.ndarray, cams: np.ndarray, threshold: float) -> np.ndarray:
    """Label map from CAMs with a constant background score.

    keys: (K,) 0-based class ids; cams: (K, H, W) float. Returns (H, W) uint8: argmax over
    [threshold, cams...] mapped to 0 (background) or keys[i] + 1. Ties go to background, then to
    the earlier key (numpy argmax picks the first maximum).
    """
    keys, cams = _check_cams(keys, cams)
    bg = np.full((1,) + cams.shape[1:], threshold, dtype=cams.dtype)
    idx = np.argmax(np.concatenate([bg, cams], axis=0), axis=0)
    return _key_lut(keys)[idx]


def _gt_rows(gt: np.ndarray, n: int) -> np.ndarray:
    """(H, W) ground truth with 255 replaced by ``n`` (uint8, or intp for other dtypes), after the
    checks of :func:`_check_gt`; uint8 maps are checked with one 256-bin histogram."""
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise CaeeError(f"ground-truth label map must be (H, W), got shape {gt.shape}")
    if gt.dtype != np.uint8 or n >= IGNORE:
        flat, valid = _check_gt(gt, n)
        return np.where(valid, flat, n).reshape(gt.shape)
    counts = np.bincount(gt.reshape(-1), minlength=256)
    bad = np.flatnonzero(counts[n:IGNORE])
    if bad.size:
        lo = 0 if counts[:n].any() else n + int(bad[0])
        raise CaeeError(
            f"ground-truth values must be 0..{n - 1} or 255, found {lo}..{n + int(bad[-1])}: "
            f"check num_classes ({n - 1}) and the label PNGs")
    lut = np.arange(256, dtype=np.uint8)
    lut[IGNORE] = n
    return lut[gt] if counts[IGNORE] else gt


def _max_argmax(cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max over K, index of its first occurrence) of (K, H, W) CAMs, K passes over (H, W) planes
    (numpy's reductions over a leading axis are several times slower); with a NaN numpy's own."""
    if cams.dtype.kind == "f" and np.isnan(cams.max()):
        return cams.max(axis=0), np.argmax(cams, axis=0)
    mx = cams[0].copy()
    arg = np.zeros(mx.shape, np.uint8 if cams.shape[0] < 256 else np.intp)
    for j in range(1, cams.shape[0]):
        better = cams[j] > mx  # strictly: the first maximum wins
        arg[better] = j
        np.copyto(mx, cams[j], where=better)
    return mx, arg


class ThresholdSweep:
    """Confusion matrices of CAM labels at many background thresholds, in one pass per image.

    For each image the CAM argmax and max are computed once; with the thresholds sorted, a pixel is
    foreground exactly for the thresholds strictly below its max CAM (the tie rule of
    :func:`cam_to_label`), i.e. for the first ``k`` sorted thresholds, ``k = #(t < max)``. One
    bincount over ``(k, gt, fg label)`` per image fills a ``(T+1, N, N)`` histogram; cumulative sums
    over ``k`` turn it into the T confusion matrices when results are asked for.
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float]):
        self.num_classes = int(num_classes)
        self.n = self.num_classes + 1
        self.thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if self.thresholds.size == 0 or not np.all(np.isfinite(self.thresholds)):
            raise CaeeError(f"thresholds must be a non-empty list of finite numbers, got {thresholds!r}")
        self._order = np.argsort(self.thresholds, kind="stable")
        self._sorted = self.thresholds[self._order]
        t = self._sorted.size
        self._hist = np.zeros((t + 1) * self.n * self.n, dtype=np.int64)
        self._lut16: np.ndarray | None = None
        self.num_images = 0

    def update(self, gt: np.ndarray, keys: np.ndarray, cams: np.ndarray) -> None:
        """Add one image. gt: (H, W) uint8; keys: (K,); cams: (K, H, W) float16 / float32 / float64."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        cams = np.asarray(cams)
        if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
            raise CaeeError(f"cams must be (K, H, W) with K = len(keys) = {len(keys)}, got {cams.shape}")
        if cams.shape[1:] != np.shape(gt):
            raise CaeeError(f"CAM size {cams.shape[1:]} differs from ground-truth size {np.shape(gt)}")
        n = self.n
        if keys.size and (keys.min() < 0 or keys.max() + 1 >= n):
            raise CaeeError(f"CAM keys {keys.tolist()} must be 0-based class ids below num_classes = {self.num_classes}")
        # gt 255 becomes row n of an (n + 1)-row histogram that is dropped: no gather of the valid pixels
        g = _gt_rows(gt, n)
        rows = n + 1
        if keys.size:
            mx, arg = _max_argmax(cams)
            fg = _key_lut(keys)[1:][arg]
            k = self._below(mx)
            dt = np.uint16 if (self._sorted.size + 1) * rows * n < 2 ** 16 else np.intp
            idx = (k.astype(dt) * rows + g) * n + fg
        else:
            idx = g.astype(np.intp) * n
        counts = np.bincount(idx.reshape(-1), minlength=(self._sorted.size + 1) * rows * n)
        self._hist += counts.reshape(-1, rows, n)[:, :n, :].reshape(-1)
        self.num_images += 1

    def _below(self, mx: np.ndarray) -> np.ndarray:
        """#(sorted thresholds strictly below each max CAM), the thresholds cast to the CAM dtype
        (float16 is compared in float32, see :func:`_cam_dtype`); (H, W) uint8 / intp."""
        cmp = _cam_dtype(mx)
        if mx.dtype == np.float16 and self._sorted.size < 255:
            # every float16 value, compared once: a 65,536-entry table indexed by the bit pattern
            if self._lut16 is None:
                every = np.arange(2 ** 16, dtype=np.uint16).view(np.float16).astype(cmp)
                self._lut16 = np.searchsorted(self._sorted.astype(cmp), every, side="left").astype(np.uint8)
            return self._lut16[mx.view(np.uint16)]
        # side="left" counts thresholds strictly below the max: max == t stays background.
        return np.searchsorted(self._sorted.astype(cmp), mx.astype(cmp, copy=False), side="left")

    def merge(self, other: "ThresholdSweep") -> "ThresholdSweep":
        """Add another accumulator's counts (e.g. from a parallel worker); returns self."""
        if other.num_classes != self.num_classes or not np.array_equal(other.thresholds, self.thresholds):
            raise CaeeError("can only merge threshold sweeps with the same num_classes and thresholds")
        self._hist += other._hist
        self.num_images += other.num_images
        return self

    def confusion_matrices(self) -> np.ndarray:
        """(T, N, N) int64 confusion matrices, in the order the thresholds were given."""
        n, t = self.n, self._sorted.size
        h = self._hist.reshape(t + 1, n, n)
        # Sorted threshold j: pixels with k > j are foreground, pixels with k <= j background.
        fg_part = np.cumsum(h[::-1], axis=0)[::-1][1:]          # sum over k >= j+1
        bg_rows = np.cumsum(h.sum(axis=2), axis=0)[:-1]          # sum over k <= j, per gt row
        conf = fg_part.copy()
        conf[:, :, 0] += bg_rows
        out = np.empty_like(conf)
        out[self._order] = conf
        return out

    def results(self) -> list[dict]:
        """Per-threshold :func:`iou_from_confusion` dicts plus ``threshold``, in the given order."""
        return [dict(iou_from_confusion(c), threshold=float(t))
                for t, c in zip(self.thresholds, self.confusion_matrices())]

    def result_at(self, threshold: float) -> dict:
        """The result at a threshold fixed in advance (must be one of the swept thresholds)."""
        hits = np.flatnonzero(np.isclose(self.thresholds, threshold, rtol=0, atol=1e-9))
        if hits.size == 0:
            raise CaeeError(f"threshold {threshold} is not among the swept thresholds {self.thresholds.tolist()}")
        return self.results()[int(hits[0])]

    def best(self) -> dict:
        """The result with the highest mIoU (the earliest given threshold on ties; NaNs lose)."""
        res = self.results()
        miou = np.array([r["miou"] for r in res])
        if np.all(np.isnan(miou)):
            return res[0]
        return res[int(np.nanargmax(miou))]
