"""``compconv {demo, tables, ...}``: a thin command line over the public API.

Each subcommand lives beside the code it drives and exposes ``add_parser(subparsers)``, which registers
its parser and sets ``func`` (called with the parsed args, returns an exit code). ``SUBCOMMANDS`` maps each
command to that module and a one-line help. Only the module of the command being run is imported (those
import torch, which takes seconds): ``compconv --help`` and ``compconv --version`` import neither torch nor
any subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable

__all__ = ["SUBCOMMANDS", "build_parser", "main", "run_parser"]

# command -> (module defining add_parser, one-line help shown by ``compconv --help``)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("compconv.demo", "convert VGG-16 and ResNet-50, print reports and the paper-vs-ours tables"),
    "tables": ("compconv.paper.cli", "print the papers' Params/FLOPs tables beside ours"),
    "compare": ("compconv.bench.compare", "every method on the same hosts: params, MACs, CPU latency"),
    "train": ("compconv.train.cli", "train (or resume) a zoo model, vanilla or converted, on CIFAR or an image "
              "folder"),
    "eval": ("compconv.train.cli", "evaluate a saved checkpoint on its run's evaluation split"),
    "compress": ("compconv.compress.cli", "compress a trained model to a MACs/params/latency budget, save it, "
                 "optionally distil"),
    "bench": ("compconv.bench.cli", "speed: MAC ratio vs latency ratio, per layer and whole model"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compconv")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser(load: Iterable[str] = ()) -> argparse.ArgumentParser:
    """The ``compconv`` parser; the commands in ``load`` get their full parsers, the others a stub.

    A stub knows only its name and help; ``run_parser`` swaps it for the real parser when it is chosen.
    Unknown names in ``load`` are ignored (argparse then reports the invalid choice).
    """
    parser = argparse.ArgumentParser(
        prog="compconv",
        description="Compact convolutions: convert, count, train, evaluate and benchmark CNNs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = dict.fromkeys(SUBCOMMANDS[c][0] for c in load if c in SUBCOMMANDS)
    for mod in modules:
        importlib.import_module(mod).add_parser(sub)
    for name, (_, help_) in SUBCOMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_, add_help=False).set_defaults(_lazy=name)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand in ``argv`` (its first argument that is not an option), None if there is none."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = _command(argv)
    return run_parser(build_parser([cmd] if cmd else []), argv)


def run_parser(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and call the chosen subcommand; user errors become one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = parser.parse_known_args(argv)
    if getattr(known, "_lazy", None):  # a stub was chosen: build that command's real parser
        parser = build_parser([known._lazy])
    args = parser.parse_args(argv)
    from compconv._quiet import silence_cuda_home_probe

    silence_cuda_home_probe()  # bench / compare / train --compile import cpp_extension: no CUDA noise on CPU
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, IsADirectoryError) as e:  # user errors: one clear line, no traceback
        print(f"compconv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
