"""Dense CRF refinement (pydensecrf).

The CRF follows docs/METHOD.md §5: unary = -log(probabilities), 10 mean-field iterations, a
Gaussian kernel (sxy 3, compat 3) and a bilateral kernel on the RGB image (sxy 80, srgb 13,
compat 10): the config's ``crf`` section (:class:`caee.core.config.CrfConfig`) is passed as it is.
pydensecrf is imported lazily so that this module imports without it; calling a CRF function
without it raises :class:`caee.core.errors.CaeeError`.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from caee.core.config import CrfConfig
from caee.core.errors import CaeeError

logger = logging.getLogger(__name__)


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise CaeeError(f"dense CRF needs pydensecrf: pip install pydensecrf2 (import failed: {e})") from None
    return dcrf


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfConfig | None = None) -> np.ndarray:
    """Mean-field posterior of a fully connected CRF.

    image: (H, W, 3) uint8 RGB. probs: (L, H, W) float, non-negative scores; they are floored at
    ``params.min_prob`` and normalised over L per pixel, so only their ratios matter.
    Returns (L, H, W) float32 posterior probabilities.
    """
    dcrf = _densecrf()
    params = params or CrfConfig()
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


def crf_labels_from_scores(image: np.ndarray, probs: np.ndarray, params: CrfConfig | None = None,
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
                   params: CrfConfig | None = None) -> np.ndarray:
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


def label_folder_settings(cams: str | None, alpha: float, params: CrfConfig) -> dict:
    """What determines a folder of CRF labels made from CAMs: the CAM folder's recorded fingerprint
    (None: a folder made elsewhere), the CRF settings (not its worker count) and alpha. make_cam and
    AffinityNet's label step write the same folders, so they record them the same way."""
    crf = {f"crf.{k}": v for k, v in dataclasses.asdict(params).items() if k != "workers"}
    return {"input.cams": cams or "unrecorded", **crf, "crf.alpha": float(alpha)}
