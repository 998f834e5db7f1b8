#!/usr/bin/env python
"""Time one CGNet training step: our frozen OC vs the official variant whose OC parameters still
require gradients (OC-CSE keeps requires_grad=True on the ordinary classifier it never updates).

Each variant runs in its own subprocess so that peak memory (CUDA: max_memory_allocated; CPU:
peak RSS) is its own. Prints images/s and peak memory per variant.

    python bench/bench_cgnet_step.py                       # CPU, ResNet38 width 0.25, 4 x 3 x 192 x 192
    python bench/bench_cgnet_step.py --device cuda --width 1 --size 384 --batch 8 --steps 20
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_variant(args) -> dict:
    import torch
    import torch.nn.functional as F

    from caee.erasing import cse_loss, erased_logits, erasing_mask, sample_targets
    from caee.models.classifier import CamClassifier
    from caee.models.resnet38 import ResNet38

    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    oc = CamClassifier(ResNet38(args.width), 20, dropout=0.5).to(device).eval()
    for p in oc.parameters():
        p.requires_grad_(args.variant == "official")
    cgnet = CamClassifier(ResNet38(args.width), 20, dropout=0.0).to(device).train()
    cgnet.backbone.freeze()
    if cuda:
        oc = oc.to(memory_format=torch.channels_last)
        cgnet = cgnet.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in cgnet.parameters() if p.requires_grad], lr=1e-3)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = (torch.rand(args.batch, 20, device=device) > 0.85).float()
    labels[:, 0] = 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def step():
        with autocast:
            logits, maps = cgnet(images)
            t = sample_targets(labels)
            mask = erasing_mask(maps, t, (args.size, args.size))
            loss = F.multilabel_soft_margin_loss(logits.float(), labels) + cse_loss(erased_logits(oc, images, mask), labels, t)
        opt.zero_grad(set_to_none=True)
        if args.variant == "official":
            oc.zero_grad(set_to_none=False)  # the official loop keeps (and clears) OC gradients too
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": args.variant, "images_per_s": args.batch * args.steps / dt, "peak_mib": peak / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variant", choices=["ours", "official"])
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for variant in ("ours", "official"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "variant" and v is not None]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"CGNet step, ResNet38 width {args.width}, batch {args.batch} x {args.size}^2, {args.device}")
    print(f"{'variant':<28}{'images/s':>10}{'peak MiB':>12}")
    names = {"ours": "ours (OC frozen)", "official": "official (OC requires_grad)"}
    for r in rows:
        print(f"{names[r['variant']]:<28}{r['images_per_s']:>10.2f}{r['peak_mib']:>12.0f}")


if __name__ == "__main__":
    main()
