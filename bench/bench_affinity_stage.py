#!/usr/bin/env python
"""AffinityNet stage costs at full size (ResNet38, width 1): one training step and one pseudo label.

Prints: training step time, images/s and peak GPU memory for ``--batch`` crops of ``--crop`` px
(bf16 autocast + channels_last on CUDA, as the engine runs it); per-image time of the pseudo-label
path (embeddings + affinities + random walk of ``--steps`` steps + upsampling) on a VOC-sized
image, for the full pair set and PSA's. Random weights: the costs do not depend on them.

    python bench/bench_affinity_stage.py --batch 8 --crop 448
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from caee.core.config import AffinityTrainConfig  # noqa: E402
from caee.engine.trainer import StepContext  # noqa: E402
from caee.models import ResNet38  # noqa: E402
from caee.models.affinitynet import AffinityNet  # noqa: E402
from caee.method.pseudo_labels import (PairCache, WalkParams, embed_image, labels_from_scores,  # noqa: E402
                                random_walk_scores)
from caee.stages.train_affinity import AffinityTask  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(model: AffinityNet, device: torch.device, batch: int, crop: int, iters: int) -> None:
    task = AffinityTask(model, AffinityTrainConfig(), ["c"] * 20)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    side = crop // 8
    labels = torch.randint(0, 3, (batch, side, side), generator=g).to(torch.uint8)
    labels[:, :, : side // 4] = 255
    data = {"image": torch.randn(batch, 3, crop, crop, generator=g), "aff_label": labels}
    cuda = device.type == "cuda"
    ctx = StepContext(device, 0, 0, 100, 0, cuda)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(iters + 2):
        _sync(device)
        t = time.perf_counter()
        with amp:
            loss, metrics = task.train_step(model, data, ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    dt = float(np.median(times))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    print(f"train step: batch {batch}, crop {crop}: {dt * 1000:.1f} ms/step, {batch / dt:.1f} images/s, "
          f"peak GPU memory {peak:.2f} GiB, pairs/image {metrics['n_pairs'] // batch}, loss {float(loss.detach()):.4f}")


def bench_pseudo(model: AffinityNet, device: torch.device, steps: int, iters: int, size: tuple[int, int]) -> None:
    model.eval()
    rng = np.random.default_rng(0)
    h, w = size
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cams = torch.from_numpy(rng.random((2, h, w), dtype=np.float32))
    for psa_border in (False, True):
        params = WalkParams(steps=steps, psa_border=psa_border)
        pairs = PairCache(params.radius, psa_border)
        t_embed, t_walk = [], []
        for i in range(iters + 1):
            _sync(device)
            t0 = time.perf_counter()
            feats = embed_image(model, image, 8, device)
            _sync(device)
            t1 = time.perf_counter()
            scores = random_walk_scores(feats, cams, params, 8, pairs)
            labels_from_scores(scores.cpu().numpy(), np.array([0, 1]))
            _sync(device)
            t2 = time.perf_counter()
            if i:
                t_embed.append(t1 - t0)
                t_walk.append(t2 - t1)
        print(f"pseudo label {w}x{h}, {steps} steps, {'PSA' if psa_border else 'full'} pair set: embeddings "
              f"{np.median(t_embed) * 1000:.1f} ms + walk/upsample/argmax {np.median(t_walk) * 1000:.1f} ms per image")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=448)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = AffinityNet(ResNet38(width=args.width))
    model.backbone.freeze()
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, width {args.width}")
    bench_train(model, device, args.batch, args.crop, args.iters)
    bench_pseudo(model, device, args.steps, args.iters, (375, 500))


if __name__ == "__main__":
    main()
