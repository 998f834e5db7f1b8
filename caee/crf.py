"""Dense CRF refinement (pydensecrf) and a small process pool for running CPU jobs in parallel.

The CRF follows METHOD.md section 5: unary = -log(probabilities), 10 mean-field iterations, a
Gaussian kernel (sxy 3, compat 3) and a bilateral kernel on the RGB image (sxy 80, srgb 13,
compat 10). pydensecrf is imported lazily so that this module imports without it; calling a CRF
function without it raises :class:`caee.errors.CaeeError`.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from caee.errors import CaeeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrfParams:
    """Dense CRF settings (defaults: PSA / OC-CSE). ``min_prob`` floors the probabilities before
    the log; 1e-5 is the clip of pydensecrf's ``unary_from_softmax``, which PSA's and OC-CSE's
    ``crf_inference`` use."""

    iterations: int = 10
    gaussian_sxy: float = 3
    gaussian_compat: float = 3
    bilateral_sxy: float = 80
    bilateral_srgb: float = 13
    bilateral_compat: float = 10
    min_prob: float = 1e-5


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise CaeeError(f"dense CRF needs pydensecrf: pip install pydensecrf2 (import failed: {e})") from None
    return dcrf


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfParams | None = None) -> np.ndarray:
    """Mean-field posterior of a fully connected CRF.

    image: (H, W, 3) uint8 RGB. probs: (L, H, W) float, non-negative scores; they are floored at
    ``params.min_prob`` and normalised over L per pixel, so only their ratios matter.
    Returns (L, H, W) float32 posterior probabilities.
    """
    dcrf = _densecrf()
    params = params or CrfParams()
    probs = np.asarray(probs, dtype=np.float32)
    image = np.asarray(image)
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise CaeeError(f"CRF scores must be (L, H, W) with L >= 1, got {probs.shape}")
    n_labels, h, w = probs.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise CaeeError(f"CRF image must be ({h}, {w}, 3) uint8 to match the scores, "
                        f"got {image.shape} {image.dtype}")
    # The official unary is -log(clip(p, 1e-5, 1)) without normalising; for scores <= 1 that
    # differs from this one by a per-pixel constant, which mean-field inference ignores.
    p = np.maximum(probs, params.min_prob)
    p /= p.sum(axis=0, keepdims=True)
    unary = np.ascontiguousarray(-np.log(p).reshape(n_labels, -1), dtype=np.float32)
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.require(image, np.uint8, ['C', 'W']),  # pydensecrf needs a writable buffer
                             compat=params.bilateral_compat)
    q = crf.inference(int(params.iterations))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def crf_labels_from_scores(image: np.ndarray, probs: np.ndarray, params: CrfParams | None = None,
                           label_values: np.ndarray | None = None) -> np.ndarray:
    """CRF on arbitrary (L, H, W) probability maps (e.g. DeepLab softmax), then argmax.

    label_values: (L,) label of each channel (default: 0..L-1). Returns (H, W) uint8; ties in the
    posterior go to the first channel.
    """
    q = dense_crf(image, probs, params)
    idx = np.argmax(q, axis=0)
    if label_values is None:
        if q.shape[0] > 256:
            raise CaeeError(f"{q.shape[0]} channels do not fit uint8 labels; pass label_values")
        return idx.astype(np.uint8)
    lut = np.asarray(label_values).reshape(-1)
    if lut.shape[0] != q.shape[0] or lut.min(initial=0) < 0 or lut.max(initial=0) > 255:
        raise CaeeError(f"label_values must be {q.shape[0]} values in 0..255, got {lut.tolist()}")
    return lut.astype(np.uint8)[idx]


def crf_cam_labels(image: np.ndarray, keys: np.ndarray, cams: np.ndarray, alpha: float,
                   params: CrfParams | None = None) -> np.ndarray:
    """PSA-style CRF labels from CAMs.

    image: (H, W, 3) uint8; keys: (K,) 0-based class ids; cams: (K, H, W) float in [0, 1].
    Channel 0 is the background score ``(1 - max_c cams)^alpha`` (only the background is raised to
    alpha; the foreground CAMs are used as they are), channels 1..K the CAMs. Returns (H, W) uint8
    in {0} ∪ {keys + 1}. With no keys the whole image is background.
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise CaeeError(f"cams must be (K, H, W) with K = len(keys) = {len(keys)}, got {cams.shape}")
    if keys.size and (keys.min() < 0 or keys.max() >= 254):
        raise CaeeError(f"CAM keys must be 0-based foreground class ids below 254, got {keys.tolist()}")
    if keys.size == 0:
        _densecrf()  # fail the same way with or without keys when pydensecrf is missing
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    bg = np.power(1.0 - np.clip(cams.max(axis=0), 0.0, 1.0), alpha)[None]
    lut = np.concatenate([[0], keys + 1])
    return crf_labels_from_scores(image, np.concatenate([bg, cams], axis=0), params, lut)


# ---------------------------------------------------------------- process pool

_POOL_FN: Callable | None = None


def _worker_init(fn: Callable) -> None:
    global _POOL_FN
    _POOL_FN = fn
    # Each worker is one of many processes: intra-op threads would oversubscribe the cores.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _worker_call(item: Any) -> Any:
    return _POOL_FN(item)


def available_cpus() -> int:
    """Cores this process may run on (affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_pool(fn: Callable[[Any], Any], items: Iterable[Any], workers: int | None = None,
             chunksize: int | None = None) -> list:
    """``[fn(x) for x in items]`` on a process pool, results in input order.

    workers: None = all available cores; 1 (or a single item) runs inline in this process.
    On Linux the pool forks, so ``fn`` may be a closure or lambda (it is inherited, not pickled);
    items and results are pickled. Workers run torch single-threaded. Do not fork from a process
    holding CUDA state if ``fn`` needs CUDA: this pool is meant for CPU jobs (CRF, file loading).
    """
    items = list(items)
    n = available_cpus() if workers is None else int(workers)
    if n < 1:
        raise CaeeError(f"workers must be >= 1 (or None for all cores), got {workers}")
    n = min(n, len(items))
    if n <= 1:
        return [fn(x) for x in items]
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") and "fork" in methods else None)
    if chunksize is None:
        chunksize = max(1, len(items) // (n * 4))
    with ctx.Pool(n, initializer=_worker_init, initargs=(fn,)) as pool:
        return list(pool.imap(_worker_call, items, chunksize=chunksize))
