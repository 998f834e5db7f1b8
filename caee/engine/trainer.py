"""The training engine shared by the four trainers (classifier, CGNet, AffinityNet, DeepLab).

A trainer supplies a :class:`TrainTask` (the model, its new layers and one step's loss); the engine
does the rest: parameter groups, SGD/Adam with a poly or one-cycle schedule, bf16 autocast and
channels_last on CUDA, DDP under torchrun, DataLoader workers, progress, logs, NaN checks,
``last.pth`` checkpoints with automatic resume and the weights-only ``model.pth``.

Reproducibility: the sample order of epoch ``e`` and every sample's augmentation are drawn from
generators seeded by ``(seed, e, index)``, and the global RNG is checkpointed, so a run resumed
from ``last.pth`` continues exactly as an uninterrupted run would.
"""
from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from caee.core import distributed
from caee.core.records import LAST, MODEL

from caee.core.config import TrainConfig
from caee.core.errors import CaeeError
from caee.core.io import write_text
from caee.core.logs import MetricsWriter, show_progress
from caee.engine.monitor import Monitor
from caee.engine.sgd_in_backward import step_in_backward
from caee.weights.checkpoints import nonfinite_tensors, read_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class StepContext:
    """What a training step may need besides the batch."""
    device: torch.device
    epoch: int
    step: int                    # global optimisation step about to be taken (0-based)
    total_steps: int
    seed: int
    channels_last: bool

    def to_device(self, t: torch.Tensor, image: bool = False) -> torch.Tensor:
        t = t.to(self.device, non_blocking=True)
        if image and self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def generator(self) -> torch.Generator:
        """A CPU generator seeded by (seed, step): per-step randomness that survives resume."""
        return torch.Generator().manual_seed(_mix(self.seed, 7919, self.step))


class TrainTask:
    """One trainer's specifics. Subclasses set ``model`` and implement :meth:`train_step`."""

    model: nn.Module

    def head_modules(self) -> list[nn.Module]:
        """Newly initialised layers, trained at ``head_lr_mult`` x lr."""
        return []

    def train_step(self, model: nn.Module, batch: Any, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward one batch with ``model`` (the DDP-wrapped ``self.model``); return (loss, metrics)."""
        raise NotImplementedError

    def on_epoch_end(self, epoch: int, out_dir: Path) -> None:
        pass

    def export(self) -> dict:
        """What ``model.pth`` holds besides the weights (architecture, classes, ...)."""
        return {}


def _mix(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFF
    return h


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(epoch, i)`` is augmented with RNGs seeded by (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        s = _mix(self.seed, epoch, i)
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)
        try:
            return self.dataset[i]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for this rank: a seeded permutation cut into global batches, each
    split evenly over the ranks; ``start_batch`` skips batches already trained (resume)."""

    def __init__(self, n: int, global_batch: int, seed: int, epoch: int, start_batch: int = 0):
        self.n, self.global_batch, self.seed, self.epoch = n, global_batch, seed, epoch
        self.start_batch = start_batch
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.num_batches = n // global_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(_mix(self.seed, 104729, self.epoch))
        perm = torch.randperm(self.n, generator=g)[: self.num_batches * self.global_batch]
        per_rank = self.global_batch // self.world
        batches = perm.view(self.num_batches, self.world, per_rank)[self.start_batch:, self.rank]
        return iter([(self.epoch, int(i)) for i in batches.reshape(-1)])

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * (self.global_batch // self.world)


# ---------------------------------------------------------------- optimiser and schedule


def parameter_groups(model: nn.Module, heads: list[nn.Module], cfg: TrainConfig) -> list[dict]:
    """PSA's four groups: backbone weights, backbone biases (2x lr, no decay), head weights (10x),
    head biases (20x, no decay). Frozen parameters are left out."""
    head_ids = {id(p) for m in heads for p in m.parameters()}
    groups = {k: [] for k in ("w", "b", "hw", "hb")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bias = name.endswith(".bias") or p.ndim == 1
        groups[("h" if id(p) in head_ids else "") + ("b" if is_bias else "w")].append(p)
    spec = {"w": (1.0, cfg.weight_decay), "b": (cfg.bias_lr_mult, 0.0),
            "hw": (cfg.head_lr_mult, cfg.weight_decay), "hb": (cfg.head_lr_mult * cfg.bias_lr_mult, 0.0)}
    return [{"params": ps, "lr_mult": spec[k][0], "weight_decay": spec[k][1], "name": k}
            for k, ps in groups.items() if ps]


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at ``step``: poly ``(1 - step/total)^power`` or one-cycle
    (linear warm-up over the first 30 %, then cosine decay to zero)."""
    t = min(step / max(total, 1), 1.0)
    if cfg.schedule == "poly":
        return (1.0 - t) ** cfg.poly_power
    warm = 0.3
    if t < warm:
        return 0.04 + 0.96 * t / warm
    return 0.5 * (1.0 + math.cos(math.pi * (t - warm) / (1.0 - warm)))


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    ckpt = read_checkpoint(path, "delete it to start the stage afresh", mmap=mmap)
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "step", "rng"} <= set(ckpt):
        raise CaeeError(f"{path}: not a training checkpoint of this engine; delete it to start the stage afresh")
    bad = nonfinite_tensors(ckpt)
    if bad:
        raise CaeeError(f"{path}: holds {len(bad)} non-finite tensors (first: {bad[0]}), it cannot be resumed; "
                        "delete it to start the stage afresh")
    return ckpt


def _weights_finite(model: nn.Module) -> bool:
    """One device sync: every floating parameter and buffer (BN statistics) is finite."""
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the ``metrics.jsonl`` lines up to ``step`` (those after it are trained again)."""
    if not path.is_file() or not distributed.is_main():
        return
    import json

    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    write_text(path, "".join(kept))


def _diverged(out_dir: Path, what: str, step: int, epoch: int, last_path: Path) -> None:
    kept = f"the last finite checkpoint {last_path} is kept" if last_path.is_file() else "no checkpoint was written"
    raise CaeeError(f"{out_dir.name}: {what} at step {step} (epoch {epoch}); training stopped, {kept}. "
                    "Lower the learning rate or check the inputs.")


@dataclass
class FitResult:
    model_path: Path
    steps: int
    images_per_s: float


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def fit(task: TrainTask, dataset: Dataset, cfg: TrainConfig, out_dir: Path, device: torch.device,
        full_config: dict | None = None, num_workers: int = 0, stage: str = "") -> FitResult:
    """Train ``task.model`` on ``dataset``; resume from ``out_dir/last.pth`` when it exists.

    Writes ``last.pth`` (model, optimiser, step, RNG, config) every ``checkpoint_every`` steps and
    at each epoch end, ``metrics.jsonl``, and finally ``model.pth`` = {"model": weights, **export}.
    Whether ``last.pth`` belongs to this run is the stage's question, answered by the folder's
    record before ``fit`` is called (caee/stages/common.py). Only finite tensors are ever written:
    a non-finite loss or weight stops the run (CaeeError), the last checkpoint stays.
    """
    out_dir = Path(out_dir)
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise CaeeError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the {world} processes")
    steps_per_epoch = len(dataset) // cfg.batch_size  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise CaeeError(f"the training set has {len(dataset)} images, fewer than one batch of {cfg.batch_size}")
    total = cfg.epochs * steps_per_epoch
    stop_at = min(total, cfg.max_steps) if cfg.max_steps > 0 else total
    use_cuda = device.type == "cuda"
    channels_last = cfg.channels_last and use_cuda

    stage = stage or out_dir.name
    if cfg.step_in_backward and world > 1:  # before anything is removed or loaded
        raise CaeeError(f"{stage}.step_in_backward needs one process (DDP reduces gradients after the update); "
                        f"this run has {world}")
    last_path = out_dir / LAST
    ckpt = load_checkpoint(last_path) if last_path.is_file() else None

    model = task.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(parameter_groups(model, task.head_modules(), cfg), cfg)
    if cfg.step_in_backward:
        step_in_backward(optimizer)
    step = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CaeeError(f"{last_path} does not fit this model / optimiser ({str(e).splitlines()[0]}); "
                            f"use a new work_dir or set {stage}.overwrite=true to start over") from None
        step = int(ckpt["step"])
        if step > stop_at:
            raise CaeeError(f"{last_path} is at step {step}, beyond this run's last step {stop_at} (max_steps); "
                            f"use a new work_dir or set {stage}.overwrite=true to start over")
        _set_rng_state(ckpt["rng"])
        logger.info("resumed from %s at step %d / %d", last_path, step, stop_at)
    else:
        torch.manual_seed(cfg.seed)
    _truncate_metrics(out_dir / "metrics.jsonl", step)
    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)

    def checkpoint() -> None:
        save_checkpoint(last_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "step": step, "rng": _rng_state(), "config": full_config or {}})

    metrics_log = MetricsWriter(out_dir / "metrics.jsonl")
    monitor = Monitor.for_fit(out_dir, cfg, full_config, stop_at, step, distributed.is_main())
    samples = SeededSamples(dataset, cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (use_cuda and cfg.amp) else nullcontext()
    n_images, t_start = 0, time.perf_counter()
    while step < stop_at:
        epoch, start_batch = divmod(step, steps_per_epoch)
        sampler = EpochSampler(len(dataset), cfg.batch_size, cfg.seed, epoch, start_batch)
        loader = DataLoader(samples, batch_size=cfg.batch_size // world, sampler=sampler, drop_last=True,
                            num_workers=num_workers, pin_memory=use_cuda,
                            persistent_workers=False, generator=torch.Generator().manual_seed(cfg.seed))
        ddp_model.train()
        bar = tqdm(loader, desc=f"{out_dir.name} epoch {epoch + 1}/{cfg.epochs}", disable=not show_progress(),
                   dynamic_ncols=True, initial=start_batch, total=steps_per_epoch, leave=False)
        t_log, n_log = time.perf_counter(), 0
        for batch in bar:
            factor = lr_factor(step, total, cfg)
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * g["lr_mult"] * factor
            ctx = StepContext(device, epoch, step, total, cfg.seed, channels_last)
            with autocast:
                loss, metrics = task.train_step(ddp_model, batch, ctx)
            if not torch.isfinite(loss):
                _diverged(out_dir, f"loss became {loss.item()}", step, epoch, last_path)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not _weights_finite(model):
                _diverged(out_dir, "weights became non-finite", step, epoch, last_path)
            step += 1
            n_log += cfg.batch_size
            n_images += cfg.batch_size
            if step % cfg.log_every == 0 or step == stop_at:
                dt = time.perf_counter() - t_log
                rec = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "lr": cfg.lr * factor,
                       "images_per_s": n_log / max(dt, 1e-9), **metrics}
                metrics_log.write(**rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", ips=f"{rec['images_per_s']:.1f}")
                logger.debug("%s", rec)
                monitor.log(step, epoch, rec["loss"], rec["lr"], rec["images_per_s"], metrics)
                t_log, n_log = time.perf_counter(), 0
            if step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0 or step == stop_at:
                checkpoint()
            if step >= stop_at:
                break
        bar.close()
        if step % steps_per_epoch == 0:
            logger.info("%s: epoch %d/%d done (step %d, loss %.4f)", out_dir.name, epoch + 1, cfg.epochs, step, float(loss.detach()))
            task.on_epoch_end(epoch, out_dir)
            monitor.epoch_end(epoch, lambda p: save_checkpoint(p, {"model": _unwrap(model).state_dict(), **task.export()}))
    monitor.close()
    elapsed = time.perf_counter() - t_start
    ips = n_images / elapsed if n_images else 0.0
    model_path = out_dir / MODEL
    save_checkpoint(model_path, {"model": _unwrap(model).state_dict(), **task.export()})
    distributed.barrier()
    logger.info("%s: %d steps, %.1f images/s; weights in %s", out_dir.name, step, ips, model_path)
    return FitResult(model_path, step, ips)
