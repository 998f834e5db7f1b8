"""Benchmark: multi-scale + flip CAM inference (caee.method.cam.multiscale_cams), images per second.

Usage: python bench/bench_make_cam.py [--width 0.25] [--images 4] [--scales 0.5 1 1.5 2]
                                      [--cuda-width 1.0] [--device auto|cpu|cuda] [--threads N]
CPU: a ResNet38 of channel width --width on synthetic-sized (96x96; batch 1 and 4, forward only and
forward + saving the float16 npz) and VOC-sized (500x375, batch 1) random images, 2 classes each.
CUDA (when available): the same plus a ResNet38 of --cuda-width (1.0 = the paper's network), with
bf16 autocast on/off and channels_last on/off. Random weights: the speed does not depend on them.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from caee.method.cam import multiscale_cams  # noqa: E402
from caee.core.config import NetConfig  # noqa: E402
from caee.core.io import save_cam_npz  # noqa: E402
from caee.models.classifier import build_classifier  # noqa: E402

SIZES = {"synthetic 96x96": (96, 96), "VOC 500x375": (375, 500)}


def make_images(n: int, h: int, w: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def run(model, images, scales, batch, device, amp, save_dir: Path | None) -> float:
    """Images per second over ``images`` (after one warm-up batch)."""
    keys = [np.array([3, 14])] * len(images)
    multiscale_cams(model, images[:batch], keys[:batch], scales, True, device, amp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for s in range(0, len(images), batch):
        cams = multiscale_cams(model, images[s:s + batch], keys[s:s + batch], scales, True, device, amp)
        if save_dir is not None:
            for j, c in enumerate(cams):
                save_cam_npz(save_dir / f"{s + j}.npz", keys[s + j], c.astype(np.float16))
    return len(images) / (time.perf_counter() - t0)


def build(width: float, device: torch.device, channels_last: bool):
    torch.manual_seed(0)
    model = build_classifier(NetConfig(backbone="resnet38", width=width, dropout=0.0), 20).eval().to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    print(f"{'images':<17} {'batch':>5} {'variant':<28} {'images/s':>9}")
    for name, batch, variant, ips in rows:
        print(f"{name:<17} {batch:>5} {variant:<28} {ips:>9.2f}")


def bench_device(device: torch.device, width: float, n: int, scales, tmp: Path, variants: bool) -> list[tuple]:
    """Rows (images, batch, variant, images/s). On the CPU the VOC-sized run is batch 1 only (slow)."""
    cuda = device.type == "cuda"
    model = build(width, device, channels_last=cuda)
    rows = []
    for name, (h, w) in SIZES.items():
        images = make_images(n, h, w)
        rows.append((name, 1, "forward", run(model, images, scales, 1, device, True, None)))
        if cuda or name.startswith("synthetic"):
            rows.append((name, 4, "forward", run(model, images, scales, 4, device, True, None)))
            rows.append((name, 1, "forward + save npz", run(model, images, scales, 1, device, True, tmp)))
    if cuda and variants:
        images = make_images(n, *SIZES["VOC 500x375"])
        plain = build(width, device, channels_last=False)
        rows.append(("VOC 500x375", 1, "fp32, channels_last", run(model, images, scales, 1, device, False, None)))
        rows.append(("VOC 500x375", 1, "bf16, contiguous", run(plain, images, scales, 1, device, True, None)))
        rows.append(("VOC 500x375", 1, "fp32, contiguous", run(plain, images, scales, 1, device, False, None)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=0.25, help="ResNet38 width on the CPU")
    ap.add_argument("--cuda-width", type=float, default=1.0, help="ResNet38 width on CUDA")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default); on a "
                    "machine shared with other jobs 1 avoids OpenMP spin-wait collapse")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"multi-scale CAMs: scales {args.scales} + flip ({2 * len(args.scales)} passes), {args.images} images, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    with tempfile.TemporaryDirectory() as tmp:
        if args.device in ("auto", "cpu"):
            table(f"CPU, ResNet38 width {args.width} (bf16 autocast is CUDA only: fp32)",
                  bench_device(torch.device("cpu"), args.width, args.images, args.scales, Path(tmp), False))
        if args.device in ("auto", "cuda") and torch.cuda.is_available():
            dev = torch.device("cuda")
            name = torch.cuda.get_device_name(dev)
            for width in sorted({args.width, args.cuda_width}):
                table(f"CUDA ({name}), ResNet38 width {width}, bf16 + channels_last unless noted",
                      bench_device(dev, width, max(args.images, 16), args.scales, Path(tmp), width == args.cuda_width))
        elif args.device == "cuda":
            print("CUDA not available")


if __name__ == "__main__":
    main()
