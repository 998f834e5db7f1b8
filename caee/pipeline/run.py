"""The whole pipeline from one config, each finished stage skipped, then the results table.

Stages: OC, CGNet (+ a w = 0 control), CAMs, CRF, pseudo labels (pseudo_labels.method), DeepLab, results.

Input:  one experiment config (configs/demo.yaml runs on the built-in synthetic set on a CPU).
Output: every stage's folder under work_dir, each output folder's record.json,
        <work_dir>/results.md, results.json (the numbers), timings.json (wall times), fig3_cams.png,
        fig4_segmentation.png.

    caee run --config configs/demo.yaml
    caee run --config configs/voc/r38.yaml --nproc 4 data.root=/data/VOC2012
    caee run --config configs/demo.yaml --stages train_cgnet cam_cgnet results

A finished stage is skipped while its settings and the stages it reads are unchanged; a changed
key re-runs exactly the stages it affects (their old outputs are removed first); an interrupted
stage resumes when the same command is run again. --overwrite starts the selected stages over.

Steps: caee/stages/table.py ``STEPS`` (the control steps when ``pipeline.control``, the generator of
``pseudo_labels.method``), run in this process or each under torchrun with --nproc > 1.
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
    """Run the steps (all, or those named in ``only``; ``overwrite``: start them over) and write the results table."""
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
