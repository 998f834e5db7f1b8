import math

import numpy as np
import pytest

from caee.core.errors import CaeeError
from caee.core.metrics import ThresholdSweep, cam_to_label, confusion_matrix, iou_from_confusion

# 3x4 example, C = 2 (N = 3). The two 255 pixels carry predictions 1 and 9: both must be skipped,
# even the out-of-range 9.
GT = np.array([[0, 0, 1, 1],
               [0, 2, 1, 255],
               [2, 2, 0, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 0, 1],
                 [2, 0, 0, 9]])
# Counted by hand, rows = gt, cols = pred:
#   gt 0: (0,0) x3 [r0c0 r1c0 r2c2], (0,1) x1 [r0c1]
#   gt 1: (1,1) x2 [r0c2 r0c3],      (1,0) x1 [r1c2]
#   gt 2: (2,2) x2 [r1c1 r2c0],      (2,0) x1 [r2c1]
CONF = np.array([[3, 1, 0],
                 [1, 2, 0],
                 [1, 0, 2]])


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(GT, PRED, 2)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, CONF)


def test_scores_by_hand():
    r = iou_from_confusion(CONF)
    # IoU = tp / (gt + pred - tp): 3/(4+5-3), 2/(3+3-2), 2/(3+2-2)
    np.testing.assert_allclose(r["iou"], [0.5, 0.5, 2 / 3])
    np.testing.assert_allclose(r["precision"], [3 / 5, 2 / 3, 1.0])
    np.testing.assert_allclose(r["recall"], [3 / 4, 2 / 3, 2 / 3])
    assert r["miou"] == pytest.approx(5 / 9)
    assert r["pixel_accuracy"] == pytest.approx(0.7)
    assert r["num_pixels"] == 10


def test_absent_class_is_nan_and_excluded():
    conf = confusion_matrix(GT, PRED, 3)  # class 3 never appears
    assert conf.shape == (4, 4)
    r = iou_from_confusion(conf)
    assert math.isnan(r["iou"][3]) and math.isnan(r["precision"][3]) and math.isnan(r["recall"][3])
    assert r["miou"] == pytest.approx(5 / 9)


def test_predicted_but_absent_from_gt_counts_as_zero():
    gt = np.zeros((2, 2), np.uint8)
    pred = np.array([[0, 0], [0, 1]])
    r = iou_from_confusion(confusion_matrix(gt, pred, 1))
    np.testing.assert_allclose(r["iou"], [0.75, 0.0])
    assert math.isnan(r["recall"][1]) and r["precision"][1] == 0.0
    assert r["miou"] == pytest.approx(0.375)


def test_all_ignored_gives_nan():
    gt = np.full((2, 3), 255, np.uint8)
    r = iou_from_confusion(confusion_matrix(gt, np.full((2, 3), 77), 2))
    assert r["num_pixels"] == 0 and math.isnan(r["miou"]) and math.isnan(r["pixel_accuracy"])


def test_out_of_range_values_are_errors():
    bad = PRED.copy()
    bad[0, 0] = 3
    with pytest.raises(CaeeError):
        confusion_matrix(GT, bad, 2)
    bad[0, 0] = -1
    with pytest.raises(CaeeError):
        confusion_matrix(GT, bad, 2)
    gt = GT.copy()
    gt[0, 0] = 7
    with pytest.raises(CaeeError):
        confusion_matrix(gt, PRED, 2)
    with pytest.raises(CaeeError):
        confusion_matrix(GT, PRED[:, :3], 2)


def test_cam_to_label_tie_rule():
    keys = np.array([4, 1])
    cams = np.zeros((2, 1, 5), np.float32)
    cams[:, 0, 0] = [0.3, 0.1]    # max == threshold          -> background
    cams[:, 0, 1] = [0.6, 0.6]    # fg tie above threshold    -> first key: 4 + 1
    cams[:, 0, 2] = [0.2, 0.9]    # second key wins           -> 1 + 1
    cams[:, 0, 3] = [0.31, 0.0]   # just above                -> 5
    cams[:, 0, 4] = [0.0, 0.0]    #                           -> background
    lab = cam_to_label(keys, cams, 0.3)
    assert lab.dtype == np.uint8
    np.testing.assert_array_equal(lab, [[0, 5, 2, 5, 0]])
    assert cam_to_label(np.zeros(0, np.int64), np.zeros((0, 2, 3), np.float32), 0.1).tolist() == [[0] * 3] * 2


def _random_image(rng, num_classes, h, w):
    k = int(rng.integers(0, 4))
    keys = np.sort(rng.choice(num_classes, size=k, replace=False))
    # Values on a 0.01 grid so that many pixels tie exactly with a threshold.
    cams = (np.round(rng.random((k, h, w)) * 100) / 100).astype(np.float32)
    gt = rng.choice(np.concatenate([[0, 255], keys + 1]), size=(h, w)).astype(np.uint8)
    if rng.random() < 0.5:
        cams = cams.astype(np.float16)
    return gt, keys, cams


def _reference(images, num_classes, thresholds):
    return [sum(confusion_matrix(gt, cam_to_label(keys, cams, t), num_classes) for gt, keys, cams in images)
            for t in thresholds]


def test_sweep_equals_per_threshold_evaluation():
    rng = np.random.default_rng(0)
    num_classes = 6
    thresholds = np.round(np.arange(0.10, 0.40, 0.01), 2)[::-1]  # unsorted order on purpose
    thresholds = np.concatenate([thresholds, [0.0, 1.0, 0.25]])    # extremes and a duplicate
    images = [_random_image(rng, num_classes, int(rng.integers(5, 20)), int(rng.integers(5, 20)))
              for _ in range(12)]
    assert any(len(k) == 0 for _, k, _ in images)
    sweep = ThresholdSweep(num_classes, thresholds)
    for gt, keys, cams in images:
        sweep.update(gt, keys, cams)
    ref = _reference(images, num_classes, thresholds)
    got = sweep.confusion_matrices()
    for t, a, b in zip(thresholds, got, ref):
        np.testing.assert_array_equal(a, b, err_msg=f"threshold {t}")
    res = sweep.results()
    assert [r["threshold"] for r in res] == thresholds.tolist()
    for r, c in zip(res, ref):
        np.testing.assert_array_equal(r["iou"], iou_from_confusion(c)["iou"])
    best = sweep.best()
    assert best["miou"] == max(r["miou"] for r in res)
    assert sweep.result_at(0.2)["miou"] == iou_from_confusion(ref[thresholds.tolist().index(0.2)])["miou"]
    assert sweep.num_images == 12


def test_sweep_ties_match_cam_to_label():
    # A pixel whose max CAM equals a threshold is background at that threshold, foreground below it.
    gt = np.array([[1, 1]], np.uint8)
    cams = np.array([[[0.2, 0.5]]], np.float32)
    sweep = ThresholdSweep(1, [0.1, 0.2, 0.5])
    sweep.update(gt, np.array([0]), cams)
    conf = sweep.confusion_matrices()
    np.testing.assert_array_equal(conf[0], [[0, 0], [0, 2]])
    np.testing.assert_array_equal(conf[1], [[0, 0], [1, 1]])
    np.testing.assert_array_equal(conf[2], [[0, 0], [2, 0]])


def test_merge_equals_single_accumulator():
    rng = np.random.default_rng(1)
    thresholds = np.linspace(0.05, 0.6, 12)
    images = [_random_image(rng, 5, 9, 11) for _ in range(10)]
    whole = ThresholdSweep(5, thresholds)
    parts = [ThresholdSweep(5, thresholds) for _ in range(3)]
    for i, im in enumerate(images):
        whole.update(*im)
        parts[i % 3].update(*im)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    np.testing.assert_array_equal(merged.confusion_matrices(), whole.confusion_matrices())
    assert merged.num_images == 10
    with pytest.raises(CaeeError):
        merged.merge(ThresholdSweep(5, thresholds[:-1]))


def test_sweep_rejects_bad_input():
    sweep = ThresholdSweep(2, [0.1])
    with pytest.raises(CaeeError):
        sweep.update(np.zeros((2, 2), np.uint8), np.array([2]), np.zeros((1, 2, 2), np.float32))
    with pytest.raises(CaeeError):
        sweep.update(np.zeros((2, 3), np.uint8), np.array([0]), np.zeros((1, 2, 2), np.float32))
    with pytest.raises(CaeeError):
        ThresholdSweep(2, [])


def test_sweep_fast_paths_equal_per_threshold_evaluation():
    """The sweep's shortcuts (float16 lookup table, per-plane max, no-255 maps, NaN fallback,
    float64 CAMs) give the confusion matrices of the per-threshold procedure."""
    rng = np.random.default_rng(3)
    thresholds = np.round(np.arange(0.10, 0.40, 0.01), 2)
    images = []
    for dtype in (np.float16, np.float32, np.float64):
        for with_ignore in (True, False):
            gt, keys, cams = _random_image(rng, 5, 13, 17)
            if not with_ignore:
                gt[gt == 255] = 0
            images.append((gt, keys, cams.astype(dtype)))
    gt, keys, cams = _random_image(rng, 5, 13, 17)
    while len(keys) < 2:
        gt, keys, cams = _random_image(rng, 5, 13, 17)
    cams = cams.astype(np.float32)
    cams[1, 2, 3] = np.nan
    cams[:, 4, 5] = 0.3  # a tie between CAMs: the first key wins
    images.append((gt, keys, cams))
    sweep = ThresholdSweep(5, thresholds)
    for im in images:
        sweep.update(*im)
    ref = _reference(images, 5, thresholds)
    for t, a, b in zip(thresholds, sweep.confusion_matrices(), ref):
        np.testing.assert_array_equal(a, b, err_msg=f"threshold {t}")
