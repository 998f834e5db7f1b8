#!/usr/bin/env python
"""Supplementary Table I: the CGNet against ordinary classifiers (OCs) with three backbones.

Trains three OCs (ResNet38 from --config; ResNet101 and VGG16 with the train_classifier section of
configs/voc/r101_oc.yaml and configs/voc/vgg16_oc.yaml: backbone, ImageNet file, lr), a CGNet
(the config's train_cgnet: ResNet38 for VOC) against each, makes and evaluates the six CAM sets on
data.cam_split (best threshold of the eval.thresholds sweep AND the fixed eval.threshold) and
prints the table next to the paper's numbers (47.8 -> 56.0, 46.8 -> 52.4, 48.9 -> 52.3).

    python tools/reproduce_table1.py --config configs/voc/r38.yaml [key=value ...]
    python tools/reproduce_table1.py --demo            # synthetic set, CPU, a few minutes

Output: <work_dir>/table1/{resnet38,resnet101,vgg16}/ (each variant's stages, each output folder with
its record.json: a second run skips finished stages, resumes interrupted ones and re-runs those whose
settings or inputs changed) and <work_dir>/table1/table1.{md,json,png} (mIoU in %; the PNG
is a bar chart of OC and CGNet CAM mIoU per OC backbone).
Exit status: 0, 1 when a variant failed (the others are still run and tabled), 2 for bad input.

--demo: configs/demo.yaml (TinyCNN CGNet) with the OC backbone swapped to ResNet38 / ResNet101 /
VGG16 at full size, from random initialisation, on a separate small synthetic set. Those
backbones cost 2-4 s per 96 x 96 training image on 2 CPU cores, so the work is capped
(caee.reports.table1.TABLE1_DEMO_CAPS): work_dir=work_dirs/reproduce_demo (outputs in its table1/),
data.root=data/synthetic_table1_demo with 32 training images, OC and CGNet 1 epoch each at
batch 8 (4 steps), CAMs at scale 1.0 without flip, no DataLoader worker. The demo checks that
every backbone runs through the whole Table I pipeline; its numbers are NOT comparable to the
paper's (no ImageNet weights, 4 steps, synthetic images). Key=value overrides apply after the caps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caee.reports.common import print_report, run_guarded
from caee.reports.table1 import TABLE1_DEMO_CAPS, TABLE1_DEMO_OCS, run_table1
from caee.pipeline.variants import caps_note, load_experiment_config, section_overrides

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
OC_CONFIGS = {"resnet101": REPO / "configs" / "voc" / "r101_oc.yaml",
              "vgg16": REPO / "configs" / "voc" / "vgg16_oc.yaml"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", help="experiment YAML (its OC is the ResNet38 row); with --demo: "
                                           "configs/demo.yaml unless given")
    ap.add_argument("--demo", action="store_true", help="the synthetic CPU demo with capped work (see above)")
    ap.add_argument("--overwrite", action="store_true", help="start every stage over (outputs removed)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every variant, e.g. device=cuda")
    return ap


def oc_variants(demo: bool) -> dict[str, dict]:
    """``{row name: overrides}``: the demo's backbone swaps, or the keys that configs/voc/*_oc.yaml set in
    train_classifier (width 1.0 unless they set it: ResNet101 / VGG16 have no width multiplier)."""
    if demo:
        return TABLE1_DEMO_OCS
    return {"resnet38": {}, **{name: {"train_classifier.net.width": 1.0,
                                      **section_overrides(path, "train_classifier")}
                               for name, path in OC_CONFIGS.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.config and not args.demo:
        ap.error("--config is required (or use --demo)")
    caps = TABLE1_DEMO_CAPS if args.demo else None
    notes = ([f"demo caps: {caps_note(caps)}; OCs from random initialisation. Demo numbers are NOT "
              "comparable to the paper's."] if caps else [])
    return print_report(*run_guarded(lambda: run_table1(
        load_experiment_config(args.config or DEMO_CONFIG, args.overrides, caps), oc_variants(args.demo),
        notes, args.overwrite)))


if __name__ == "__main__":
    sys.exit(main())
