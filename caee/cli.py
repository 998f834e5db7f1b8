"""The ``caee`` command: ``caee <command> --config FILE [--print-config] [key=value ...]``.

One subcommand per row of the table of stages (caee/stages/table.py) plus ``caee run`` for the whole pipeline.
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
from dataclasses import dataclass

from caee.core.config import Config, config_to_dict, expand_work_dir, load_config
from caee.core.errors import CaeeError
from caee.stages.table import RUN_DOC, STAGES


@dataclass(frozen=True)
class Command:
    name: str                    # subcommand, e.g. "train-cgnet"
    module: str                  # module whose main(cfg) runs it
    sections: tuple[str, ...]    # config sections it reads (listed by --help); () = every section
    doc: str                     # usage: inputs, outputs, examples
    overwrite: str = ""          # the key --overwrite sets ("" = no --overwrite)


def commands() -> dict[str, Command]:
    """The subcommands, by name: one per row of the table of stages, then ``run``."""
    rows = [Command(s.command, s.module, tuple(dict.fromkeys(s.reads + s.sections)), s.doc,
                    f"{s.section}.overwrite" if s.output is not None else "") for s in STAGES.values()]
    return {c.name: c for c in rows + [Command("run", "caee.pipeline.run", (), RUN_DOC)]}
_OVERRIDES_HELP = "dotted overrides, e.g. train_cgnet.lr=0.01; quote lists: 'cam.scales=[1.0]'"


def guarded(call: Callable[[], object]) -> int:
    """Run ``call``; bad input exits 2 with one clear message, Ctrl-C 130, success 0."""
    try:
        call()
    except CaeeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write fault outside caee.core.io's writers (which raise CaeeError themselves)
        from caee.core.io import write_fault

        fault = write_fault(None, e)
        if fault is None:
            raise
        print(f"error: {fault}", file=sys.stderr)
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
        parser.add_argument("--stages", nargs="+", help="run only these stages (the steps of caee/stages/table.py, and results)")
        parser.add_argument("--nproc", type=int, default=1, help="processes per stage, on this machine only (torchrun --standalone); "
                            "several nodes: run each stage under torchrun --nnodes (README)")
        parser.add_argument("--overwrite", action="store_true",
                            help="start the selected stages over (their outputs are replaced once their inputs are checked)")
    elif command.overwrite:
        parser.add_argument("--overwrite", action="store_true",
                            help=f"start over: the same as {command.overwrite}=true")
    parser.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    return parser


def print_config(cfg: Config) -> None:
    import yaml

    sys.stdout.write(yaml.safe_dump(config_to_dict(expand_work_dir(cfg)), sort_keys=False))


def run_command(command: Command, argv: list[str]) -> int:
    """Parse ``argv`` for ``command`` and run it under :func:`guarded`; the stage is imported only here."""
    parser = command_parser(command)
    args = parser.parse_intermixed_args(argv)  # overrides before, between and after the flags
    if getattr(args, "stages", None):  # `--stages a b key=value`: argparse gives the overrides to --stages
        args.overrides += [s for s in args.stages if "=" in s]
        args.stages = [s for s in args.stages if "=" not in s]
    if getattr(args, "overwrite", False) and command.overwrite:
        args.overrides.append(f"{command.overwrite}=true")
    if args.config is None and not args.print_config:
        parser.error("--config is required (an experiment YAML, e.g. configs/demo.yaml)")

    def call() -> None:
        if getattr(args, "nproc", 1) < 1:
            raise CaeeError(f"--nproc must be at least 1 (processes per stage), got {args.nproc}")
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
    width = max(len(name) for name in commands())
    lines = [f"  {c.name:<{width}}  {c.doc.splitlines()[0]}" for c in commands().values()]
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
    by_name = commands()
    if name not in by_name:
        close = difflib.get_close_matches(name, list(by_name), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{argv[0]}'{hint} (commands: {', '.join(by_name)})", file=sys.stderr)
        return 2
    return run_command(by_name[name], argv[1:])


# ---------------------------------------------------------------- kept for callers of the old API


def parse_args(doc: str | None, argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", required=True, help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    args = parser.parse_intermixed_args(argv)
    return load_config(args.config, args.overrides)


def run_stage(main: Callable[[Config], object], doc: str | None, argv: list[str] | None = None) -> int:
    """Parse the command line and run ``main(cfg)`` under :func:`guarded`."""
    return guarded(lambda: main(parse_args(doc, argv)))
