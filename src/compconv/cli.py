"""``compconv {demo, tables, ...}``: a thin command line over the public API.

Each subcommand lives beside the code it drives and exposes ``add_parser(subparsers)``, which registers
its parser and sets ``func`` (called with the parsed args, returns an exit code). ``SUBCOMMANDS`` lists
their modules; they are imported lazily only when building the parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "run_parser"]

SUBCOMMANDS: list[str] = [
    "compconv.demo",
    "compconv.paper.cli",
    "compconv.train.cli",
    "compconv.bench.cli",
    "compconv.bench.compare",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compconv",
        description="Compact convolutions: convert, count, train, evaluate and benchmark CNNs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in SUBCOMMANDS:
        importlib.import_module(mod).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parser(build_parser(), argv)


def run_parser(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and call the chosen subcommand; user errors become one line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"compconv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
