"""The record keeping of the stages (caee/core/records.py): the settings and input ids an output
records, opening an output folder (resume, refuse or start over) and finishing it."""
from __future__ import annotations

import functools
import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from caee.core import distributed, records
from caee.core.config import Config, expand_work_dir
from caee.core.errors import CaeeError
from caee.core.io import claim_folder
from caee.core.layout import Layout
from caee.data import SplitIndex, dataset_class_names, ensure_dataset, load_split
from caee.stages import table
from caee.stages.setup import StageEnv, start_stage
from caee.weights.checkpoints import read_checkpoint


def _input_id(path: Path, key: str) -> str:
    """The run id in the record of an upstream output (a trainer's folder for its model.pth, which
    must load), else a hash of a file made elsewhere (PSA's weights). A missing, unreadable or
    unfinished input is a CaeeError naming ``key``, before a stage removes or writes anything."""
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
    """What the output of stage ``name`` records: the settings of its row's sections, less its
    ``not_recorded`` keys, and ``input.<name>``: the id of every upstream output it reads. An
    input's path key is recorded by the id alone, so a moved work_dir and a stage run alone (an
    empty key) record the same settings as ``caee run`` (which writes the paths out)."""
    row = table.stage(name)
    settings = records.settings_of(cfg, row.sections)
    for input_name, (key, path) in row.input_paths(Layout(cfg)).items():
        settings.pop(key, None)
        settings[f"input.{input_name}"] = _input_id(Path(path), key)
    settings = {k: v for k, v in settings.items() if k not in row.not_recorded}
    for key, path in recorded_paths(cfg, name, settings).items():  # e.g. an init naming another model.pth
        settings[f"input.{key}"] = _input_id(path, key)
    return settings


def recorded_paths(cfg: Config, name: str, settings: dict) -> dict[str, Path]:
    """The path settings (an ``init``) naming another output (a folder with a record, or a model.pth)."""
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


def _kept(folder: Path, name: str, settings: dict, overwrite: bool, outputs: str) -> dict | None:
    """The record ``folder`` keeps (resumed, or continued when only max_steps changed), or None: it
    starts over; a CaeeError for outputs that may not be replaced."""
    try:
        record = records.read(folder)
    except CaeeError:
        if not overwrite:
            raise
        return None  # an unreadable record is replaced with the outputs it described
    made = next(folder.glob(outputs), None) is not None
    if record is None:
        if made and not overwrite:
            raise CaeeError(f"{folder} holds outputs without a record (made elsewhere or by an older version); use "
                            f"a new work_dir or re-run with {table.stage(name).section}.overwrite=true (or --overwrite)")
        return None
    diffs = records.differences(record["settings"], settings)
    if not diffs:
        return record
    if records.resumable(diffs) and not overwrite:
        return {**record, "settings": dict(settings), "complete": [], "run": records.new(name, settings)["run"]}
    if made and not overwrite:
        raise records.refusal(folder, diffs, f"{table.stage(name).section}.overwrite")
    return None


def open_outputs(folders: Mapping[Path, dict], name: str, overwrite: bool, outputs: str = "*",
                 claim: bool = False) -> list[dict]:
    """The records of stage ``name``'s output folders (``{folder: settings}``), all checked before any
    changes (rank 0): the same settings resume; a folder holding ``outputs`` (a glob) with other
    settings or no record is refused unless ``overwrite``. One that starts over loses its files
    (its log excepted) and gets a new run id. claim: lock the folders (once checked) first."""
    kept = [_kept(folder, name, settings, overwrite, outputs) for folder, settings in folders.items()]
    opened = []
    for (folder, settings), record in zip(folders.items(), kept):
        if claim:
            claim_folder(folder)  # locked; a killed run's temp files removed
        if record is None:
            for child in folder.iterdir() if folder.is_dir() else []:
                if child.name not in ("log.txt", ".lock"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            record = records.new(name, settings)
        if record["run"] != run_id(folder):  # new, or continued with a new run id
            records.write(folder, record)
        opened.append(record)
    return opened


def open_output(folder: Path, name: str, settings: dict, overwrite: bool, outputs: str = "*") -> dict:
    return open_outputs({folder: settings}, name, overwrite, outputs)[0]


def open_label_folders(folders: Mapping[Path, dict], overwrite: bool, name: str) -> None:
    """Label folders that stage ``name`` caches beside its input (CRF labels), opened by rank 0."""
    if distributed.is_main():
        open_outputs(folders, name, overwrite, "*.png", claim=True)
    distributed.barrier()


def finish_label_folders(folders: list[Path], split: str) -> None:
    distributed.barrier()
    if distributed.is_main():
        for folder in folders:
            records.finish(folder, records.read(folder), split, 0.0, None)


def run_id(folder: Path) -> str:
    """The run id of ``folder``'s record ("unrecorded" for outputs made elsewhere, e.g. CAMs)."""
    record = records.read(folder)
    return record["run"] if record else "unrecorded"


def resume_check(cfg: Config, stage: str, settings: dict) -> Callable[[Path], None]:
    """A trainer's ``before_write``: open its folder's record before config.yaml or the log change."""
    def check(out_dir: Path) -> None:
        overwrite = getattr(cfg, table.stage(stage).section).overwrite
        open_output(out_dir, stage, settings, overwrite, "*.pth")
        if not overwrite and (out_dir / records.LAST).is_file():  # a resume: its checkpoint must load
            from caee.engine.trainer import load_checkpoint

            load_checkpoint(out_dir / records.LAST, mmap=True)
    return check


@dataclass
class TrainerStart:
    """The expanded config, the stage's env, data.train_split, the class names, the recorded
    settings and the start time."""
    cfg: Config
    env: StageEnv
    index: SplitIndex
    names: list[str]
    settings: dict
    t0: float


def start_trainer(cfg: Config, stage: str) -> TrainerStart:
    """A trainer's start: expand the config, check a re-run's settings, set up the stage seeded by
    ``<stage>.seed`` (a pipeline resumed here matches an uninterrupted one) and read the training split."""
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
    """A stage writing one label PNG per image into ``out_dir``: (env, its opened record)."""
    settings = stage_settings(cfg, name)
    opened: dict = {}
    env = start_stage(cfg, out_dir.name, out_dir=out_dir, loader_workers=0, before_write=lambda d: opened.update(
        open_output(d, name, settings, overwrite, "*.png")))
    return env, opened


def finish_label_stage(out_dir: Path, record: dict, ids: list[str], split: str, t0: float) -> None:
    """Once every rank is done and every image has its PNG, the record says ``split`` is complete."""
    distributed.barrier()
    if distributed.is_main():
        missing = [image_id for image_id in ids if not (out_dir / f"{image_id}.png").is_file()]
        if missing:
            raise CaeeError(f"{len(missing)} labels are missing in {out_dir} (first: {missing[:3]}); re-run")
        seconds = time.perf_counter() - t0
        records.finish(out_dir, record, split, seconds, len(ids) / seconds if seconds > 0 else None)
