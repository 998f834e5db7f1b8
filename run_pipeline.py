#!/usr/bin/env python
"""The whole pipeline from one config: OC, CGNet (+ a w = 0 control), CAMs, CRF, AffinityNet,
pseudo labels, DeepLab and the results table.

Input:  one experiment config (configs/demo.yaml runs on the built-in synthetic set on a CPU).
Output: every stage's folder under work_dir, <work_dir>/pipeline/<stage>.done markers (each with
        the settings it ran with), <work_dir>/results.md, results.json, fig3_cams.png,
        fig4_segmentation.png.

    python run_pipeline.py --config configs/demo.yaml
    python run_pipeline.py --config configs/voc/r38.yaml --nproc 4 data.root=/data/VOC2012
    python run_pipeline.py --config configs/demo.yaml --stages train_cgnet cam_cgnet results

A finished stage is skipped while its settings and the stages it reads are unchanged; a changed
key re-runs exactly the stages it affects (their old outputs are removed first); an interrupted
stage resumes when the same command is run again. --overwrite starts the selected stages over.
"""
import argparse
import sys

from caee.cli import guarded
from caee.config import load_config
from caee.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    from caee.pipeline import run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", required=True, help="experiment YAML (see configs/)")
    parser.add_argument("--stages", nargs="+", help="run only these stages (see caee/steps.py)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per stage (torchrun; GPUs or CPU ranks)")
    parser.add_argument("--overwrite", action="store_true", help="start the selected stages over (outputs removed)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train_cgnet.epochs=3")
    args = parser.parse_args(argv)
    done: list[dict] = []

    def call() -> None:
        setup_logging()
        done.append(run(load_config(args.config, args.overrides), args.stages, args.nproc, args.overwrite))

    rc = guarded(call)
    if rc == 0 and done and done[0].get("markdown"):
        print(done[0]["markdown"])
    return rc


if __name__ == "__main__":
    sys.exit(main())
