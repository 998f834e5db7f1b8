#!/usr/bin/env python
"""Alias of ``caee train-affinity`` for a checkout without ``pip install`` (``caee train-affinity --help`` for details)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this checkout's caee, wherever the command runs

from caee.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-affinity", *sys.argv[1:]]))
