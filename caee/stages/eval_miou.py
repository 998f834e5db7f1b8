"""Evaluation stage: the mIoU of a CAM folder (threshold sweep) or a label folder against the ground truth.

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
    return folder, split, layout.eval_out(folder, split)


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
