"""The whole pipeline from one config: every step in order (caee/pipeline/steps.py), then the results table.

Steps (run in this process, or each under torchrun with ``nproc`` > 1)::

    train_classifier, train_cgnet, [train_control], cam_classifier, cam_cgnet, [cam_control],
    train_affinity, pseudo_labels, train_deeplab, results

(the control steps when ``pipeline.control``). Skipping, re-running and resuming are the
runner's (caee/pipeline/runner.py): a finished step whose recorded settings and upstream runs still hold is
skipped, one whose settings changed runs again with everything downstream of it, an interrupted
one resumes. Markers: ``<work_dir>/pipeline/<step>.done`` (caee/core/markers.py).
"""
from __future__ import annotations

import logging
import time

from caee.core.config import Config
from caee.core.errors import CaeeError
from caee.pipeline.results import write_results
from caee.pipeline.runner import jobs_of, refuse_stale, run_jobs

logger = logging.getLogger(__name__)

RESULTS = "results"


def plan(cfg: Config) -> list[str]:
    """The pipeline's step names, in order (without ``results``)."""
    control = bool(cfg.pipeline.control)
    return (["train_classifier", "train_cgnet"] + (["train_control"] if control else [])
            + ["cam_classifier", "cam_cgnet"] + (["cam_control"] if control else [])
            + ["train_affinity", "pseudo_labels", "train_deeplab"])


def run(cfg: Config, only: list[str] | None = None, nproc: int = 1, overwrite: bool = False) -> dict:
    """Run the steps (all, or those named in ``only``) and write the results table.

    overwrite: start the selected steps over even when their markers still hold."""
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
    return write_results(cfg, names)
