"""The ``diffaccel`` command line. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``main(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "info": ("diffaccel.commands.info", "show how diffaccel sees a model: family, blocks, attention, presets"),
    "demo": ("diffaccel.commands.demo", "offline demo: bundled models, baseline vs presets, table + image grids"),
    "profile": ("diffaccel.commands.profile", "measure a model's step-to-step redundancy into a profile (JSON, PNG)"),
    "schedule": ("diffaccel.commands.schedule", "pick the caching schedule that meets a speed-up target from a profile"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffaccel", description="Training-free acceleration for diffusers pipelines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as err:  # user errors: one clear line, no traceback
        print(f"diffaccel {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
