"""Set-up every stage does first: device, process group, output folder, logging, saved config."""
from __future__ import annotations

import copy
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from caee.core import distributed

from caee.core import provenance
from caee.core.config import Config, expand_work_dir, save_config
from caee.data import SplitIndex, dataset_class_names, ensure_dataset, load_split
from caee.core.io import claim_folder as io_claim_folder
from caee.core.layout import Layout
from caee.core.parallel import available_cpus
from caee.core.logs import setup_logging
from caee.weights.checkpoints import checkpoint_meta


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
    setup_logging(out_dir)
    if distributed.is_main():
        save_config(cfg, out_dir)
    return StageEnv(device, out_dir)


def claim_folder(folder: Path) -> None:
    """:func:`caee.core.io.claim_folder` on rank 0 (the ranks of one torchrun group share their stage
    folders); the other ranks only make sure it exists."""
    io_claim_folder(folder, main=distributed.is_main())


def stage_inputs(cfg: Config, stage: str) -> dict[str, tuple[str, Path]]:
    """The upstream outputs ``stage`` reads: ``{name: (config key, path)}`` (``cfg`` with {work_dir}
    expanded; an empty key gives the path the Layout derives)."""
    layout = Layout(cfg)
    return {
        "train_cgnet": lambda: {"oc": ("train_cgnet.oc_weights", layout.oc_weights())},
        "make_cam": lambda: {"weights": ("cam.weights", layout.cam_weights())},
        "train_affinity": lambda: {"cams": ("train_affinity.cam_dir", layout.affinity_cam_dir())},
        "make_pseudo_labels": lambda: {"cams": ("pseudo_labels.cam_dir", layout.pseudo_label_cam_dir()),
                                       "affinitynet": ("pseudo_labels.weights", layout.affinity_weights())},
        "train_deeplab": lambda: {"labels": ("train_deeplab.label_dir", layout.deeplab_labels())},
    }.get(stage, dict)()


@functools.lru_cache(maxsize=16)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()[:16]}"


def input_fingerprint(path: Path) -> str:
    """What identifies an upstream output: the fingerprint its stage recorded (a trainer's in
    model.pth, an inference stage's in settings.json), which covers that stage's own inputs in
    turn; a checkpoint without one (PSA's, a hand-made file) is hashed; "unrecorded" for a folder
    made elsewhere, "absent" when there is nothing."""
    if path.is_dir():
        return provenance.folder_fingerprint(path) or "unrecorded"
    if not path.is_file():
        return "absent"
    recorded = checkpoint_meta(path).get("fingerprint")
    if isinstance(recorded, str):
        return recorded
    st = path.stat()
    return _file_hash(str(path), st.st_size, st.st_mtime_ns)


def stage_settings(cfg: Config, stage: str) -> dict:
    """``provenance.settings_of(cfg, stage)`` plus ``input.<name>``: the fingerprint of every
    upstream output the stage reads. A stage run on its own after an upstream stage was redone
    with other settings is therefore refused, not silently continued on stale outputs. An input
    path equal to the one the Layout derives is recorded as "", so `caee run` (which writes the
    paths out) and a stage run alone record the same settings."""
    settings = provenance.settings_of(cfg, stage)
    inputs = stage_inputs(cfg, stage)
    blank = copy.deepcopy(cfg)
    for key, _ in inputs.values():
        section, field = key.split(".")
        setattr(getattr(blank, section), field, "")
    derived = stage_inputs(blank, stage)
    for name, (key, path) in inputs.items():
        # the derived path, left empty or written out (as caee run does), is recorded as "": the
        # same input either way, and a moved work_dir stays the same experiment
        settings[key] = "" if path.absolute() == derived[name][1].absolute() else str(path)
        settings[f"input.{name}"] = input_fingerprint(path)
    return settings


def resume_check(cfg: Config, stage: str, settings: dict) -> Callable[[Path], None]:
    """A trainer's ``before_write``: refuse (before config.yaml or the log change) a re-run whose
    ``settings`` (:func:`stage_settings`, inputs included) differ from those its checkpoints
    record, unless ``<stage>.overwrite``."""
    from caee.engine.trainer import check_resumable

    return lambda out_dir: check_resumable(out_dir, settings, stage, getattr(cfg, stage).overwrite)


@dataclass
class TrainerStart:
    cfg: Config        # with {work_dir} expanded
    env: StageEnv
    index: SplitIndex  # data.train_split
    names: list[str]   # class names of the dataset
    settings: dict     # stage_settings: what fit records and a re-run is checked against


def start_trainer(cfg: Config, stage: str) -> TrainerStart:
    """What the classifier, CGNet and AffinityNet trainers do first: expand the config, check a
    re-run's settings, set up the stage seeded by ``<stage>.seed`` (the new layers' initial weights
    are then reproducible, so a pipeline resumed at this stage matches an uninterrupted one) and
    read the training split."""
    cfg = expand_work_dir(cfg)
    settings = stage_settings(cfg, stage)
    env = start_stage(cfg, stage, seed=getattr(cfg, stage).seed, before_write=resume_check(cfg, stage, settings))
    ensure_dataset(cfg.data)
    return TrainerStart(cfg, env, load_split(cfg.data, cfg.data.train_split), dataset_class_names(cfg.data),
                        settings)
