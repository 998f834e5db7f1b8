"""Evaluate CAMs (background-threshold sweep) or label maps (CRF labels, pseudo labels, predictions).

Input:  eval.dir (default: the CAMs of cam.source, <work_dir>/cam_<cam.source>) holding <id>.npz CAMs
        or <id>.png label maps (eval.kind=auto tells them apart); ground truth data.eval_mask_dir of
        eval.split (default data.cam_split).
Output: the report on the console and in <work_dir>/eval/log.txt; the same as JSON in eval.out
        (default <work_dir>/eval/<folder name>_<split>.json) with a "summary" entry.
CAMs: every threshold of eval.thresholds in one pass; the best (an oracle) and the mIoU at the fixed
eval.threshold are both reported.

    caee eval-miou --config configs/voc/r38.yaml eval.split=train
    caee eval-miou --config configs/voc/r38.yaml eval.dir=work_dirs/voc/cam_cgnet_crf_4

Evaluation reads PNG / npz files with numpy only: this module does not import torch (about 2 s of a
process start-up on a small machine). It needs no device, RNG or process group, so it sets up its
folder, log and saved config itself instead of calling ``start_stage``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from caee.core import records
from caee.core.config import Config, expand_work_dir, save_config
from caee.data import ensure_dataset, load_split
from caee.engine.scoring import evaluate_dir, format_report
from caee.core.io import claim_folder, write_json
from caee.core.layout import Layout
from caee.core.logs import setup_logging

logger = logging.getLogger(__name__)


def eval_paths(cfg: Config) -> tuple[Path, str, Path]:
    """(folder to evaluate, split, result JSON path) from the eval section and its defaults."""
    layout = Layout(cfg)
    folder, split = layout.eval_dir(), layout.eval_split()
    return folder, split, layout.eval_out()


def _start(cfg: Config) -> Path:
    """The part of ``start_stage`` evaluation needs: ``<work_dir>/eval`` with its log and config."""
    out_dir = Layout(cfg).stage_dir("eval")
    claim_folder(out_dir)  # locked; temp files of a killed run removed
    setup_logging(out_dir)
    save_config(cfg, out_dir)
    return out_dir


def main(cfg: Config) -> dict:
    cfg = expand_work_dir(cfg)
    _start(cfg)
    folder, split, out = eval_paths(cfg)
    ensure_dataset(cfg.data)
    index = load_split(cfg.data, split)
    result = evaluate_dir(folder, index, cfg.eval, cfg.eval.kind)
    write_json(out, {**result, "settings": records.settings_of(cfg, ("data", "eval"))})  # what made these numbers
    logger.info("\n%s\nresult: %s", format_report(result), out)
    return result
