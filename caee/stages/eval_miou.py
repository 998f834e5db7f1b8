"""Evaluation stage: the mIoU of a CAM folder (threshold sweep) or a label folder against the ground truth.

Evaluation reads PNG / npz files with numpy only: this module does not import torch (about 2 s of a
process start-up on a small machine). It needs no device, RNG or process group, so it sets up its
folder, log and saved config itself instead of calling ``start_stage``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from caee.config import Config, expand_work_dir, save_config, stage_dir
from caee.data import ensure_dataset, load_split
from caee.evaluation import evaluate_dir, format_report
from caee.io import write_json
from caee.logs import setup_logging

logger = logging.getLogger(__name__)


def eval_paths(cfg: Config) -> tuple[Path, str, Path]:
    """(folder to evaluate, split, result JSON path) from the eval section and its defaults."""
    ec = cfg.eval
    if ec.dir:
        folder = Path(ec.dir)
    else:  # the default CAM folder is named by make_cam, which imports torch: only then
        from caee.stages.make_cam import cam_out_dir
        folder = cam_out_dir(cfg)
    split = ec.split or cfg.data.cam_split
    out = Path(ec.out) if ec.out else Path(cfg.work_dir) / "eval" / f"{folder.name}_{Path(split).stem}.json"
    return folder, split, out


def _start(cfg: Config) -> Path:
    """The part of ``start_stage`` evaluation needs: ``<work_dir>/eval`` with its log and config."""
    out_dir = stage_dir(cfg, "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
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
    write_json(out, result)
    logger.info("\n%s\nresult: %s", format_report(result), out)
    return result
