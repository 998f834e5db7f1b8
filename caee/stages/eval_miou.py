"""Evaluation stage: the mIoU of a CAM folder (threshold sweep) or a label folder against the ground truth."""
from __future__ import annotations

import logging
from pathlib import Path

from caee import provenance
from caee.config import Config, expand_work_dir
from caee.data import ensure_dataset, load_split
from caee.evaluation import evaluate_dir, format_report
from caee.io import write_json
from caee.stages.common import start_stage
from caee.layout import Layout

logger = logging.getLogger(__name__)


def eval_paths(cfg: Config) -> tuple[Path, str, Path]:
    """(folder to evaluate, split, result JSON path) from the eval section and its defaults."""
    layout = Layout(cfg)
    folder, split = layout.eval_dir(), layout.eval_split()
    return folder, split, layout.eval_out(folder, split)


def main(cfg: Config) -> dict:
    cfg = expand_work_dir(cfg)
    start_stage(cfg, "eval", loader_workers=0)
    folder, split, out = eval_paths(cfg)
    ensure_dataset(cfg.data)
    index = load_split(cfg.data, split)
    result = evaluate_dir(folder, index, cfg.eval, cfg.eval.kind)
    write_json(out, {**result, "settings": provenance.settings_of(cfg, "eval_miou")})  # what made these numbers
    logger.info("\n%s\nresult: %s", format_report(result), out)
    return result
