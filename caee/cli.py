"""The ``caee`` command: ``caee <command> --config FILE [--print-config] [key=value ...]``.

One subcommand per stage plus ``caee run`` for the whole pipeline (see :mod:`caee.pipeline.commands`).
``--help`` lists the config keys the command reads with their defaults and meanings, and
``--print-config`` prints the resolved config; neither imports a stage module, so both answer
without loading torch. The top-level scripts (``train_cgnet.py`` ...) are aliases of these.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import Callable

from caee import __version__
from caee.pipeline.commands import BY_NAME, COMMANDS, Command
from caee.core.config import Config, config_to_dict, expand_work_dir, load_config
from caee.core.errors import CaeeError

# the config key --overwrite sets for each stage command (start the stage over, its outputs replaced)
OVERWRITE_KEY = {"train-classifier": "train_classifier.overwrite", "train-cgnet": "train_cgnet.overwrite",
                 "make-cam": "cam.overwrite", "train-affinity": "train_affinity.overwrite",
                 "make-pseudo-labels": "pseudo_labels.overwrite", "train-deeplab": "train_deeplab.overwrite"}
_OVERRIDES_HELP = "dotted overrides, e.g. train_cgnet.lr=0.01; quote lists: 'cam.scales=[1.0]'"


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


def print_report(rc: int, report, seconds: float) -> int:
    """A reproduction driver's report: print the table, its files and the failures; returns the exit code."""
    if report is None:
        return rc
    print(report.markdown)
    print(f"\nfiles: {', '.join(map(str, report.files))}; wall time {seconds:.0f} s")
    for failure in report.failures:
        print(f"error: {failure}", file=sys.stderr)
    return rc


def command_parser(command: Command) -> argparse.ArgumentParser:
    """The parser of one subcommand; its epilog lists the config keys the command reads."""
    from caee.core.config_docs import format_key_docs, key_docs

    keys = format_key_docs(key_docs(command.sections or None))
    epilog = ("config keys read by this command (key = default  {choices}  meaning); "
              "set them in the YAML or as key=value:\n" + keys)
    parser = argparse.ArgumentParser(prog=f"caee {command.name}", description=command.doc, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", help="experiment YAML (see configs/); path relative to the current folder")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides, {work_dir} expanded) as YAML and exit")
    if command.name == "run":
        parser.add_argument("--stages", nargs="+", help="run only these stages (see caee/pipeline/steps.py)")
        parser.add_argument("--nproc", type=int, default=1, help="processes per stage, on this machine only (torchrun --standalone); "
                            "several nodes: run each stage under torchrun --nnodes (README)")
        parser.add_argument("--overwrite", action="store_true",
                            help="start the selected stages over (their recorded outputs are removed first)")
    elif command.name in OVERWRITE_KEY:
        parser.add_argument("--overwrite", action="store_true",
                            help=f"start over: the same as {OVERWRITE_KEY[command.name]}=true")
    parser.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    return parser


def print_config(cfg: Config) -> None:
    import yaml

    sys.stdout.write(yaml.safe_dump(config_to_dict(expand_work_dir(cfg)), sort_keys=False))


def run_command(command: Command, argv: list[str]) -> int:
    """Parse ``argv`` for ``command`` and run it under :func:`guarded`; the stage is imported only here."""
    parser = command_parser(command)
    args = parser.parse_args(argv)
    if getattr(args, "stages", None):  # `--stages a b key=value`: argparse gives the overrides to --stages
        args.overrides += [s for s in args.stages if "=" in s]
        args.stages = [s for s in args.stages if "=" not in s]
    if getattr(args, "overwrite", False) and command.name in OVERWRITE_KEY:
        args.overrides.append(f"{OVERWRITE_KEY[command.name]}=true")
    if args.config is None and not args.print_config:
        parser.error("--config is required (an experiment YAML, e.g. configs/demo.yaml)")

    def call() -> None:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print_config(cfg)
            return
        module = importlib.import_module(command.module)
        if command.name == "run":
            from caee.core.logs import setup_logging

            setup_logging()
            result = module.run(cfg, args.stages, args.nproc, args.overwrite)
            if result.get("markdown"):
                sys.stdout.write(result["markdown"] + "\n")
        else:
            module.main(cfg)

    return guarded(call)


def _top_help() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = [f"  {c.name:<{width}}  {c.doc.splitlines()[0]}" for c in COMMANDS]
    return ("usage: caee <command> --config FILE [--print-config] [key=value ...]\n\n"
            "Class-specific adversarial erasing (OC-CSE) for weakly supervised semantic segmentation.\n\n"
            "commands:\n" + "\n".join(lines) +
            "\n\n`caee <command> --help` lists the command's config keys with defaults and meanings.\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_top_help())
        return 0
    if argv[0] == "--version":
        print(f"caee {__version__}")
        return 0
    name = argv[0].replace("_", "-")  # `caee train_cgnet` works too
    if name not in BY_NAME:
        close = difflib.get_close_matches(name, list(BY_NAME), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{argv[0]}'{hint} (commands: {', '.join(BY_NAME)})", file=sys.stderr)
        return 2
    return run_command(BY_NAME[name], argv[1:])


# ---------------------------------------------------------------- kept for callers of the old API


def parse_args(doc: str | None, argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", required=True, help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def run_stage(main: Callable[[Config], object], doc: str | None, argv: list[str] | None = None) -> int:
    """Parse the command line and run ``main(cfg)`` under :func:`guarded`."""
    return guarded(lambda: main(parse_args(doc, argv)))
