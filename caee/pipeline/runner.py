"""The step runner of the pipeline and of the reproduction drivers: skip, resume or redo each step, by its records.

For each stage call of a step the runner computes the settings the stage would record now (its
config and the run ids of the upstream outputs it reads, caee/stages/common.py) and reads the
record of the call's output folder (caee/core/records.py): same settings and the call's part
complete: skipped; same settings, not complete: the stage resumes; other settings (or
``--overwrite``): the stage runs with ``overwrite``: it checks its inputs, then replaces the old
outputs. An output redone has a new run id, so everything downstream follows. There is no other
bookkeeping: a stage run on its own and ``caee run`` read and write the same records.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from caee.core import records
from caee.core.config import Config, expand_work_dir, save_config
from caee.core.errors import CaeeError
from caee.core.layout import Layout
from caee.stages import table
from caee.stages.common import recorded_paths, stage_settings

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One step of one experiment (or variant): ``cfg`` its config, ``plan`` the step names it runs
    (a step's calls may depend on what follows), ``name`` its name in logs and messages."""
    step: table.Step
    cfg: Config
    plan: tuple[str, ...]
    name: str

    @cached_property
    def stage(self) -> table.Stage:
        return table.STAGES[self.step.stage]

    @cached_property
    def calls(self) -> list[Config]:
        return [expand_work_dir(c) for c in self.step.calls(self.cfg, self.plan)]

    def output(self, call: Config) -> Path:
        return Path(self.stage.output(Layout(call))).absolute()

    @cached_property
    def writes(self) -> list[Path]:
        return list(dict.fromkeys(self.output(c) for c in self.calls))

    @cached_property
    def reads(self) -> list[Path]:
        """Its row's inputs and the path settings naming another output (an ``init`` model.pth)."""
        paths = [p for c in self.calls for _, p in self.stage.input_paths(Layout(c)).values()]
        paths += [p for c in self.calls
                  for p in recorded_paths(c, self.stage.name, records.settings_of(c, self.stage.sections)).values()]
        return [Path(p).absolute() for p in paths]

    @cached_property
    def key(self) -> tuple[str, str]:  # the step of one experiment, whichever Job object stands for it
        return self.step.name, str(Path(self.cfg.work_dir).absolute())

    def status(self) -> list[str]:
        """Why this step's outputs are not the finished outputs of its config ([] when they are); a
        missing or unreadable input is a reason, not an error."""
        why: list[str] = []
        for call in self.calls:
            try:
                why += records.status(self.output(call), stage_settings(call, self.stage.name), self.stage.part(call))
            except CaeeError as e:
                return [str(e)]
        return why


def jobs_of(cfg: Config, plan: Sequence[str], label: str = "") -> list[Job]:
    """The jobs of ``plan`` (step names, in order) for the experiment ``cfg``."""
    unknown = [n for n in plan if n not in table.STEPS]
    if unknown:
        raise CaeeError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(table.STEPS)}")
    return [Job(table.STEPS[n], cfg, tuple(plan), f"{label}{n}") for n in plan]


def upstream_of(job: Job, context: Sequence[Job]) -> list[Job]:
    """The jobs before ``job`` in ``context`` (the experiment's jobs in run order) whose outputs it reads."""
    position = next((i for i, j in enumerate(context) if j.key == job.key), len(context))
    return [j for j in context[:position] if any(r == w or w in r.parents for r in job.reads for w in j.writes)]


@dataclass
class Summary:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _stale(job: Job, context: Sequence[Job], memo: dict[tuple, list[str]]) -> list[str]:
    """Why the outputs of ``job`` (not run now) do not belong to this config, directly or through a
    step upstream of it; [] when they do. A step that never ran is not stale: its readers find
    nothing (a stage stops on a missing input; the results table leaves the row out)."""
    if job.key not in memo:
        memo[job.key] = job.status() if any(p.exists() for p in job.writes) else []
        for up in upstream_of(job, context):
            if not memo[job.key] and _stale(up, context, memo):
                memo[job.key] = [f"its input '{up.name}' is out of date: {_stale(up, context, memo)[0]}"]
    return memo[job.key]


def refuse_stale(selected: Sequence[Job], context: Sequence[Job], readers: dict[str, Sequence[Job]]) -> None:
    """CaeeError, before anything runs, when a step not run now whose outputs ``readers`` (name ->
    the jobs it reads) read does not hold the outputs of this config."""
    chosen, memo = {j.key for j in selected}, {}
    for reader, ups in readers.items():
        for up in ups:
            why = [] if up.key in chosen else _stale(up, context, memo)
            if why:
                raise CaeeError(f"'{reader}' reads the outputs of '{up.name}', which do not match this config "
                                f"({'; '.join(why[:4])}{'; ...' if len(why) > 4 else ''}); "
                                f"run '{up.name}' too (add it to --stages) or the whole pipeline")


def _call_stage(job: Job, call: Config, k: int, nproc: int) -> None:
    if nproc <= 1:
        importlib.import_module(job.stage.module).main(call)
        return
    folder = Layout(job.cfg).step_configs() / job.step.name
    cfg_path = save_config(call, folder if len(job.calls) == 1 else folder / str(k))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "caee", job.stage.name, "--config", str(cfg_path)]  # works without a checkout too
    logger.info("running %s", " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        raise CaeeError(f"stage {job.name} failed under torchrun (see its log in {job.cfg.work_dir}); "
                        "re-run to resume it")


def _run_call(job: Job, call: Config, k: int, nproc: int, overwrite: bool) -> bool:
    """Run one stage call unless its output is finished and current; True when it ran. ``overwrite``:
    start over (the old record is not read: --overwrite may be meant to replace it)."""
    settings = stage_settings(call, job.stage.name)  # a missing or unreadable input stops here
    why = ["--overwrite"] if overwrite else records.status(job.output(call), settings, job.stage.part(call))
    if not why:
        return False
    record = None if overwrite else records.read(job.output(call))
    if overwrite or (record and not records.resumable(records.differences(record["settings"], settings))):
        logger.info("%s: %s; it starts over", job.name, "; ".join(why[:6]))
        section = getattr(call, job.stage.section)
        call = dataclasses.replace(call, **{job.stage.section: dataclasses.replace(section, overwrite=True)})
    _call_stage(job, call, k, nproc)
    return True


def run_jobs(jobs: Sequence[Job], context: Sequence[Job] = (), overwrite: bool = False, nproc: int = 1,
             summary: Summary | None = None, t0: float | None = None, where: str = "") -> Summary:
    """Run (or skip) ``jobs`` in order; ``context``: every job of the experiment (default ``jobs``);
    ``summary``: filled as the jobs finish; where: names the experiment in errors."""
    summary = summary if summary is not None else Summary()
    context = list(context) or list(jobs)
    refuse_stale(jobs, context, {job.name: upstream_of(job, context) for job in jobs})
    t0 = time.perf_counter() if t0 is None else t0
    for i, job in enumerate(jobs, 1):
        start = time.perf_counter()
        try:
            first = {job.output(c): k for k, c in reversed(list(enumerate(job.calls)))}
            ran = [_run_call(job, call, k, nproc, overwrite and first[job.output(call)] == k)
                   for k, call in enumerate(job.calls)]
        except CaeeError as e:
            if not where:
                raise
            raise CaeeError(f"{where} failed at stage '{job.step.name}': {e}") from None
        except Exception as e:
            e.add_note(f"while running stage '{job.step.name}'{f' of {where}' if where else ''} "
                       f"(work_dir {job.cfg.work_dir})")
            raise
        s = int(time.perf_counter() - t0)
        elapsed = f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
        done = "done" if any(ran) else "finished earlier, skipped"
        logger.info("stage %d / %d: %s %s (elapsed %s)", i, len(jobs), job.name, done, elapsed)
        (summary.ran if any(ran) else summary.skipped).append(job.step.name)
        if any(ran):
            summary.seconds[job.step.name] = round(time.perf_counter() - start, 1)
    return summary


def step_timings(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """``[{"step", "seconds", "images_per_s", "speed"}]`` of the finished steps, from their records."""
    out = []
    for job in jobs:
        found = [r for r in (records.read(p) for p in job.writes) if r is not None and r["complete"]]
        if found:
            out.append({"step": job.step.name, "seconds": sum(r["seconds"] for r in found),
                        "images_per_s": found[-1]["images_per_s"], "speed": job.stage.speed})
    return out
