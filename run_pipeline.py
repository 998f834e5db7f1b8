#!/usr/bin/env python
"""Alias of ``caee run`` for a checkout without ``pip install`` (``caee run --help`` for details).

    python run_pipeline.py --config configs/demo.yaml
    python run_pipeline.py --config configs/voc/r38.yaml --nproc 4 data.root=/data/VOC2012
    python run_pipeline.py --config configs/demo.yaml --stages train_cgnet cam_cgnet results

A finished stage is skipped while its settings and the stages it reads are unchanged; a changed
key re-runs exactly the stages it affects (their old outputs are removed first); an interrupted
stage resumes when the same command is run again. --overwrite starts the selected stages over.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this checkout's caee, wherever the command runs

from caee.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
