"""What every stage does first: seed, device, process group, threads, its locked folder, log and saved config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from caee.core import distributed
from caee.core.config import Config, save_config
from caee.core.io import claim_folder
from caee.core.layout import Layout
from caee.core.logs import setup_logging
from caee.core.parallel import available_cpus

_START_THREADS = torch.get_num_threads()  # honours OMP_NUM_THREADS / a caller's set_num_threads before import


@dataclass
class StageEnv:
    device: torch.device
    out_dir: Path


def start_stage(cfg: Config, name: str, seed: int | None = None, out_dir: Path | None = None,
                loader_workers: int | None = None, before_write: Callable[[Path], None] | None = None) -> StageEnv:
    """Seed the global RNG (reproducible initial weights), resolve the device, join torchrun's group,
    set up ``<work_dir>/<name>`` (or ``out_dir``) with log and config. loader_workers: DataLoader
    worker processes (None = ``data.num_workers``); on the CPU the stage computes with the cores
    they leave. before_write(out_dir): checks that may refuse the run, done once the folder is
    locked and before config.yaml / log.txt change (rank 0)."""
    if seed is not None:
        torch.manual_seed(seed)
    device = distributed.resolve_device(cfg.device)
    distributed.init_distributed(device)
    if device.type == "cpu":
        # each loader worker and rank is a busy process: more threads than cores makes OpenMP's
        # spinning threads fight (measured 10x slower on 2 cores). Counted from the threads the
        # process started with: an earlier stage of run_pipeline must not lower a later one's.
        workers = cfg.data.num_workers if loader_workers is None else loader_workers
        per_rank = available_cpus() // distributed.world_size()
        torch.set_num_threads(max(1, min(_START_THREADS, per_rank - workers)))
    out_dir = out_dir or Layout(cfg).stage_dir(name)
    claim_folder(out_dir, main=distributed.is_main())  # the ranks of one group share their folders
    if before_write is not None and distributed.is_main():
        before_write(out_dir)
    distributed.barrier()  # the other ranks start once rank 0 has checked (and maybe cleared) the folder
    setup_logging(out_dir)
    if distributed.is_main():
        save_config(cfg, out_dir)
    return StageEnv(device, out_dir)
