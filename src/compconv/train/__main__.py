"""``python -m compconv.train {train,eval} ...``: the same commands as ``compconv train|eval``.

It builds only these two subcommands, so it runs even when another subcommand's module cannot be imported.
"""

from __future__ import annotations

import argparse
import sys

from compconv.cli import run_parser
from compconv.train.cli import add_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compconv.train")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser(sub)
    return run_parser(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
