"""AffinityNet training labels from the low/high-alpha CRF results of the CAMs (PSA, docs/METHOD.md §6).

Two rules (``train_affinity.label_rule``):

``psa`` (default, PSA's train_aff.py): the image and the la / ha CRF *posteriors* are cropped
(zero padding) and flipped together, the posteriors average-pooled over ``stride x stride`` cells;
per cell: argmax of la and of ha; label = la's class; la background -> 255 (unsure); ha
background -> 0; largest pooled score < 1e-5 (a cell of crop padding) -> 255.
Storage: the crops are not rescaled, so every cell a crop can produce is a ``stride x stride``
window of the image at an integer offset, clipped by the image border (the padding adds zeros).
:func:`cell_label_table` evaluates the rule once for every such window, from the float
posteriors, and stores the result: one uint8 per window, ``(H+s-1) x (W+s-1)``, as a PNG in
``cell_label_dir(cam_dir, la, ha, stride)``. A crop's cell labels are then a lookup
(:func:`cells_from_table`), the same numbers as pooling the cropped posteriors (the argmax of a
mean is the argmax of the sum; a horizontal flip of a crop whose size is a multiple of the stride
flips whole cells). Exact up to float rounding where two pooled scores tie to ~1e-7 (the sums
are float64, PSA's means float32), and far smaller than the posteriors (README).

``top_left`` (caee's earlier rule): the argmax label PNGs of each alpha are merged per pixel and
the top-left pixel of each cell is taken. Details below.

The CRF label PNGs and the cell tables are cached in folders next to the CAM folder by the stage
(caee/stages/label_cache.py); make_cam.py writes the CRF label folders when ``cam.crf_alphas``
lists the alphas.

Per training sample: both maps go through the same joint augmentation as the image (crop padding
= 255, "no score"), then :func:`caee.method.affinity.confident_labels` merges them and
:func:`caee.method.affinity.downsample_labels` takes them to the feature grid (stride 8).
"""
from __future__ import annotations

import numpy as np

from caee.core.config import CrfConfig
from caee.core.errors import CaeeError
from caee.data.transforms import CropBox
from caee.method.crf import dense_crf


# ---------------------------------------------------------------- PSA's rule on pooled posteriors

NO_SCORE = 1e-5  # PSA: a cell whose largest pooled score (la or ha) is below this has no score -> 255
IGNORE = 255


def cam_crf_scores(cams: np.ndarray, alpha: float) -> np.ndarray:
    """``(K, H, W)`` CAMs -> ``(1+K, H, W)`` CRF input: background ``(1 - max_c cam)^alpha``, then
    the CAMs (PSA's scores, as :func:`caee.method.crf.crf_cam_labels` builds them)."""
    cams = np.asarray(cams, dtype=np.float32)
    bg = np.power(1.0 - np.clip(cams.max(axis=0), 0.0, 1.0), alpha)[None]
    return np.concatenate([bg, cams], axis=0)


def _window_sums(scores: np.ndarray, s: int) -> np.ndarray:
    """``(L, H, W)`` -> ``(L, H+s-1, W+s-1)`` float64: sums over every ``s x s`` window that meets
    the image, the image padded with zeros; entry ``[a, b]`` is the window at ``(a-s+1, b-s+1)``."""
    n, h, w = scores.shape
    padded = np.pad(scores.astype(np.float64), ((0, 0), (s - 1, s - 1), (s - 1, s - 1)))
    c = np.zeros((n, h + 2 * s - 1, w + 2 * s - 1))
    c[:, 1:, 1:] = padded.cumsum(1).cumsum(2)
    return c[:, s:, s:] - c[:, :-s, s:] - c[:, s:, :-s] + c[:, :-s, :-s]


def cell_label_table(la_post: np.ndarray, ha_post: np.ndarray, stride: int,
                     label_values: np.ndarray | None = None) -> np.ndarray:
    """PSA's cell label of every ``stride x stride`` window of the image.

    la_post, ha_post: ``(L, H, W)`` CRF posteriors at the low and high alpha, channel 0 the
    background, the same class in the same channel of both. label_values: ``(L,)`` label of each
    channel (default ``0..L-1``). Returns ``(H+s-1, W+s-1)`` uint8: entry ``[a, b]`` is the label of
    the window whose top-left pixel is ``(a-s+1, b-s+1)`` (rows/columns outside the image count 0,
    like PSA's crop padding): la's class; 255 where la's argmax is background; 0 where ha's is;
    255 where the largest mean score of both is below 1e-5. Ties go to the first channel.
    """
    if la_post.shape != ha_post.shape or la_post.ndim != 3:
        raise CaeeError(f"la and ha posteriors must be (L, H, W) of one shape, got {la_post.shape} and {ha_post.shape}")
    lut = np.arange(la_post.shape[0]) if label_values is None else np.asarray(label_values).reshape(-1)
    la_sum, ha_sum = _window_sums(la_post, stride), _window_sums(ha_post, stride)
    no_score = np.maximum(la_sum.max(0), ha_sum.max(0)) < NO_SCORE * stride * stride
    la_arg, ha_arg = la_sum.argmax(0), ha_sum.argmax(0)
    out = lut.astype(np.uint8)[la_arg]
    out[la_arg == 0] = IGNORE
    out[ha_arg == 0] = 0
    out[no_score] = IGNORE
    return out


def cell_table_from_cams(image: np.ndarray, keys: np.ndarray, cams: np.ndarray, la_alpha: float,
                         ha_alpha: float, stride: int, params: CrfConfig | None = None) -> np.ndarray:
    """:func:`cell_label_table` of the la / ha CRF posteriors of ``cams`` (``(K, H, W)``, classes
    ``keys``, 0-based) on ``image`` ``(H, W, 3)`` uint8; labels ``0`` and ``keys + 1``."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    h, w = image.shape[:2]
    if keys.size == 0:  # background only: la and ha both say background -> 0 everywhere
        return np.zeros((h + stride - 1, w + stride - 1), np.uint8)
    la = dense_crf(image, cam_crf_scores(cams, la_alpha), params)
    ha = dense_crf(image, cam_crf_scores(cams, ha_alpha), params)
    return cell_label_table(la, ha, stride, np.concatenate([[0], keys + 1]))


def cells_from_table(table: np.ndarray, box: CropBox, flip: bool, crop: int, stride: int) -> np.ndarray:
    """The ``(crop/s, crop/s)`` uint8 cell labels of a crop (box, then flip) from its image's table.

    Cell ``(i, j)`` of the crop covers output pixels ``[s*i, s*i+s) x [s*j, s*j+s)``, which come
    from the image window at ``(img_top - cont_top + s*i, img_left - cont_left + s*j)``; cells whose
    window misses the image are crop padding (255).
    """
    n = crop // stride
    ys = box.img_top - box.cont_top + stride * np.arange(n) + stride - 1
    xs = box.img_left - box.cont_left + stride * np.arange(n) + stride - 1
    vy = (ys >= 0) & (ys < table.shape[0])
    vx = (xs >= 0) & (xs < table.shape[1])
    out = np.full((n, n), IGNORE, np.uint8)
    out[np.ix_(vy, vx)] = table[np.ix_(ys[vy], xs[vx])]
    return np.ascontiguousarray(out[:, ::-1]) if flip else out
