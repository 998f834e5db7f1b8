"""One record per output: the settings and inputs that made a folder of outputs, and how far it got.

``<output folder>/record.json``, written atomically by the stage that makes the folder, read by the
stage to resume or refuse, by the pipeline to skip or re-run, by the results table for timings::

    {"stage": "make_cam", "run": "9c0e4f1a2b3c", "settings": {"cam.scales": [1.0], ...,
     "input.weights": "41b0c2d3e4f5"}, "complete": ["train", "val"], "seconds": 81.2, "images_per_s": 24.7}

``settings``: the config keys that determine the output and, as ``input.<name>``, the run id of every
upstream output read; paths inside the work_dir are written ``{work_dir}/...`` (a copied work_dir
keeps valid records). ``run``: a new id whenever the output starts afresh, so everything that read
it becomes out of date. ``complete``: the parts finished (splits, or ``"all"`` for a trainer).
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from caee.core.errors import CaeeError
from caee.core.io import write_json

RECORD = "record.json"
MODEL = "model.pth"   # a trainer's final weights (weights only)
LAST = "last.pth"     # a trainer's resume checkpoint

# Leaf names (in any section) that never change what a stage writes (step_in_backward: the same
# weights as the ordinary step, tests/test_engine.py).
NON_OUTPUT_KEYS = frozenset({"num_workers", "workers", "log_every", "checkpoint_every", "overwrite", "pictures",
                             "keep_epochs", "tensorboard", "eval_only", "step_in_backward"})
# A trainer may continue with another max_steps: the schedule spans `epochs`, max_steps says where to stop.
RESUMABLE_SUFFIXES = (".max_steps",)


def _relative(value: Any, work_dir: Path) -> Any:
    if isinstance(value, str) and "/" in value and "{" not in value:
        path = Path(value).absolute()
        if path == work_dir or work_dir in path.parents:
            return "{work_dir}/" + path.relative_to(work_dir).as_posix() if path != work_dir else "{work_dir}"
    return value


def _flatten(data: Any, prefix: str, out: dict[str, Any], work_dir: Path) -> None:
    if isinstance(data, Mapping):
        for k, v in data.items():
            if k not in NON_OUTPUT_KEYS:
                _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, work_dir)
    else:
        out[prefix] = list(data) if isinstance(data, tuple) else _relative(data, work_dir)


def settings_of(cfg: Any, sections: tuple[str, ...]) -> dict[str, Any]:
    """The flat settings of ``cfg`` (a :class:`caee.core.config.Config`, ``{work_dir}`` expanded) in
    ``sections`` that determine an output; paths inside ``cfg.work_dir`` relative to it."""
    out: dict[str, Any] = {}
    work_dir = Path(cfg.work_dir).absolute()
    for section in sections:
        _flatten({section: dataclasses.asdict(getattr(cfg, section))}, "", out, work_dir)
    return out


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs or exists on one side only, sorted."""
    keys = sorted(set(recorded) | set(current))
    return [f"{k}: {recorded.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}" for k in keys
            if recorded.get(k, "<absent>") != current.get(k, "<absent>")]


def resumable(diffs: list[str]) -> bool:
    """Differences that a trainer continues through (``max_steps`` only)."""
    return all(d.split(":", 1)[0].endswith(RESUMABLE_SUFFIXES) for d in diffs)


def read(folder: str | Path) -> dict | None:
    """The record of ``folder``; None when it has none; an unreadable one is a CaeeError naming it."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CaeeError(f"{path} is unreadable ({e}); delete {folder} to redo it, or re-run with --overwrite") \
            from None
    if not isinstance(data, dict) or not {"stage", "run", "settings", "complete"} <= set(data):
        raise CaeeError(f"{path} is not a record of this version; delete {folder} to redo it, or re-run with "
                        "--overwrite")
    return data


def status(folder: str | Path, settings: Mapping[str, Any], part: str) -> list[str]:
    """Why ``folder`` is not yet the finished output of ``settings`` for ``part``; [] when it is."""
    record = read(folder)
    if record is None:
        return [f"{folder} has no record"]
    diffs = differences(record["settings"], settings)
    if diffs:
        return diffs
    return [] if part in record["complete"] else [f"{folder}: '{part}' is not finished"]


def refusal(folder: Path, diffs: list[str], overwrite_key: str) -> CaeeError:
    shown = "; ".join(diffs[:8]) + (f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else "")
    return CaeeError(f"{folder} was made with other settings ({shown}); use a new work_dir or re-run with "
                     f"{overwrite_key}=true (or --overwrite) to start over")


def new(stage: str, settings: Mapping[str, Any]) -> dict:
    return {"stage": stage, "run": uuid.uuid4().hex[:12], "settings": dict(settings), "complete": [],
            "seconds": 0.0, "images_per_s": None, "finished": ""}


def write(folder: str | Path, record: Mapping[str, Any]) -> None:
    write_json(Path(folder) / RECORD, dict(record))


def finish(folder: str | Path, record: dict, part: str, seconds: float, images_per_s: float | None) -> dict:
    """Mark ``part`` complete (the stage's last write); ``seconds`` add up over the parts of a run."""
    record["complete"] = sorted(set(record["complete"]) | {part})
    record["seconds"] = round(float(record.get("seconds") or 0.0) + seconds, 1)
    record["images_per_s"] = None if images_per_s is None else round(float(images_per_s), 2)
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write(folder, record)
    return record
