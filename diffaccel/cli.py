"""The ``diffaccel`` command line. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``main(args) -> int``."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "info": ("diffaccel.commands.info", "show how diffaccel sees a model: family, blocks, attention, presets"),
    "demo": ("diffaccel.commands.demo", "offline demo: bundled models, baseline vs presets, table + image grids"),
    "profile": ("diffaccel.commands.profile", "measure a model's step-to-step redundancy into a profile (JSON, PNG)"),
    "schedule": ("diffaccel.commands.schedule", "pick the caching schedule that meets a speed-up target from a profile"),
}

# Library log lines that say nothing about the user's command: (library logger, message start).
# transformers warns once per image-processor class it resolves lazily when torchvision is absent
# (diffusers' pipeline imports touch CLIP's and SigLIP's); diffusers says so when accelerate is missing.
FOREIGN_NOISE = (
    ("transformers", "`CLIPImageProcessor` requires torchvision"),
    ("transformers", "`SiglipImageProcessor` requires torchvision"),
    ("diffusers", "Cannot initialize model with low cpu memory usage"),
)


class DefaultsFormatter(argparse.HelpFormatter):
    """Help entries end with their default, unless it is None/False or the text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or no_default or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@contextlib.contextmanager
def own_output():
    """For the duration of a command, drop FOREIGN_NOISE at the libraries' log handlers (records
    from every submodule pass through them); everything else they log still shows."""
    installed = []
    for library in sorted({lib for lib, _ in FOREIGN_NOISE}):
        try:
            getattr(importlib.import_module(f"{library}.utils.logging"), "get_logger")(library)  # adds its handler
        except ImportError:
            continue
        drop = _DropLines(tuple(start for lib, start in FOREIGN_NOISE if lib == library))
        for handler in logging.getLogger(library).handlers:
            handler.addFilter(drop)
            installed.append((handler, drop))
    try:
        yield
    finally:
        for handler, drop in installed:
            handler.removeFilter(drop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffaccel", description="Training-free acceleration for diffusers pipelines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsFormatter)
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
        with own_output():
            return int(module.main(args) or 0)
    except (ValueError, TypeError, OSError) as err:  # user errors (and files it cannot write): one line, no traceback
        print(f"diffaccel {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
