#!/usr/bin/env python
"""Supplementary Fig. II: image-level (d_m = 0) against feature-level (d_m >= 1) masking.

Trains one ordinary classifier (shared by all depths), then a CGNet per masking depth
(masking.depth=d; default every depth of the OC backbone: 0..7 for ResNet38, 0..4 for TinyCNN),
makes and evaluates each CAM set on data.cam_split (best threshold of the eval.thresholds sweep
AND the fixed eval.threshold). With --full also train_affinity + make_pseudo_labels per depth and
the pseudo labels' mIoU (what Fig. II plots).

    python tools/masking_depth_sweep.py --config configs/voc/r38.yaml [--full] [--depths 0 3 7] [key=value ...]
    python tools/masking_depth_sweep.py --demo

Output: <work_dir>/masking_depth/{oc,depth_<d>}/ (each variant's stages, each output folder with its
record.json: a second run skips finished stages, resumes interrupted ones and re-runs those whose
settings or inputs changed) and <work_dir>/masking_depth/masking_depth.{md,json,png} (mIoU
in %; the PNG is a bar chart per depth with the OC's CAM mIoU as a dashed line).
Exit status: 0, 1 when a variant failed (the others are still run and tabled), 2 for bad input.

--demo: configs/demo.yaml (TinyCNN OC and CGNets at output stride 8) at depths 0, 2, 3, 4 on its
own synthetic set of 1,500 + 300 images (data.root=data/synthetic_1500; demo.yaml: 2,000 + 400),
CPU, always with --full: each depth's CGNet CAMs train demo.yaml's AffinityNet (PSA's label rule
and pair set) and the random walk makes pseudo labels, whose mIoU is what Fig. II plots. Epochs
and networks are demo.yaml's (caee.reports.masking_depth.DEPTH_DEMO_CAPS and DEPTH_DEMO_DEPTHS;
work_dir=work_dirs/reproduce_demo). Key=value overrides apply after the caps, e.g. a second seed:
data.synthetic.seed=1 data.root=data/synthetic_1500_seed1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caee.reports.common import print_report, run_guarded
from caee.reports.masking_depth import DEPTH_DEMO_CAPS, DEPTH_DEMO_DEPTHS, run_depth_sweep
from caee.pipeline.variants import DEMO_NOTE, caps_note, load_experiment_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", help="experiment YAML; with --demo: configs/demo.yaml unless given")
    ap.add_argument("--demo", action="store_true", help="the synthetic CPU demo (see above; implies --full)")
    ap.add_argument("--full", action="store_true", help="also AffinityNet + pseudo labels per depth")
    ap.add_argument("--depths", nargs="+", help="masking depths (default: all of the OC backbone)")
    ap.add_argument("--overwrite", action="store_true", help="start every stage over (outputs removed)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every variant, e.g. device=cuda")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Arguments; key=value tokens after ``--depths 0 1`` are overrides, not depths."""
    ap = build_parser()
    args = ap.parse_intermixed_args(argv)
    if not args.config and not args.demo:
        ap.error("--config is required (or use --demo)")
    if args.depths is not None:
        args.overrides = [t for t in args.depths if "=" in t] + args.overrides
        tokens = [t for t in args.depths if "=" not in t]
        if not tokens or not all(t.lstrip("-").isdigit() for t in tokens):
            ap.error(f"--depths takes integers, got {' '.join(tokens) or 'none'}")
        args.depths = [int(t) for t in tokens]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    caps = DEPTH_DEMO_CAPS if args.demo else None

    def run():
        base = load_experiment_config(args.config or DEMO_CONFIG, args.overrides, caps)
        notes = [DEMO_NOTE.format(caps_note(caps, base))] if caps else []
        depths = args.depths or (list(DEPTH_DEMO_DEPTHS) if args.demo else None)
        return run_depth_sweep(base, depths, args.full or args.demo, notes, args.overwrite)

    return print_report(*run_guarded(run))


if __name__ == "__main__":
    sys.exit(main())
