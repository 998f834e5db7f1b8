#!/usr/bin/env python
"""One CGNet training step: OC-CSE's official configuration against caee's step, side by side.

``official`` is the configuration of OC-CSE's training loop, written here from its description:
fp32, NCHW, a DataParallel wrapper around both networks (CUDA only), the OC in eval mode with its
parameters still requiring gradients (they are computed and accumulated every step, never used),
the mask of one randomly chosen present class per image taken from the CGNet's CAMs, upsampled
bilinearly, ReLU, divided by (max over the batch + 1e-5), the image multiplied by (1 - mask),
BCE-with-logits on the CGNet's and the OC's logits, SGD with momentum 5e-4 and four parameter
groups (OC-CSE passes its weight decay as SGD's positional momentum), gradients zeroed in place.

``caee`` is the library's own step: ``CGNetTask.train_step`` with the engine's optimiser, the OC
frozen by ``freeze_module`` (gradients reach the mask through the OC, but no OC weight gradient is
computed). Levers are added to it with ``+``: ``bf16`` (autocast), ``channels_last``, ``compile``
(torch.compile of both networks), ``foreach`` / ``fused`` (optimiser kernels), ``oc_grads`` (turns
the OC's weight gradients back on: what freezing saves), ``step_in_backward`` (each parameter's SGD
update applied as soon as its gradient is complete, which is then freed: the same update, without
holding every gradient at once: the engine's ``step_in_backward`` option, caee/engine/sgd_in_backward.py).
CUDA graphs are not offered: the step draws its targets on the CPU and indexes by them, which a captured graph cannot replay.

Each variant runs in its own subprocess so that peak memory (CUDA: max_memory_allocated; CPU:
peak RSS of that process) is its own; variants run interleaved ``--repeats`` times. Prints
images/s and peak memory per variant and their ratios to ``official``.

    python bench/bench_cgnet_step.py --width 1 --batch 2 --size 128            # the CPU goal (fp32)
    python bench/bench_cgnet_step.py --device cuda --width 1 --batch 8 --size 384 --steps 20 \\
        --variants official,caee,caee+bf16,caee+bf16+channels_last,caee+bf16+channels_last+fused
    python bench/bench_cgnet_step.py --width 0.0625 --batch 2 --size 32 --steps 1 --warmup 0   # tests
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVERS = ("bf16", "channels_last", "compile", "foreach", "fused", "oc_grads", "step_in_backward")
NUM_CLASSES = 20


def _nets(width: float, device):
    import torch

    from caee.models.classifier import CamClassifier
    from caee.models.resnet38 import ResNet38

    torch.manual_seed(0)
    oc = CamClassifier(ResNet38(width), NUM_CLASSES, dropout=0.5)
    cgnet = CamClassifier(ResNet38(width), NUM_CLASSES, dropout=0.0)
    return oc.to(device), cgnet.to(device)


def _batch(args, device):
    import torch

    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    labels = (torch.rand(args.batch, NUM_CLASSES, generator=g) > 0.85).float()
    labels[:, 0] = 1  # every image has a class to erase
    return images.to(device), labels.to(device)


def official_step_fn(args, device):
    """OC-CSE's configuration (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    oc, cgnet = _nets(args.width, device)
    oc.eval()                        # gradients stay on: requires_grad is never switched off
    cgnet.train()
    cgnet.backbone.freeze()          # conv1a, b2* and BatchNorm are not trained (as in the official Net_er)
    heads = {id(p) for p in cgnet.fc8.parameters()}
    groups = [[], [], [], []]
    for name, p in cgnet.named_parameters():
        if p.requires_grad:
            groups[(2 if id(p) in heads else 0) + (1 if name.endswith("bias") else 0)].append(p)
    lr, wd = 0.01, 5e-4
    opt = torch.optim.SGD([{"params": groups[0], "lr": lr, "weight_decay": wd},
                           {"params": groups[1], "lr": 2 * lr, "weight_decay": 0},
                           {"params": groups[2], "lr": 10 * lr, "weight_decay": wd},
                           {"params": groups[3], "lr": 20 * lr, "weight_decay": 0}],
                          lr, momentum=wd)  # OC-CSE: weight decay lands in SGD's momentum slot
    if device.type == "cuda":
        oc, cgnet = nn.DataParallel(oc), nn.DataParallel(cgnet)
    images, labels = _batch(args, device)
    bce = nn.BCEWithLogitsLoss()
    w = 0.3                          # cc_init + cc_slope * epoch at epoch 0

    def step():
        opt.zero_grad(set_to_none=False)  # the CGNet's optimiser only: the OC's gradients accumulate
        logits, maps = cgnet(images)
        chosen = torch.zeros_like(labels)
        for i in range(labels.shape[0]):
            present = torch.nonzero(labels[i], as_tuple=False)
            chosen[i, present[torch.randint(0, len(present), (1,))][0]] = 1
        remain = labels * (1 - chosen)
        mask = maps[chosen == 1].unsqueeze(1)
        mask = F.relu(F.interpolate(mask, images.shape[2:], mode="bilinear", align_corners=False))
        mask = mask / (mask.max() + 1e-5)
        oc_logits = oc(images * (1 - mask))[0]
        loss_all, loss_select = bce(logits, labels), w * bce(oc_logits, remain)
        (loss_all + loss_select).backward()
        opt.step()
        loss_all.item(), loss_select.item()

    return step


def caee_step_fn(args, device, levers: set[str]):
    """The library's step: CGNetTask.train_step, the engine's optimiser and zeroing."""
    import torch

    from caee.core.config import Config
    from caee.engine.trainer import StepContext, build_optimizer, parameter_groups
    from caee.stages.train_cgnet import CGNetTask, freeze_module

    cfg = Config()
    oc, cgnet = _nets(args.width, device)
    freeze_module(oc)
    if "oc_grads" in levers:
        for p in oc.parameters():
            p.requires_grad_(True)
    cgnet.train()
    cgnet.backbone.freeze()
    channels_last = "channels_last" in levers
    if channels_last:
        oc, cgnet = oc.to(memory_format=torch.channels_last), cgnet.to(memory_format=torch.channels_last)
    task = CGNetTask(cgnet, oc, cfg, [f"c{i}" for i in range(NUM_CLASSES)])
    tc = cfg.train_cgnet
    opt = build_optimizer(parameter_groups(cgnet, task.head_modules(), tc), tc)
    for g in opt.param_groups:
        if "foreach" in levers:
            g["foreach"] = True
        if "fused" in levers:
            g["fused"] = True
    if "step_in_backward" in levers:   # the engine's train_*.step_in_backward
        from caee.engine.sgd_in_backward import step_in_backward

        step_in_backward(opt)
    model = cgnet
    if "compile" in levers:
        model = torch.compile(cgnet)
        task.oc = torch.compile(oc)
    images, labels = _batch(args, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in levers else nullcontext()
    counter = [0]

    def step():
        ctx = StepContext(device, epoch=0, step=counter[0], total_steps=10 ** 6, seed=0, channels_last=channels_last)
        counter[0] += 1
        with autocast:
            loss, _ = task.train_step(model, {"image": images, "label": labels}, ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run_variant(args) -> dict:
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name, *levers = args.variant.split("+")
    unknown = set(levers) - set(LEVERS)
    if name not in ("official", "caee") or unknown or (name == "official" and levers):
        raise SystemExit(f"unknown variant {args.variant!r}: official, or caee with levers {'+'.join(LEVERS)}")
    step = official_step_fn(args, device) if name == "official" else caee_step_fn(args, device, set(levers))
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
    return {"variant": args.variant, "images_per_s": args.batch * args.steps / dt, "peak_mib": peak / 2 ** 20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=float, default=1.0, help="ResNet38 channel multiplier (1 = the paper)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="runs of every variant, interleaved")
    p.add_argument("--threads", type=int, default=0, help="torch threads per variant (0 = torch's default)")
    p.add_argument("--variants", default="official,caee", help="comma-separated; caee+LEVER+... adds levers")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            cmd = [sys.executable, __file__, "--variant", v] + [
                f"--{k}={x}" for k, x in vars(args).items() if k not in ("variant", "variants", "repeats")]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"variant {v} failed:\n{out.stderr[-3000:]}")
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"CGNet step, ResNet38 width {args.width:g}, batch {args.batch} x {args.size}^2, {args.device}, "
          f"{args.steps} timed steps after {args.warmup}, {args.repeats} run(s) per variant")
    mem = "peak MiB (CUDA allocated)" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"{'variant':<44}{'images/s':>10}{mem:>26}{'speed':>8}{'memory':>8}")
    med = {v: (statistics.median(r["images_per_s"] for r in rs), statistics.median(r["peak_mib"] for r in rs))
           for v, rs in runs.items()}
    base = med.get("official")
    for v, (ips, peak) in med.items():
        ratio = f"{ips / base[0]:>7.2f}x{peak / base[1]:>7.2f}x" if base else ""
        print(f"{v:<44}{ips:>10.3f}{peak:>26.0f}{ratio}")


if __name__ == "__main__":
    main()
