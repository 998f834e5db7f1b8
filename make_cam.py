#!/usr/bin/env python
"""Alias of ``caee make-cam`` for a checkout without ``pip install`` (``caee make-cam --help`` for details)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this checkout's caee, wherever the command runs

from caee.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["make-cam", *sys.argv[1:]]))
