"""Benchmark: DeepLab training and inference throughput on the CPU (or a GPU with --device cuda).

Usage: python bench/bench_deeplab.py [--backbone tinycnn] [--width 1.0] [--head largefov|aspp|both]
                                     [--batch 8] [--size 96] [--steps 20] [--threads N] [--device cpu]
                                     [--amp] [--classes 5]

Training step = forward, logits upsampled to the crop, cross-entropy (255 ignored), backward, SGD
step with the engine's parameter groups: the work of one engine step without data loading.
Inference = caee.method.segment.predict on one image: single scale, and 4 scales + flip (8 passes).
Random tensors, no files. Prints images/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from caee.core.config import DeeplabTrainConfig, NetConfig  # noqa: E402
from caee.engine.trainer import build_optimizer, parameter_groups  # noqa: E402
from caee.models.deeplab import build_deeplab  # noqa: E402
from caee.method.segment import predict  # noqa: E402
from caee.stages.train_deeplab import segmentation_loss  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if (amp and device.type == "cuda") else nullcontext()


def bench_train(model, cfg: DeeplabTrainConfig, batch: int, size: int, steps: int, device, amp: bool) -> float:
    model.train()
    opt = build_optimizer(parameter_groups(model, model.head_modules(), cfg), cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch, size, size), generator=g).to(device)
    y[:, :4] = 255
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            _sync(device)
            t0 = time.perf_counter()
        with _autocast(device, amp):
            loss, _ = segmentation_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def bench_predict(model, size: int, scales: list[float], flip: bool, n: int, device, amp: bool) -> float:
    model.eval()
    x = torch.randn(3, size, size, device=device)
    with _autocast(device, amp):
        predict(model, x, scales, flip)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            predict(model, x, scales, flip)
    _sync(device)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tinycnn")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--head", default="both", choices=["largefov", "aspp", "both"])
    p.add_argument("--classes", type=int, default=5, help="foreground classes C (the net has C + 1 outputs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast + channels_last (CUDA only), as the engine does")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg = DeeplabTrainConfig(lr=1e-3)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"device {device}, amp {a.amp}, torch threads {torch.get_num_threads()}, {a.backbone} width {a.width}, "
          f"batch {a.batch}, crop {a.size}x{a.size}, {a.classes}+1 classes")
    print(f"{'head':<9} {'params':>9} {'head ch':>8} {'train img/s':>12} {'infer 1x img/s':>15} {'infer 4s+flip img/s':>20}")
    for head in (["largefov", "aspp"] if a.head == "both" else [a.head]):
        torch.manual_seed(0)
        model = build_deeplab(NetConfig(backbone=a.backbone, width=a.width), a.classes + 1, head).to(device)
        model.backbone.freeze()
        if a.amp and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        n_params = sum(p.numel() for p in model.parameters())
        head_ch = model.head.fc6.out_channels if head == "largefov" else a.classes + 1
        train = bench_train(model, cfg, a.batch, a.size, a.steps, device, a.amp)
        single = bench_predict(model, a.size, [1.0], False, 10, device, a.amp)
        multi = bench_predict(model, a.size, [0.5, 1.0, 1.5, 2.0], True, 5, device, a.amp)
        print(f"{head:<9} {n_params:>9,d} {head_ch:>8} {train:>12.1f} {single:>15.1f} {multi:>20.1f}")


if __name__ == "__main__":
    main()
