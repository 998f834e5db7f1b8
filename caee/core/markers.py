"""The completion marker of a pipeline step: what it ran with, which upstream runs it read, how long it took.

``<work_dir>/pipeline/<step>.done`` (JSON, written atomically after the step returned)::

    {"step": "cam_cgnet", "stages": ["make_cam"],
     "settings": [{"data.root": ..., "cam.scales": [1.0], ...}],   # caee.core.provenance.settings_of, per stage call
     "fingerprint": "3f1c...",                                    # caee.core.provenance.fingerprint of settings
     "upstream": {"train_cgnet": "a41b..."},                      # run id of each upstream step it read
     "run": "9c0e...",                                            # this run's id (read by the downstream steps)
     "seconds": 81.2, "images_per_s": 24.7, "speed": "inference", "finished": "2026-11-30 10:41:07"}

``<step>.started`` holds the same record without the timing while the step runs, so that an
interrupted step whose settings then change is started over instead of resumed.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from caee.core.errors import CaeeError
from caee.core.io import write_json
from caee.core.provenance import differing_keys, fingerprint

STARTED = ".started"


@dataclass
class Record:
    """What a step ran with: the settings of each stage call and the upstream runs it read."""
    step: str
    stages: list[str]
    settings: list[dict[str, Any]]
    upstream: dict[str, str | None]
    fingerprint: str = ""
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    seconds: float | None = None
    images_per_s: float | None = None
    speed: str = ""                 # "train" (training images/s) or "inference" (images/s of the stage)
    finished: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = fingerprint({str(i): s for i, s in enumerate(self.settings)})


def started_path(marker: Path) -> Path:
    return marker.with_suffix(STARTED)


def read(marker: Path) -> dict | None:
    """The record in ``marker`` (None when absent); an unreadable file is a CaeeError naming it."""
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise CaeeError(f"marker {marker} is unreadable ({e}); re-run with --overwrite to redo the step") from None
    if not isinstance(data, dict):
        raise CaeeError(f"marker {marker} is not a record; re-run with --overwrite to redo the step")
    return data


def write_started(marker: Path, record: Record) -> None:
    write_json(started_path(marker), asdict(record))


def write_done(marker: Path, record: Record, seconds: float, images_per_s: float | None, speed: str) -> None:
    """The finished step's record; the ``.started`` file goes."""
    record.seconds, record.images_per_s, record.speed = round(seconds, 1), images_per_s, speed
    record.finished = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(marker, asdict(record))
    started_path(marker).unlink(missing_ok=True)


def changes(recorded: dict, current: Record) -> list[str]:
    """Why ``recorded`` (a marker's JSON) is not the output of ``current``: the differing settings
    (``key: old -> new``) and the upstream steps that ran again since; [] when it still holds.
    A record without settings (an older marker) raises CaeeError: its settings are unknown."""
    if "settings" not in recorded or "upstream" not in recorded:
        raise CaeeError(f"the marker of step '{current.step}' records no settings, so it cannot be checked "
                        "against this config; re-run with --overwrite to redo the step, or use a new work_dir")
    out: list[str] = []
    old = recorded["settings"]
    for i, now in enumerate(current.settings):
        before = old[i] if i < len(old) else {}
        out += [f"{k}: {before.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}"
                for k in differing_keys(before, now)]
    if len(old) != len(current.settings):
        out.append(f"stage calls: {len(old)} -> {len(current.settings)}")
    for step in sorted(set(recorded["upstream"]) | set(current.upstream)):
        if recorded["upstream"].get(step) != current.upstream.get(step):
            out.append(f"upstream step '{step}' ran again")
    return out
