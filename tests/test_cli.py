"""``compconv`` itself: lazy subcommands (``--help`` without torch), ``--version``, no CUDA-probe noise."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import compconv
from compconv.cli import SUBCOMMANDS, build_parser, main, run_parser


def test_building_the_parser_imports_neither_torch_nor_a_subcommand() -> None:
    # `compconv --help` must answer at once: torch (seconds to import) is imported by the chosen command only.
    code = ("import sys; from compconv.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules, any(m in sys.modules for m in ('compconv.demo', 'compconv.bench.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"compconv {compconv.__version__}"


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS) and "--version" in out


def test_a_stub_is_swapped_for_the_real_parser(capsys) -> None:
    # build_parser() alone gives stubs; run_parser loads the chosen command's real parser before parsing.
    assert run_parser(build_parser(), ["tables", "--paper", "nope"]) == 2
    assert "unknown table set" in capsys.readouterr().err
    assert main(["tables", "--paper", "nope"]) == 2


def test_cuda_home_probe_is_silenced_and_nothing_else(capfd, monkeypatch) -> None:
    cpp = pytest.importorskip("torch.utils.cpp_extension")
    import torch

    if torch.cuda.is_available():
        pytest.skip("the probe only warns when no CUDA runtime is found")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent-cuda-home")
    log = logging.getLogger("torch.utils.cpp_extension")
    saved = list(log.filters)
    try:
        for f in saved:  # the bare torch behaviour first (the CLI may have installed the filter already)
            log.removeFilter(f)
        capfd.readouterr()
        cpp._find_cuda_home()  # what importing cpp_extension runs: torch.utils.benchmark, torch.compile
        assert "No CUDA runtime is found" in capfd.readouterr().err
        from compconv._quiet import silence_cuda_home_probe

        silence_cuda_home_probe()
        silence_cuda_home_probe()  # idempotent
        cpp._find_cuda_home()
        log.warning("another warning of this module")
        err = capfd.readouterr().err
        assert "No CUDA runtime is found" not in err and "another warning of this module" in err
        assert len(log.filters) == 1
    finally:
        for f in list(log.filters):
            log.removeFilter(f)
        for f in saved:
            log.addFilter(f)


def test_train_results_module_has_a_help_and_names_a_missing_run_dir(tmp_path, capsys):
    """``python -m compconv.train.results --help`` used to read ``--help/results.json``."""
    from compconv.train.results import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "RUN_DIR" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope")])
    assert e.value.code == 2
    assert "no results.json in run_dirs" in capsys.readouterr().err


def test_train_interrupted_by_ctrl_c_ends_in_one_line_with_the_resume_command(monkeypatch, capsys) -> None:
    # Review finding: Ctrl-C printed a raw KeyboardInterrupt traceback.
    import argparse

    from compconv.train import cli as train_cli

    def interrupted(_args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "_main_train", interrupted)
    assert train_cli.main_train(argparse.Namespace(resume="runs/r1")) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "compconv train --resume runs/r1" in err and "Traceback" not in err
