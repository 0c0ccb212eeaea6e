"""``python -m data_engine SUBCOMMAND ...``: build WebDataset shards of sample records.

Each subcommand lives in a module ``data_engine.<name>`` that defines ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status); the first line of its docstring is the help text. Adding a
subcommand is writing that module and adding its name to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: tuple[str, ...] = ("synth", "convert", "distill", "export")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the module docstrings' paragraphs; show the defaults that say something."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_engine", description="Build long-CoT WebDataset shards."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"data_engine.{name}")
        summary = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None
        p = sub.add_parser(
            name, help=summary, description=module.__doc__, formatter_class=_HelpFormatter
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args))
    except (FileExistsError, FileNotFoundError) as e:
        # Expected user errors (shards already there, input missing): one line, no traceback.
        print(f"{args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
