"""The whole pipeline from one config: every step of the table of stages in order, then the results table.

Steps (caee/stages/table.py ``STEPS``; run in this process, or each under torchrun with ``nproc`` > 1)::

    train_classifier, train_cgnet, [train_control], cam_classifier, cam_cgnet, [cam_control],
    train_affinity, pseudo_labels, train_deeplab, results

(the control steps when ``pipeline.control``). Skipping, re-running and resuming follow the records
the stages write (caee/pipeline/runner.py): a finished step whose settings and inputs still hold is
skipped, one whose settings or inputs changed runs again, an interrupted one resumes.
"""
from __future__ import annotations

import time

from caee.core.config import Config
from caee.core.errors import CaeeError
from caee.pipeline.results import write_results
from caee.pipeline.runner import jobs_of, refuse_stale, run_jobs
from caee.stages.table import plan

RESULTS = "results"


def run(cfg: Config, only: list[str] | None = None, nproc: int = 1, overwrite: bool = False) -> dict:
    """Run the steps (all, or those named in ``only``) and write the results table.

    overwrite: start the selected steps over even when their records still hold."""
    names = plan(cfg)
    unknown = sorted(set(only or []) - set(names + [RESULTS]))
    if unknown:
        raise CaeeError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(names + [RESULTS])}")
    t0 = time.perf_counter()
    jobs = jobs_of(cfg, names)
    selected = [j for j in jobs if not only or j.step.name in only]
    if only and RESULTS in only:  # the table describes this config: every output it reads must match it
        refuse_stale(selected, jobs, {RESULTS: jobs})
    run_jobs(selected, context=jobs, overwrite=overwrite, nproc=nproc, t0=t0)
    if only and RESULTS not in only:
        return {}
    return write_results(cfg, jobs)
