"""Set-up every stage does first: device, process group, output folder, logging, saved config."""
from __future__ import annotations

import functools
import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from caee.core import distributed, records
from caee.core.config import Config, expand_work_dir, save_config
from caee.data import SplitIndex, dataset_class_names, ensure_dataset, load_split
from caee.core.io import claim_folder as io_claim_folder
from caee.core.layout import Layout
from caee.core.parallel import available_cpus
from caee.core.logs import setup_logging
from caee.core.errors import CaeeError
from caee.stages import table
from caee.weights.checkpoints import read_checkpoint


_START_THREADS = torch.get_num_threads()  # honours OMP_NUM_THREADS / a caller's set_num_threads before import


@dataclass
class StageEnv:
    device: torch.device
    out_dir: Path


def start_stage(cfg: Config, name: str, seed: int | None = None, out_dir: Path | None = None,
                loader_workers: int | None = None, before_write: Callable[[Path], None] | None = None) -> StageEnv:
    """Resolve the device, join torchrun's group, set up ``<work_dir>/<name>`` (or ``out_dir``) with
    log and config; seed the global RNG first so that network initialisation is reproducible.
    loader_workers: DataLoader worker processes the stage runs (None = ``data.num_workers``); on
    the CPU the stage computes with the cores they leave. before_write(out_dir): checks that may
    refuse the run, done once the folder is locked and before config.yaml / log.txt change."""
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
    out_dir = out_dir or Layout(cfg).stage_dir(name)
    claim_folder(out_dir)
    if before_write is not None and distributed.is_main():
        before_write(out_dir)
    distributed.barrier()  # the other ranks start once rank 0 has checked (and maybe cleared) the folder
    setup_logging(out_dir)
    if distributed.is_main():
        save_config(cfg, out_dir)
    return StageEnv(device, out_dir)


def claim_folder(folder: Path) -> None:
    """:func:`caee.core.io.claim_folder` on rank 0 (the ranks of one torchrun group share their stage
    folders); the other ranks only make sure it exists."""
    io_claim_folder(folder, main=distributed.is_main())


def _input_id(path: Path, key: str) -> str:
    """What identifies an upstream output: the run id in its folder's record (a trainer's folder for
    its model.pth, which must be readable), else a hash of a file made elsewhere (PSA's weights).
    A missing, unreadable or unfinished input is a CaeeError naming ``key``: checked before a stage
    removes or writes anything."""
    folder = path if path.is_dir() else path.parent
    record = records.read(folder) if path.exists() else None
    if path.is_file():
        read_checkpoint(path, f"it is the input set by {key}; re-run the stage that makes it", mmap=True)
    if record is not None and (path.is_dir() or path.name == records.MODEL):
        if not record["complete"]:
            raise CaeeError(f"{folder} is unfinished (its record lists no complete part); finish the stage that "
                            f"makes it, or set {key}")
        return record["run"]
    if path.is_file():
        st = path.stat()
        return _file_hash(str(path), st.st_size, st.st_mtime_ns)
    if path.is_dir():
        return "unrecorded"  # a folder made elsewhere (e.g. CAMs of another code base)
    raise CaeeError(f"input not found: {path} (config key {key}); run the stage that makes it first, or set {key}")


@functools.lru_cache(maxsize=16)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()[:16]}"


def stage_settings(cfg: Config, name: str) -> dict:
    """What the output of stage ``name`` records (its row in caee/stages/table.py): the settings of its
    sections, less the keys that only choose which files are made, and ``input.<name>``: the id of
    every upstream output it reads (:func:`_input_id`). An input path key is recorded by the id
    alone, so a moved work_dir and a stage run alone (an empty key) record the same settings as
    ``caee run`` (which writes the paths out)."""
    row = table.stage(name)
    settings = records.settings_of(cfg, row.sections)
    for input_name, (key, path) in row.inputs(Layout(cfg)).items():
        settings.pop(key, None)
        settings[f"input.{input_name}"] = _input_id(Path(path), key)
    settings = {k: v for k, v in settings.items() if k not in row.not_recorded}
    for key, path in recorded_paths(cfg, name, settings).items():  # e.g. an init naming another model.pth
        settings[f"input.{key}"] = _input_id(path, key)
    return settings


def recorded_paths(cfg: Config, name: str, settings: dict) -> dict[str, Path]:
    """The path settings (``init``, ``weights``, ...) that name another stage's output (a folder
    with a record, or a model.pth): what stage ``name`` reads besides its row's inputs."""
    output = table.stage(name).output
    own = Path(output(Layout(cfg))).absolute() if output else None
    out = {}
    for key, value in settings.items():
        if isinstance(value, str) and "/" in value and not key.startswith("input."):
            path = Path(value.replace("{work_dir}", str(cfg.work_dir))).absolute()
            folder = path if path.is_dir() else path.parent
            if own is not None and (path == own or own in path.parents):
                continue
            if (folder / records.RECORD).is_file() or path.name == records.MODEL:
                out[key] = path
    return out


def open_output(folder: Path, name: str, settings: dict, overwrite: bool, outputs: str = "*") -> dict:
    """The record of the output ``folder`` of stage ``name`` before anything is written in it (rank 0):

    - no record: an empty folder starts, one holding files made elsewhere is refused;
    - the same settings: resumed (kept run id);
    - other settings: refused unless ``overwrite`` (or only max_steps changed: a trainer continues);
      with ``overwrite`` the folder's files go and a new run starts.
    ``outputs``: the glob of the files whose presence means outputs exist."""
    row = table.stage(name)
    try:
        record = records.read(folder)
    except CaeeError:
        if not overwrite:
            raise
        record = None  # an unreadable record is replaced with the outputs it described
    if record is not None:
        diffs = records.differences(record["settings"], settings)
        if not diffs:
            return record
        if records.resumable(diffs) and not overwrite:
            record = {**record, "settings": dict(settings), "complete": []}
            record["run"] = records.new(name, settings)["run"]
            records.write(folder, record)
            return record
        if not overwrite:
            raise records.refusal(folder, diffs, f"{row.section}.overwrite")
    elif not overwrite and next(folder.glob(outputs), None) is not None:
        raise CaeeError(f"{folder} holds outputs without a record (made elsewhere or by an older version); "
                        f"use a new work_dir or re-run with {row.section}.overwrite=true (or --overwrite)")
    if folder.is_dir():
        for child in folder.iterdir():
            if child.name not in ("log.txt", ".lock"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    record = records.new(name, settings)
    records.write(folder, record)
    return record


def resume_check(cfg: Config, stage: str, settings: dict) -> Callable[[Path], None]:
    """A trainer's ``before_write``: open its folder's record (refuse, resume, or start over) before
    config.yaml or the log change."""
    def check(out_dir: Path) -> None:
        overwrite = getattr(cfg, table.stage(stage).section).overwrite
        open_output(out_dir, stage, settings, overwrite, "*.pth")
        if not overwrite and (out_dir / records.LAST).is_file():  # a resume: its checkpoint must load
            from caee.engine.trainer import load_checkpoint

            load_checkpoint(out_dir / records.LAST, mmap=True)
    return check


@dataclass
class TrainerStart:
    cfg: Config        # with {work_dir} expanded
    env: StageEnv
    index: SplitIndex  # data.train_split
    names: list[str]   # class names of the dataset
    settings: dict     # stage_settings: what the record holds and a re-run is checked against
    t0: float          # when the stage started (its record's seconds)


def start_trainer(cfg: Config, stage: str) -> TrainerStart:
    """What the classifier, CGNet and AffinityNet trainers do first: expand the config, check a
    re-run's settings, set up the stage seeded by ``<stage>.seed`` (the new layers' initial weights
    are then reproducible, so a pipeline resumed at this stage matches an uninterrupted one) and
    read the training split."""
    t0 = time.perf_counter()
    cfg = expand_work_dir(cfg)
    settings = stage_settings(cfg, stage)
    section = getattr(cfg, table.stage(stage).section)
    env = start_stage(cfg, stage, seed=section.seed, before_write=resume_check(cfg, stage, settings))
    ensure_dataset(cfg.data)
    return TrainerStart(cfg, env, load_split(cfg.data, cfg.data.train_split), dataset_class_names(cfg.data),
                        settings, t0)


def finish_trainer(start: TrainerStart, images_per_s: float | None) -> None:
    """The trainer's last write: its record says it is complete (rank 0)."""
    if distributed.is_main():
        record = records.read(start.env.out_dir)
        records.finish(start.env.out_dir, record, "all", time.perf_counter() - start.t0, images_per_s)


def start_label_stage(cfg: Config, name: str, out_dir: Path, overwrite: bool) -> tuple[StageEnv, dict]:
    """A stage writing one label PNG per image into ``out_dir`` (pseudo labels): its inputs checked,
    then its record opened (rank 0) before config.yaml or the log change. Returns (env, record)."""
    settings = stage_settings(cfg, name)
    opened: dict = {}
    env = start_stage(cfg, out_dir.name, out_dir=out_dir, loader_workers=0, before_write=lambda d: opened.update(
        open_output(d, name, settings, overwrite, "*.png")))
    return env, opened


def finish_label_stage(out_dir: Path, record: dict, ids: list[str], split: str, t0: float) -> None:
    """Rank 0, once every rank is done: every image of ``split`` has its PNG, then the record says so."""
    distributed.barrier()
    if distributed.is_main():
        missing = [image_id for image_id in ids if not (out_dir / f"{image_id}.png").is_file()]
        if missing:
            raise CaeeError(f"{len(missing)} labels are missing in {out_dir} (first: {missing[:3]}); re-run")
        seconds = time.perf_counter() - t0
        records.finish(out_dir, record, split, seconds, len(ids) / seconds if seconds > 0 else None)
