"""The ``caee`` command: ``caee <command> --config FILE [--print-config] [key=value ...]``.

One subcommand per row of the table of stages (caee/stages/table.py) plus ``caee run`` for the whole
pipeline. ``--help`` lists the config keys the command reads with their defaults and meanings, and
``--print-config`` prints the resolved config; neither imports a stage module, so both answer
without loading torch. The top-level scripts (``train_cgnet.py`` ...) are aliases of these.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import NamedTuple

from caee import __version__
from caee.core.config import config_to_dict, expand_work_dir, load_config
from caee.core.errors import CaeeError, guarded
from caee.stages.table import STAGES, module_doc


class Command(NamedTuple):
    """A subcommand ("train-cgnet"): the module running it (its docstring is the usage), the config
    sections it reads (listed by --help; () = all) and the key --overwrite sets ("": none)."""
    name: str
    module: str
    sections: tuple[str, ...]
    overwrite: str = ""


def commands() -> dict[str, Command]:
    """The subcommands, by name: one per row of the table of stages, then ``run``."""
    rows = [Command(s.command, s.module, tuple(dict.fromkeys(s.sections + s.reads)),
                    f"{s.section}.overwrite" if s.output is not None else "") for s in STAGES.values()]
    return {c.name: c for c in rows + [Command("run", "caee.pipeline.run", ())]}


def command_parser(command: Command) -> argparse.ArgumentParser:
    """The parser of one subcommand; its epilog lists the config keys the command reads."""
    from caee.core.config_docs import format_key_docs, key_docs

    epilog = ("config keys read by this command (key = default  {choices}  meaning); set them in the YAML "
              "or as key=value:\n" + format_key_docs(key_docs(command.sections or None)))
    parser = argparse.ArgumentParser(prog=f"caee {command.name}", description=module_doc(command.module),
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", help="experiment YAML (see configs/); path relative to the current folder")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides, {work_dir} expanded) as YAML and exit")
    if command.name == "run":
        parser.add_argument("--stages", nargs="+", help="run only these stages (the steps of caee/stages/table.py, and results)")
        parser.add_argument("--nproc", type=int, default=1, help="processes per stage, on this machine only (torchrun --standalone); "
                            "several nodes: run each stage under torchrun --nnodes (README)")
    if command.name == "run" or command.overwrite:
        parser.add_argument("--overwrite", action="store_true", help="start over (the selected stages), replacing "
                            "the outputs once the inputs are checked" + (f"; = {command.overwrite}=true" * bool(command.overwrite)))
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides, e.g. train_cgnet.lr=0.01; quote lists: 'cam.scales=[1.0]'")
    return parser


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
            import yaml

            sys.stdout.write(yaml.safe_dump(config_to_dict(expand_work_dir(cfg)), sort_keys=False))
        elif command.name == "run":
            from caee.core.logs import setup_logging

            setup_logging()
            result = importlib.import_module(command.module).run(cfg, args.stages, args.nproc, args.overwrite)
            sys.stdout.write(result["markdown"] + "\n" if result.get("markdown") else "")
        else:
            importlib.import_module(command.module).main(cfg)

    return guarded(call)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    by_name = commands()
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, by_name))
        lines = [f"  {c.name:<{width}}  {(module_doc(c.module).splitlines() or [''])[0]}" for c in by_name.values()]
        print("usage: caee <command> --config FILE [--print-config] [key=value ...]\n\nClass-specific adversarial "
              "erasing (OC-CSE) for weakly supervised semantic segmentation.\n\ncommands:\n" + "\n".join(lines) +
              "\n\n`caee <command> --help` lists the command's config keys with defaults and meanings.")
        return 0
    if argv[0] == "--version":
        print(f"caee {__version__}")
        return 0
    name = argv[0].replace("_", "-")  # `caee train_cgnet` works too
    if name not in by_name:
        close = difflib.get_close_matches(name, list(by_name), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{argv[0]}'{hint} (commands: {', '.join(by_name)})", file=sys.stderr)
        return 2
    return run_command(by_name[name], argv[1:])
