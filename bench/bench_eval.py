#!/usr/bin/env python
"""Whole-process CAM evaluation: ``eval_miou.py`` against OC-CSE's ``evaluation.py``, same files.

Generates N VOC-sized images' ground truth (palette PNGs) and CAMs in a temporary folder, in both
formats: OC-CSE's (``experiments/<name>/dict/<id>.npy`` dicts, lists under
``data/VOC2012/ImageSets/Segmentation``) and ours (``<id>.npz``, float16 as make_cam writes them).
Then times both programs as whole processes, interleaved (ours, official, official, ours, ...), over
OC-CSE's 30 background thresholds 0.10 .. 0.39, and checks that every threshold's mIoU agrees:
with the official output (printed to 3 decimals) and always with a plain per-threshold reference
computed here. Every class occurs in the data, so OC-CSE's mean over all 21 classes and our
mean over the classes present are the same number.

The official script is not part of this repository: extract it from KAIST-vilab/OC-CSE and pass
its path; it imports pandas (``--official-pythonpath`` adds a folder holding it).

    python bench/bench_eval.py --official /tmp/ocse/evaluation.py --official-pythonpath /tmp/offdeps
    python bench/bench_eval.py --images 4 --height 40 --width 50 --repeats 1   # ours only (tests)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from caee.core.io import save_cam_npz, save_label_png  # noqa: E402

NUM_CLASSES = 20
THRESHOLDS = [i / 100.0 + 0.1 for i in range(30)]  # OC-CSE evaluation.py: 0.10 .. 0.39, computed the same way
NAME = "bench"


def _image(rng: np.random.Generator, i: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gt (H, W) uint8, keys (K,), cams (K, H, W) float16-exact float32) of image ``i``.

    Class ``i % 20`` is always present so that every class occurs over 20+ images."""
    k = int(rng.integers(1, 4))
    keys = np.unique(np.concatenate([[i % NUM_CLASSES], rng.choice(NUM_CLASSES, size=k - 1, replace=False)]))
    gt = np.zeros((h, w), np.uint8)
    cams = np.empty((len(keys), h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for j, c in enumerate(keys):
        y0, x0 = int(rng.integers(0, h * 3 // 4)), int(rng.integers(0, w * 3 // 4))
        y1, x1 = y0 + int(rng.integers(h // 8 + 1, h // 2 + 2)), x0 + int(rng.integers(w // 8 + 1, w // 2 + 2))
        inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        gt[inside] = c + 1
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        blob = np.exp(-(((yy - cy) / max(y1 - y0, 1)) ** 2 + ((xx - cx) / max(x1 - x0, 1)) ** 2) * 2)
        cams[j] = np.clip(0.8 * blob + 0.2 * rng.random((h, w)), 0, 1)
    edge = np.zeros_like(gt, bool)  # object boundaries are 255 in VOC's ground truth
    edge[:, 1:] |= gt[:, 1:] != gt[:, :-1]
    edge[1:, :] |= gt[1:, :] != gt[:-1, :]
    gt[edge] = 255
    return gt, keys, cams.astype(np.float16).astype(np.float32)


def generate(root: Path, n: int, h: int, w: int, seed: int = 0) -> list[str]:
    """Write the data set in both formats under ``root``; returns the image ids."""
    voc = root / "data" / "VOC2012"
    for d in ("ImageSets/Segmentation", "SegmentationClass", "JPEGImages"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    official_dir = root / "experiments" / NAME / "dict"
    ours_dir = root / "cam_npz"
    official_dir.mkdir(parents=True, exist_ok=True)
    ours_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"2007_{i:06d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        gt, keys, cams = _image(rng, i, h, w)
        save_label_png(voc / "SegmentationClass" / f"{image_id}.png", gt)
        (voc / "JPEGImages" / f"{image_id}.jpg").touch()  # our split loader checks the images exist
        np.save(official_dir / f"{image_id}.npy", {int(c): cams[j] for j, c in enumerate(keys)})
        save_cam_npz(ours_dir / f"{image_id}.npz", keys, cams.astype(np.float16))
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return ids


def reference_mious(root: Path, ids: list[str]) -> list[float]:
    """mIoU (%) per threshold by the plain procedure: label = argmax over [t, cams], one confusion
    matrix per threshold, IoU = TP / (GT + P - TP) over the 21 classes."""
    from caee.core.io import load_cam_npz, load_label_png

    n = NUM_CLASSES + 1
    conf = np.zeros((len(THRESHOLDS), n, n), np.int64)
    for image_id in ids:
        gt = load_label_png(root / "data/VOC2012/SegmentationClass" / f"{image_id}.png")
        keys, cams = load_cam_npz(root / "cam_npz" / f"{image_id}.npz")
        full = np.zeros((n,) + gt.shape, np.float32)
        full[keys + 1] = cams
        valid = gt < 255
        for ti, t in enumerate(THRESHOLDS):
            full[0] = t
            pred = np.argmax(full, axis=0)
            conf[ti] += np.bincount(gt[valid].astype(np.int64) * n + pred[valid], minlength=n * n).reshape(n, n)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    union = conf.sum(1) + conf.sum(2) - tp
    return (100 * (tp / union).mean(axis=1)).tolist()


def ours_command(root: Path, workers: int) -> list[str]:
    cfg = root / "caee.yaml"
    cfg.write_text(json.dumps({  # JSON is YAML
        "work_dir": str(root / "work"), "device": "cpu",
        "data": {"dataset": "voc", "root": str(root / "data/VOC2012"), "cam_split": "train"},
        "eval": {"dir": str(root / "cam_npz"), "thresholds": THRESHOLDS, "threshold": THRESHOLDS[15],
                 "out": str(root / "ours.json"), "workers": workers}}))
    return [sys.executable, str(ROOT / "eval_miou.py"), "--config", str(cfg)]


def official_command(script: Path) -> list[str]:
    return [sys.executable, str(script), "--list", "train", "--name", NAME, "--task", "cam", "--dict_dir", "dict",
            "--gt_dir", "data/VOC2012/SegmentationClass"]


def run_timed(cmd: list[str], cwd: Path, pythonpath: str) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return dt, out.stdout


def parse_official(stdout: str) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(r"threshold: [0-9.]+\s+mIoU: ([0-9.]+)%", stdout)]


def ours_mious(root: Path) -> list[float]:
    res = json.loads((root / "ours.json").read_text())
    return [100 * s["miou"] for s in res["sweep"]][: len(THRESHOLDS)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, help="path of OC-CSE's evaluation.py (omit: time ours only)")
    p.add_argument("--official-pythonpath", default="", help="folder(s) with the official script's imports (pandas)")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each program, interleaved")
    p.add_argument("--workers", type=int, default=0, help="eval.workers for ours (0 = all cores)")
    p.add_argument("--dir", type=Path, help="work in this folder (kept) instead of a temporary one")
    args = p.parse_args()

    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="bench_eval_")
    root = args.dir or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    ids = generate(root, args.images, args.height, args.width)
    reference = reference_mious(root, ids)
    ours_cmd = ours_command(root, args.workers)
    run_timed(ours_cmd, root, str(ROOT))  # warm-up: caches the image-level labels as any first stage does
    times: dict[str, list[float]] = {"ours": [], "official": []}
    official_out = ""
    for r in range(args.repeats):
        order = ["ours", "official"] if r % 2 == 0 else ["official", "ours"]
        for which in order:
            if which == "ours":
                times["ours"].append(run_timed(ours_cmd, root, str(ROOT))[0])
            elif args.official:
                pp = os.pathsep.join(x for x in (args.official_pythonpath, str(args.official.parent)) if x)
                dt, official_out = run_timed(official_command(args.official), root, pp)
                times["official"].append(dt)

    ours = ours_mious(root)
    worst = max(abs(a - b) for a, b in zip(ours, reference))
    print(f"{args.images} images of {args.width}x{args.height}, {len(THRESHOLDS)} thresholds, "
          f"{os.cpu_count()} CPUs; whole processes, {args.repeats} interleaved runs each")
    print(f"{'program':<34}{'runs (s)':<30}{'median s':>10}")
    for which, ts in times.items():
        if ts:
            print(f"{which:<34}{' '.join(f'{t:.2f}' for t in ts):<30}{statistics.median(ts):>10.2f}")
    best = int(np.argmax(ours))
    print(f"ours: best mIoU {ours[best]:.3f}% at threshold {THRESHOLDS[best]:.2f}; "
          f"largest difference to the plain reference {worst:.2e} points")
    ok = worst < 1e-6
    if times["official"]:
        official = parse_official(official_out)
        if len(official) != len(THRESHOLDS):
            raise SystemExit(f"could not read 30 mIoU values from the official output:\n{official_out}")
        diff = max(abs(a - b) for a, b in zip(ours, official))
        speedup = statistics.median(times["official"]) / statistics.median(times["ours"])
        print(f"official: best mIoU {max(official):.3f}%; largest difference to ours {diff:.4f} points "
              f"(official prints 3 decimals)")
        print(f"speed-up (median official / median ours): {speedup:.1f}x")
        ok = ok and diff <= 0.0005 + 1e-6
    print("mIoU agrees" if ok else "mIoU DISAGREES")
    if tmp is not None:
        tmp.cleanup()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
