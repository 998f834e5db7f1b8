"""The table of stages (caee/stages/table.py): a new stage is its module, its config section and one row.

A toy stage (it counts the pixels of each class in the pseudo labels) is added as one row of STAGES
and one Step, with its module registered in ``sys.modules``: the ``caee`` subcommand, its
``--overwrite``, its record, the pipeline's skip / re-run and its dependency on the pseudo labels
all follow without any other change.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from caee import cli
from caee.core import records
from caee.core.config import Config, expand_work_dir
from caee.core.io import save_label_png, write_json
from caee.core.layout import Layout
from caee.pipeline.runner import jobs_of, run_jobs, upstream_of
from caee.stages import table
from caee.stages.common import open_output, stage_settings
from conftest import mini_config

NAME = "count_labels"


def _main(cfg: Config) -> dict:
    """The toy stage: per-class pixel counts of the pseudo labels, in ``<work_dir>/count_labels``."""
    from caee.core.io import load_label_png

    cfg = expand_work_dir(cfg)
    out = Layout(cfg).work / NAME
    out.mkdir(parents=True, exist_ok=True)
    record = open_output(out, NAME, stage_settings(cfg, NAME), cfg.pseudo_labels.overwrite, "*.json")
    counts = np.zeros(256, np.int64)
    for png in sorted(table.stage(NAME).input(cfg, "labels").glob("*.png")):
        counts += np.bincount(load_label_png(png).ravel(), minlength=256)
    result = {str(v): int(n) for v, n in enumerate(counts) if n}
    write_json(out / "counts.json", result)
    records.finish(out, record, "all", 0.0, None)
    return result


@pytest.fixture
def toy_stage(monkeypatch):
    module = types.ModuleType(f"caee.stages.{NAME}")
    module.main, module.__doc__ = _main, "Count the pixels of each class in the pseudo labels."
    monkeypatch.setitem(sys.modules, module.__name__, module)
    row = table.Stage(NAME, ("pseudo_labels", "data"), lambda lo: lo.work / NAME,
                      {"labels": ("pseudo_labels.out_dir", lambda lo: lo.work / "pseudo_labels")})
    monkeypatch.setitem(table.STAGES, NAME, row)
    monkeypatch.setitem(table.STEPS, NAME, table.Step(NAME, NAME))
    return row


def _pseudo_labels(cfg: Config, value: int) -> Path:
    """A finished pseudo-label folder (two 4x4 maps of ``value``) with its record."""
    folder = table.stage("make_pseudo_labels").output(Layout(cfg))
    for image_id in ("a", "b"):
        save_label_png(folder / f"{image_id}.png", np.full((4, 4), value, np.uint8))
    records.write(folder, {**records.new("make_pseudo_labels", {"v": value}), "complete": ["train"]})
    return folder


def test_a_new_stage_is_one_row(toy_stage, tmp_path):
    cfg = mini_config(tmp_path)
    # the command line: a subcommand with --overwrite, from the row alone
    command = cli.commands()["count-labels"]
    assert command.module == f"caee.stages.{NAME}" and command.overwrite == "pseudo_labels.overwrite"
    assert "--overwrite" in cli.command_parser(command).format_help()
    # the pipeline: the step reads the pseudo labels, so it is downstream of them
    plan = ["pseudo_labels", NAME]
    jobs = jobs_of(cfg, plan)
    assert [j.step.name for j in upstream_of(jobs[1], jobs)] == ["pseudo_labels"]
    # records: runs once, is skipped while its input holds, re-runs when the input is redone
    _pseudo_labels(cfg, 1)
    assert run_jobs(jobs_of(cfg, [NAME])).ran == [NAME]
    out = Path(cfg.work_dir) / NAME
    first = records.read(out)
    assert json.loads((out / "counts.json").read_text()) == {"1": 32}
    assert first["settings"]["input.labels"] == records.read(table.stage("make_pseudo_labels").output(Layout(cfg)))["run"]
    assert run_jobs(jobs_of(cfg, [NAME])).skipped == [NAME]
    _pseudo_labels(cfg, 2)  # the pseudo labels redone: a new run id
    assert run_jobs(jobs_of(cfg, [NAME])).ran == [NAME]
    assert json.loads((out / "counts.json").read_text()) == {"2": 32} and records.read(out)["run"] != first["run"]


def test_no_other_module_lists_the_stages():
    """No module of caee/ outside caee/stages/ names four or more stages (the lists this table
    replaced); the Layout, which spells every folder name (stage folders included), is the exception."""
    names = [n for n in table.STAGES if n != "eval_miou"]
    root = Path(table.__file__).resolve().parents[1]
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.parent.name == "stages" or path.name == "layout.py":
            continue
        text = path.read_text()
        listed = [n for n in names if f'"{n}"' in text]
        if len(listed) >= 4:
            offenders.append(f"{path.relative_to(root)}: {listed}")
    assert not offenders, "modules listing stages besides caee/stages/table.py:\n  " + "\n  ".join(offenders)


def test_irn_lives_in_its_modules_its_section_and_its_rows():
    """IRN's two stages were added as a stage should be: besides their own modules (and the ResNet50
    backbone they use), only the config section (config.py, its range rules) and the rows of the
    table name them; the CLI, pipeline, records, layout and results table follow from the rows."""
    root = Path(table.__file__).resolve().parents[1]
    own = {"method/irn.py", "models/irn.py", "models/resnet50.py", "stages/train_irn.py", "stages/make_irn_labels.py"}
    naming = {p.relative_to(root).as_posix() for p in root.rglob("*.py")
              if "irn" in p.read_text().lower() and p.relative_to(root).as_posix() not in own}
    assert naming == {"core/config.py", "core/config_rules.py", "stages/table.py"}
