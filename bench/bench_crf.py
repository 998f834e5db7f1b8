#!/usr/bin/env python
"""Dense-CRF throughput with 1 worker (inline) and with N worker processes, measured repeatedly and
interleaved (1, N, N, 1, 1, N, ...) so that a change in the machine's load hits both alike.

The images are VOC-sized (500 x 375) with 1-3 classes whose CAMs are smooth blobs over matching
colour patches; each run labels the same images with ``crf_cam_labels`` (PSA's background alpha,
10 iterations) through the library's process pool, and the pool's labels must equal the inline
ones. Prints images/s per run, the medians and their ratio. Each worker computes single-threaded
(the pool sets torch's threads to 1; OMP_NUM_THREADS / MKL_NUM_THREADS = 1 are set here before
numpy loads so that no BLAS thread pool competes either).

    python bench/bench_crf.py                                  # 16 images, 3 repeats, 2 workers
    python bench/bench_crf.py --images 2 --height 30 --width 40 --repeats 1   # seconds (tests)
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caee.method.crf import crf_cam_labels  # noqa: E402

from caee.core.parallel import available_cpus, run_pool  # noqa: E402

NUM_CLASSES = 20
ALPHA = 4.0


def make_items(n: int, h: int, w: int, seed: int = 0) -> list:
    """(image (H, W, 3) uint8, keys (K,), cams (K, H, W) float32) per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    items = []
    for _ in range(n):
        img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        k = int(rng.integers(1, 4))
        keys = np.sort(rng.choice(NUM_CLASSES, size=k, replace=False))
        cams = np.empty((k, h, w), np.float32)
        for j in range(k):
            cy, cx = rng.integers(h // 5, 4 * h // 5), rng.integers(w // 5, 4 * w // 5)
            r = max(2, int(min(h, w) * rng.uniform(0.1, 0.3)))
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            img[d2 < r * r] = rng.integers(80, 255, size=3).astype(np.uint8)
            cams[j] = np.exp(-d2 / (2.0 * r * r))
        items.append((img, keys, cams))
    return items


def crf_job(item) -> np.ndarray:
    img, keys, cams = item
    return crf_cam_labels(img, keys, cams, ALPHA)


def one_run(items: list, workers: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = run_pool(crf_job, items, workers=workers)
    return len(items) / (time.perf_counter() - t0), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each setting, interleaved")
    args = p.parse_args()

    items = make_items(args.images, args.height, args.width)
    crf_job(items[0])  # warm-up: pydensecrf import and first-call costs stay out of the runs
    rates: dict[int, list[float]] = {1: [], args.workers: []}
    reference = None
    for r in range(args.repeats):
        for workers in ((1, args.workers) if r % 2 == 0 else (args.workers, 1)):
            ips, labels = one_run(items, workers)
            rates[workers].append(ips)
            if reference is None:
                reference = labels
            elif not all(np.array_equal(a, b) for a, b in zip(reference, labels)):
                raise SystemExit(f"labels with {workers} workers differ from the first run's")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"dense CRF, {args.images} images {args.width}x{args.height}, {available_cpus()} cores available, "
          f"load average {load:.1f}; {args.repeats} interleaved runs per setting")
    print(f"{'workers':>8}  {'images/s per run':<36}{'median':>8}")
    for workers, rs in rates.items():
        print(f"{workers:>8}  {' '.join(f'{x:.2f}' for x in rs):<36}{statistics.median(rs):>8.2f}")
    ratio = statistics.median(rates[args.workers]) / statistics.median(rates[1])
    print(f"speed-up of {args.workers} workers over 1 (median images/s): {ratio:.2f}x; labels identical")


if __name__ == "__main__":
    main()
