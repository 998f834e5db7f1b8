"""Benchmark: (a) CAM threshold sweep in one pass vs one pass per threshold; (b) CRF throughput.

Usage: python bench/bench_eval_crf.py [--images 300] [--size 96] [--voc-images 20]
                                      [--crf-images 64] [--workers N]
Prints tables of wall times; synthetic random data, no files.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from caee.method.crf import crf_cam_labels  # noqa: E402
from caee.core.parallel import available_cpus, run_pool  # noqa: E402
from caee.core.metrics import ThresholdSweep, cam_to_label, confusion_matrix  # noqa: E402

NUM_CLASSES = 20
THRESHOLDS = np.arange(10, 40) / 100  # OC-CSE: 0.10..0.39 by 0.01, 30 thresholds


def make_images(n: int, h: int, w: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        k = int(rng.integers(2, 4))
        keys = np.sort(rng.choice(NUM_CLASSES, size=k, replace=False))
        cams = rng.random((k, h, w), dtype=np.float32) * 0.6
        gt = rng.choice(np.concatenate([[0, 0, 255], keys + 1]), size=(h, w)).astype(np.uint8)
        images.append((gt, keys, cams))
    return images


def sweep_one_pass(images) -> np.ndarray:
    sweep = ThresholdSweep(NUM_CLASSES, THRESHOLDS)
    for gt, keys, cams in images:
        sweep.update(gt, keys, cams)
    return sweep.confusion_matrices()


def sweep_per_threshold(images) -> np.ndarray:
    n = NUM_CLASSES + 1
    confs = np.zeros((len(THRESHOLDS), n, n), np.int64)
    for gt, keys, cams in images:
        for i, t in enumerate(THRESHOLDS):
            confs[i] += confusion_matrix(gt, cam_to_label(keys, cams, t), NUM_CLASSES)
    return confs


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def bench_sweep(label: str, images) -> None:
    one, t_one = timed(sweep_one_pass, images)
    per, t_per = timed(sweep_per_threshold, images)
    assert np.array_equal(one, per), "one-pass sweep disagrees with per-threshold evaluation"
    h, w = images[0][0].shape
    print(f"{label:<22} {len(images):>6} {f'{w}x{h}':>9} {len(THRESHOLDS):>4} "
          f"{t_one:>10.3f} {t_per:>12.3f} {t_per / t_one:>8.1f}x")


def crf_job(item):
    img, keys, cams = item
    return crf_cam_labels(img, keys, cams, alpha=8)


def make_crf_items(n: int, h: int, w: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    items = []
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(n):
        img = (rng.random((h, w, 3)) * 40).astype(np.uint8)
        cy, cx, r = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4), h // 4
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[blob] += np.array([150, 60, 20], np.uint8)
        cam = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * r * r)).astype(np.float32)
        items.append((img, np.array([int(rng.integers(NUM_CLASSES))]), cam[None]))
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--voc-images", type=int, default=20)
    ap.add_argument("--crf-images", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="pool size for (b); default all cores")
    args = ap.parse_args()

    print(f"(a) threshold sweep, {NUM_CLASSES} classes, 2-3 CAMs per image "
          f"(times in s; results checked equal)")
    print(f"{'set':<22} {'images':>6} {'size':>9} {'T':>4} {'one pass':>10} {'per thresh':>12} {'speedup':>9}")
    bench_sweep("small", make_images(args.images, args.size, args.size, 0))
    bench_sweep("VOC-sized", make_images(args.voc_images, 375, 500, 1))

    workers = args.workers or available_cpus()
    items = make_crf_items(args.crf_images, 240, 320, 2)
    print(f"\n(b) CRF (crf_cam_labels, 10 iterations), {len(items)} images 320x240, "
          f"{available_cpus()} cores available")
    print(f"{'workers':>8} {'wall s':>8} {'images/s':>10} {'speedup':>8}")
    ref, t1 = timed(run_pool, crf_job, items, 1)
    print(f"{1:>8} {t1:>8.2f} {len(items) / t1:>10.1f} {1.0:>7.1f}x")
    if workers > 1:
        out, tn = timed(run_pool, crf_job, items, workers)
        assert all(np.array_equal(a, b) for a, b in zip(ref, out)), "pool results differ from inline"
        print(f"{workers:>8} {tn:>8.2f} {len(items) / tn:>10.1f} {t1 / tn:>7.1f}x")


if __name__ == "__main__":
    main()
