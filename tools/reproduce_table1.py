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

--demo: configs/demo.yaml on its synthetic set (data.root=data/synthetic, made once and shared with
the quick start), CPU. Three OC backbones of different families, each from random weights at the
main demo's budget (2,000 images, 6 epochs) with its config written out: TinyCNN (demo.yaml's OC,
a plain 4-layer CNN), ResNet38 at width 1/16 (configs/demo_r38_oc.yaml) and VGG16 at width 1/8
(configs/demo_vgg16_oc.yaml), all at output stride 8. Each gets demo.yaml's TinyCNN CGNet (5
epochs). CAMs without CRF, as the table compares them (TABLE1_DEMO_CAPS: cam.crf_alphas=[] and
work_dir=work_dirs/reproduce_demo). Key=value overrides apply after the caps, e.g. a second seed:
data.synthetic.seed=1 data.root=data/synthetic_seed1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caee.core.errors import CaeeError
from caee.reports.common import print_report, run_guarded
from caee.reports.table1 import TABLE1_DEMO_CAPS, run_table1
from caee.pipeline.variants import DEMO_NOTE, caps_note, load_experiment_config, section_overrides

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
OC_CONFIGS = {"resnet101": REPO / "configs" / "voc" / "r101_oc.yaml",
              "vgg16": REPO / "configs" / "voc" / "vgg16_oc.yaml"}
DEMO_OC_CONFIGS = {"resnet38": REPO / "configs" / "demo_r38_oc.yaml",
                   "vgg16": REPO / "configs" / "demo_vgg16_oc.yaml"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", help="experiment YAML (its OC is the ResNet38 row); with --demo: "
                                           "configs/demo.yaml unless given")
    ap.add_argument("--demo", action="store_true", help="the synthetic CPU demo (see above)")
    ap.add_argument("--overwrite", action="store_true", help="start every stage over (outputs removed)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every variant, e.g. device=cuda")
    return ap


def oc_variants(config_oc: str, demo: bool) -> dict[str, dict]:
    """``{row name: overrides}``: the config's own OC (``config_oc``, its backbone), then the
    train_classifier keys of each OC file (configs/voc/*_oc.yaml, or configs/demo_*_oc.yaml with
    --demo); width 1.0 unless the file sets it (ResNet101 has no width multiplier)."""
    files = DEMO_OC_CONFIGS if demo else OC_CONFIGS
    if config_oc in files:
        raise CaeeError(f"train_classifier.net.backbone = {config_oc}: the config's own OC would be the same row as "
                        f"{files[config_oc]}; give a config whose OC is another backbone (the table's first row)")
    return {config_oc: {}, **{name: {"train_classifier.net.width": 1.0, **section_overrides(path, "train_classifier")}
                              for name, path in files.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.config and not args.demo:
        ap.error("--config is required (or use --demo)")
    caps = TABLE1_DEMO_CAPS if args.demo else None

    def run():
        base = load_experiment_config(args.config or DEMO_CONFIG, args.overrides, caps)
        notes = [DEMO_NOTE.format(caps_note(caps, base))] if caps else []
        return run_table1(base, oc_variants(base.train_classifier.net.backbone, args.demo), notes, args.overwrite)

    return print_report(*run_guarded(run))


if __name__ == "__main__":
    sys.exit(main())
