"""Set-up every stage does first: device, process group, output folder, logging, saved config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from caee import distributed
from caee.config import Config, save_config, stage_dir
from caee.crf import available_cpus
from caee.logs import setup_logging


_START_THREADS = torch.get_num_threads()  # honours OMP_NUM_THREADS / a caller's set_num_threads before import


@dataclass
class StageEnv:
    device: torch.device
    out_dir: Path


def start_stage(cfg: Config, name: str, seed: int | None = None, out_dir: Path | None = None,
                loader_workers: int | None = None) -> StageEnv:
    """Resolve the device, join torchrun's group, set up ``<work_dir>/<name>`` (or ``out_dir``) with
    log and config; seed the global RNG first so that network initialisation is reproducible.
    loader_workers: DataLoader worker processes the stage runs (None = ``data.num_workers``); on
    the CPU the stage computes with the cores they leave."""
    if seed is not None:
        torch.manual_seed(seed)
    device = distributed.resolve_device(cfg.device)
    distributed.init_distributed(device)
    if device.type == "cpu":
        # each DataLoader worker and each rank is a busy process too: more threads than cores
        # makes PyTorch's spinning OpenMP threads fight (measured 10x slower on 2 cores)
        # counted from the threads the process started with, not the current count: run_pipeline
        # calls every stage in one process and an earlier stage's workers must not lower a later one's
        workers = cfg.data.num_workers if loader_workers is None else loader_workers
        per_rank = available_cpus() // distributed.world_size()
        torch.set_num_threads(max(1, min(_START_THREADS, per_rank - workers)))
    out_dir = out_dir or stage_dir(cfg, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(out_dir)
    if distributed.is_main():
        save_config(cfg, out_dir)
    return StageEnv(device, out_dir)


def default_path(value: str, cfg: Config, *parts: str) -> Path:
    """``value`` when set, else ``<work_dir>/<parts...>`` (how stages find the previous stage's output)."""
    return Path(value) if value else Path(cfg.work_dir).joinpath(*parts)


def crf_dir(cam_dir: Path, alpha: float) -> Path:
    """Where the dense-CRF labels of the CAMs in ``cam_dir`` with background alpha live:
    ``<work_dir>/cam_cgnet`` -> ``<work_dir>/cam_cgnet_crf_4`` (alpha 4)."""
    return cam_dir.parent / f"{cam_dir.name}_crf_{alpha:g}"


def cell_label_dir(cam_dir: Path, la_alpha: float, ha_alpha: float, stride: int) -> Path:
    """Where AffinityNet's cell label tables (PSA's pooled la/ha CRF labels, caee.affinity_labels)
    of the CAMs in ``cam_dir`` live: ``<work_dir>/cam_cgnet`` -> ``<work_dir>/cam_cgnet_cells_4_24_s8``."""
    return cam_dir.parent / f"{cam_dir.name}_cells_{la_alpha:g}_{ha_alpha:g}_s{stride}"
