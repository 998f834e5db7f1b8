#!/usr/bin/env python
"""Evaluate CAMs (background-threshold sweep) or label maps (CRF labels, pseudo labels, predictions).

Input:  eval.dir (default: the CAMs of cam.source, <work_dir>/cam_<cam.source>) holding <id>.npz CAMs
        or <id>.png label maps (eval.kind=auto tells them apart); ground truth data.eval_mask_dir of
        eval.split (default data.cam_split).
Output: the report on the console and in <work_dir>/eval/log.txt; the same as JSON in eval.out
        (default <work_dir>/eval/<folder name>_<split>.json) with a "summary" entry.
CAMs: every threshold of eval.thresholds in one pass; the best (an oracle) and the mIoU at the fixed
eval.threshold are both reported.

    python eval_miou.py --config configs/voc/r38.yaml eval.split=train
    python eval_miou.py --config configs/voc/r38.yaml eval.dir=work_dirs/voc/cam_cgnet_crf_4
"""
import sys

from caee.cli import run_stage
from caee.stages.eval_miou import main

if __name__ == "__main__":
    sys.exit(run_stage(main, __doc__))
