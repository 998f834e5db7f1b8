"""Command-line plumbing shared by the stage scripts: ``--config FILE key=value ...``."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from caee.config import Config, load_config
from caee.errors import CaeeError


def parse_args(doc: str | None, argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", required=True, help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train_classifier.lr=0.01")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def guarded(call: Callable[[], object]) -> int:
    """Run ``call``; bad input exits 2 with one clear message, Ctrl-C 130, success 0."""
    try:
        call()
    except CaeeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to continue where it stopped", file=sys.stderr)
        return 130
    return 0


def run_stage(main: Callable[[Config], object], doc: str | None, argv: list[str] | None = None) -> int:
    """Parse the command line and run ``main(cfg)`` under :func:`guarded`."""
    return guarded(lambda: main(parse_args(doc, argv)))
