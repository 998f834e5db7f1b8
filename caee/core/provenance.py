"""Which settings determine a stage's output, their fingerprint, and the refusal when they changed.

Every stage records ``settings_of(cfg, stage)`` (flat ``{"section.key": value}``) and its
``fingerprint`` with what it writes (``last.pth`` / ``model.pth`` / a completion marker). A re-run
compares the record with the current config through :func:`check_same`: equal settings resume or
skip, different ones stop with the differing keys and the two ways out.

Keys that cannot change an output (workers, logging, checkpoint frequency, pictures, overwrite
switches) are left out, so changing them never forces a re-run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

from caee.core.errors import CaeeError

# The config sections that determine each stage's output (stage = the module in caee/stages/).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "train_classifier": ("data", "train_classifier"),
    "train_cgnet": ("data", "masking", "train_cgnet"),
    "make_cam": ("data", "cam", "crf"),
    "train_affinity": ("data", "train_affinity", "crf"),
    "make_pseudo_labels": ("data", "pseudo_labels", "crf"),
    "train_deeplab": ("data", "train_deeplab", "crf"),
    "eval_miou": ("data", "eval"),
    "train_irn": ("data", "irn"),
    "make_irn_labels": ("data", "irn"),
}

# Leaf names (in any section) that never change what a stage writes.
NON_OUTPUT_KEYS = frozenset({
    "num_workers", "workers", "log_every", "checkpoint_every", "overwrite", "pictures",
    "keep_epochs", "tensorboard", "eval_only",
    "step_in_backward",  # the same weights as the ordinary step (tests/test_engine.py): a memory lever
})


def _flatten(data: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(data, Mapping):
        for k, v in data.items():
            if k in NON_OUTPUT_KEYS:
                continue
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = list(data) if isinstance(data, tuple) else data


def settings_of(cfg: Any, stage: str) -> dict[str, Any]:
    """The flat settings of ``cfg`` (a :class:`caee.core.config.Config`) that determine ``stage``'s output."""
    if stage not in STAGE_SECTIONS:
        raise KeyError(f"unknown stage {stage!r}; known: {', '.join(STAGE_SECTIONS)}")
    out: dict[str, Any] = {}
    for section in STAGE_SECTIONS[stage]:
        _flatten({section: dataclasses.asdict(getattr(cfg, section))}, "", out)
    return out


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short canonical hash of flat settings (key order does not matter)."""
    text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differing_keys(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ, or that exist on one side only, sorted."""
    keys = set(recorded) | set(current)
    return sorted(k for k in keys if recorded.get(k, "<absent>") != current.get(k, "<absent>"))


def check_same(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], where: str, stage: str) -> None:
    """Refuse to reuse ``where`` (a checkpoint or marker) made with other settings than ``current``.

    ``recorded`` None (an output of an older version without a record) is refused as well: its
    settings are unknown.
    """
    if recorded is None:
        raise CaeeError(f"{where} records no settings, so it cannot be checked against this config; "
                        f"use a new work_dir or re-run with {stage}.overwrite=true (or --overwrite) to start over")
    diff = differing_keys(recorded, current)
    if not diff:
        return
    shown = "; ".join(f"{k}: {recorded.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}" for k in diff[:8])
    more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
    raise CaeeError(f"{where} was made with other settings ({shown}{more}); "
                    f"use a new work_dir or re-run with {stage}.overwrite=true (or --overwrite) to start over")


SETTINGS_FILE = "settings.json"


def without(settings: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """``settings`` minus ``keys`` (those that only choose which files an inference stage writes)."""
    return {k: v for k, v in settings.items() if k not in keys}


def check_folder(folder: Any, settings: Mapping[str, Any], section: str, overwrite: bool, has_outputs: bool) -> None:
    """An inference stage's output folder: refuse to add to outputs made with other settings, then
    record ``settings`` in ``<folder>/settings.json`` (before any output is written).

    ``overwrite`` (the stage recomputes every file) replaces the record; ``has_outputs`` False (an
    empty folder) accepts any settings."""
    refuse_other_settings(folder, settings, section, overwrite, has_outputs)
    record_settings(folder, settings)


def refuse_other_settings(folder: Any, settings: Mapping[str, Any], section: str, overwrite: bool,
                          has_outputs: bool) -> None:
    """The check of :func:`check_folder` alone: a stage with several output folders checks them
    all before it records any, so a refusal leaves every record as it was."""
    import json
    from pathlib import Path

    if overwrite or not has_outputs:
        return
    path = Path(folder) / SETTINGS_FILE
    recorded = None
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8")).get("settings")
        except (ValueError, UnicodeDecodeError, AttributeError):
            recorded = None
    check_same(recorded, settings, str(folder), section)


def record_settings(folder: Any, settings: Mapping[str, Any]) -> None:
    """Write ``<folder>/settings.json``: the settings and their fingerprint."""
    from pathlib import Path

    from caee.core.io import write_json

    write_json(Path(folder) / SETTINGS_FILE, {"settings": dict(settings), "fingerprint": fingerprint(settings)})


def folder_fingerprint(folder: Any) -> str | None:
    """The fingerprint an inference stage recorded in ``<folder>/settings.json``; None for a folder
    without a record (made elsewhere, or not yet)."""
    import json
    from pathlib import Path

    try:
        value = json.loads((Path(folder) / SETTINGS_FILE).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None
