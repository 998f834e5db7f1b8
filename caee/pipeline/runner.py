"""The one step runner of the pipeline and of the reproduction drivers: skip, re-run or resume each step.

For each step (in order) the runner builds its record (:mod:`caee.core.markers`): the settings of
every stage call and the run id of every upstream step whose outputs it reads (found by the
paths: a step reads what another step of the experiment writes). Then:

- marker present, same record: the step is skipped;
- marker present, other settings or an upstream step that ran again since: the step's outputs
  are removed and it runs again (logged with the differing keys), so a changed key re-runs exactly
  the steps that it affects, and the ones downstream of them;
- no marker: the step runs and resumes its own way (trainers from ``last.pth``, inference stages
  skip finished images), unless an interrupted run of it (``<step>.started``) had other settings:
  then it starts over;
- a marker without a record (older version) or an unreadable one stops with a message; with
  ``overwrite`` every selected step starts over.

The marker is written only after the stage returned; ``<step>.started`` meanwhile. The outputs
removed before a redo are the folders the step owns by the layout (caee/core/layout.py), a folder named
by a path key included: the marker proves this work_dir's runs wrote it.
"""
from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from caee.core import markers
from caee.core.config import Config, save_config
from caee.core.errors import CaeeError
from caee.core.layout import Layout
from caee.pipeline.steps import STEPS, Step, images_per_s, paths_in

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One step of one experiment (or variant): ``cfg`` is that experiment's config, ``plan`` the
    step names it runs (a step's calls may depend on what follows), ``label`` its name in logs."""
    step: Step
    cfg: Config
    plan: tuple[str, ...]
    label: str = ""

    @cached_property
    def calls(self) -> list[Config]:
        return self.step.calls(self.cfg, self.plan)

    @cached_property
    def marker(self) -> Path:
        return Layout(self.cfg).marker(self.step.name)

    @cached_property
    def writes(self) -> list[Path]:
        return [_abs(p) for p in self.step.writes(self.cfg)]

    @cached_property
    def settings(self) -> list[dict]:
        return self.step.settings(self.calls)

    @cached_property
    def reads(self) -> list[Path]:
        return [_abs(p) for p in self.step.reads(self.cfg) + [q for s in self.settings for q in paths_in(s)]]

    def name(self) -> str:
        return self.label or self.step.name


def jobs_of(cfg: Config, plan: Sequence[str], label: str = "") -> list[Job]:
    """The jobs of ``plan`` (step names, in order) for the experiment ``cfg``."""
    unknown = [n for n in plan if n not in STEPS]
    if unknown:
        raise CaeeError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STEPS)}")
    return [Job(STEPS[n], cfg, tuple(plan), f"{label}{n}") for n in plan]


def _abs(p: Path) -> Path:
    return Path(p).expanduser().absolute()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def upstream_of(job: Job, context: Sequence[Job]) -> list[Job]:
    """The jobs before ``job`` in ``context`` (the experiment's jobs in run order) whose outputs it reads."""
    position = next((i for i, j in enumerate(context) if j.marker == job.marker), len(context))
    return [j for j in context[:position] if any(_inside(r, w) for r in job.reads for w in j.writes)]


@dataclass
class Summary:
    """What a run did: the steps run and skipped (names as in the markers) and the seconds of each run."""
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def record_of(job: Job, context: Sequence[Job]) -> markers.Record:
    """The record ``job`` would write now: its settings and the current run of each upstream step."""
    upstream = {}
    for up in upstream_of(job, context):
        done = markers.read(up.marker)
        upstream[up.name()] = done.get("run") if done else None
    return markers.Record(job.step.name, [job.step.stage] * len(job.calls), job.settings, upstream)


def _out_of_date(job: Job, context: Sequence[Job], memo: dict) -> list[str]:
    """Why the finished ``job`` no longer matches this config: its own settings or upstream runs
    changed, or (transitively) a step it reads from is out of date; [] when it still holds or never ran."""
    if job.marker not in memo:
        memo[job.marker] = []  # a guard; the context is ordered, so there are no cycles
        done = markers.read(job.marker)
        why = [] if done is None else markers.changes(done, record_of(job, context))
        if done is not None and not why:
            for up in upstream_of(job, context):
                inner = _out_of_date(up, context, memo)
                if inner:
                    why = [f"its input '{up.name()}' is out of date: {inner[0]}"]
                    break
        memo[job.marker] = why
    return memo[job.marker]


def refuse_stale(selected: Sequence[Job], context: Sequence[Job], readers: dict[str, Sequence[Job]]) -> None:
    """CaeeError when a step not run now, whose outputs ``readers`` (name -> the jobs it reads)
    read, finished with other settings or inputs than this config gives it (directly or through a
    step upstream of it): they would run on, or tabulate, stale files. Checked before anything runs."""
    chosen, memo = {j.marker for j in selected}, {}
    for reader, ups in readers.items():
        for up in ups:
            why = [] if up.marker in chosen else _out_of_date(up, context, memo)
            if why:
                raise CaeeError(f"'{reader}' reads the outputs of '{up.name()}', which were made with other "
                                f"settings than this config ({'; '.join(why[:4])}{'; ...' if len(why) > 4 else ''}); "
                                f"run '{up.name()}' too (add it to --stages) or the whole pipeline")


def _clear(job: Job) -> None:
    from caee.core import distributed
    if distributed.is_main():
        for path in job.writes:
            if path.is_dir():
                shutil.rmtree(path)
        job.marker.unlink(missing_ok=True)
    distributed.barrier()


def _decide(job: Job, record: markers.Record, overwrite: bool) -> str:
    """"skip", "run" (resume what is there) or "redo" (remove the outputs first)."""
    if overwrite:
        return "redo"
    done = markers.read(job.marker)
    if done is not None:
        why = markers.changes(done, record)
        if not why:
            return "skip"
        logger.info("%s: finished earlier with other inputs (%s%s); its outputs are removed and it runs again",
                    job.name(), "; ".join(why[:6]), "; ..." if len(why) > 6 else "")
        return "redo"
    started = markers.read(markers.started_path(job.marker))
    if started is not None and "settings" in started and markers.changes(started, record):
        logger.info("%s: an interrupted run had other settings; it starts over", job.name())
        return "redo"
    return "run"


def _call_stage(job: Job, call: Config, k: int, nproc: int) -> Any:
    if nproc <= 1:
        return importlib.import_module(f"caee.stages.{job.step.stage}").main(call)
    folder = job.marker.parent / job.step.name
    cfg_path = save_config(call, folder if len(job.calls) == 1 else folder / str(k))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "caee", job.step.stage, "--config", str(cfg_path)]  # works without a checkout too
    logger.info("running %s", " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        raise CaeeError(f"stage {job.name()} failed under torchrun (see its log in {job.cfg.work_dir}); "
                        "re-run to resume it")
    return None


def _elapsed(t0: float) -> str:
    s = int(time.perf_counter() - t0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_jobs(jobs: Sequence[Job], context: Sequence[Job] = (), overwrite: bool = False, nproc: int = 1,
             summary: Summary | None = None, t0: float | None = None, where: str = "") -> Summary:
    """Run (or skip) ``jobs`` in order. ``context``: every job of the experiment (upstream steps are
    looked up there; default ``jobs``). Progress is logged as ``stage i / N: <name>`` with the time
    since ``t0`` (default: now). ``summary`` is filled as the jobs finish (kept when one fails).
    where: names the experiment in errors (``variant 'x'`` -> "variant 'x' failed at stage 'y': ...")."""
    from caee.core import distributed
    summary = summary if summary is not None else Summary()
    context = list(context) or list(jobs)
    refuse_stale(jobs, context, {job.name(): upstream_of(job, context) for job in jobs})
    t0 = time.perf_counter() if t0 is None else t0
    for i, job in enumerate(jobs, 1):
        record = record_of(job, context)
        action = _decide(job, record, overwrite)
        if action == "skip":
            logger.info("stage %d / %d: %s finished earlier (%s), skipped (elapsed %s)", i, len(jobs), job.name(),
                        job.marker, _elapsed(t0))
            summary.skipped.append(job.step.name)
            continue
        if action == "redo":
            _clear(job)
        logger.info("stage %d / %d: %s (elapsed %s)", i, len(jobs), job.name(), _elapsed(t0))
        if distributed.is_main():
            markers.write_started(job.marker, record)
        start = time.perf_counter()
        try:
            results = [_call_stage(job, call, k, nproc) for k, call in enumerate(job.calls)]
        except CaeeError as e:
            if not where:
                raise
            raise CaeeError(f"{where} failed at stage '{job.step.name}': {e}") from None
        except Exception as e:
            e.add_note(f"while running stage '{job.step.name}'{f' of {where}' if where else ''} "
                       f"(work_dir {job.cfg.work_dir})")
            raise
        seconds = time.perf_counter() - start
        distributed.barrier()
        if distributed.is_main():
            markers.write_done(job.marker, record, seconds, images_per_s(job.step, results, seconds), job.step.speed)
        summary.ran.append(job.step.name)
        summary.seconds[job.step.name] = round(seconds, 1)
    return summary
