"""``benchmarks/compress_evidence.py`` (issue 16's rows) end to end on a CIFAR slice, a few steps per row.

Real data: a slice of the CIFAR-10 folder and the project's trained ResNet-20 (skipped when absent).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_benchmark_scripts import _load
from train_helpers import CIFAR, REPO, needs_cifar

TEACHER = REPO / "docs" / "results" / "train_runs" / "r20-vanilla-cpu60-s0"
pytestmark = [
    needs_cifar,
    pytest.mark.skipif(not (TEACHER / "checkpoints" / "last.pt").is_file(),
                       reason=f"no trained ResNet-20 at {TEACHER}"),
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
]


def test_rows_share_the_budget_and_a_second_invocation_resumes_nothing(tmp_path: Path, capsys) -> None:
    mod = _load("compress_evidence")
    out = tmp_path / "ev"
    argv = ["--teacher", str(TEACHER), "--data-dir", str(CIFAR), "--budget", "0.5", "--epochs", "1",
            "--calib-images", "64", "--train-subset", "128", "--eval-subset", "128", "--max-steps", "2",
            "--threads", "1", "--out", str(out), "--rows", "compress_compconv", "tp_magnitude", "thin",
            "random_distill", "compress_compconv_feat"]
    assert mod.main(argv) == 0
    rows = {r["row"]: r for r in json.loads((out / "summary.json").read_text())}
    assert set(rows) == {"compress_compconv", "tp_magnitude", "thin", "random_distill", "compress_compconv_feat"}
    feat = rows["compress_compconv_feat"]  # the same start and budget, + every block output distilled
    assert feat["macs"] == rows["compress_compconv"]["macs"] and feat["teacher"] == str(TEACHER)
    assert feat["distill_features"] == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert rows["compress_compconv"]["distill_features"] is None
    target = rows["compress_compconv"]["macs"]
    assert target <= 0.5 * 40_551_040  # the teacher's MACs: the budget is met
    for name in ("tp_magnitude", "thin"):  # the dense alternatives at equal MACs (within 3%)
        assert abs(rows[name]["macs"] / target - 1) <= 0.03, name
    assert rows["random_distill"]["macs"] == target  # the same architecture, re-initialised
    for name in ("compress_compconv", "tp_magnitude", "random_distill"):
        assert rows[name]["teacher"] == str(TEACHER)  # distilled from the teacher
    assert rows["thin"]["teacher"] is None  # from scratch
    assert json.loads((out / "tp_magnitude" / "provenance.json").read_text())["dense"]["method"] == \
        "torch_pruning_magnitude"
    tp = json.loads((out / "tp_magnitude" / "results.json").read_text())
    # the pruned object is what trained (its class), derived from the teacher's architecture (the config's model)
    assert tp["model"] == "compconv.models.cifar_resnet.CifarResNet" and tp["config"]["model"] == "cifar_resnet20"
    # each row records a command that exists: this script with these arguments (rerunning it resumes the row)
    rows_arg = " ".join(argv[argv.index("--rows"):])
    assert tp["command"].startswith("python ") and tp["command"].endswith(f"{rows_arg}  # row tp_magnitude")
    assert "compress_evidence.py --teacher" in tp["command"]
    capsys.readouterr()
    assert mod.main(argv) == 0  # everything finished: nothing is trained again
    log = capsys.readouterr().out
    assert log.count(": finished (top-1") == 5 and "training" not in log
    # the latency stage: every finished row and the teacher, deployed, best treatment; tiny repeats
    assert mod.main([*argv, "--latency", "--latency-batches", "1", "--latency-repeats", "1"]) == 0
    lat = json.loads((out / "latency.json").read_text())["batches"]["1"]
    assert set(lat) == {"teacher", *rows}
    assert all(v["best_ms"] > 0 and v["best"] in v["ms"] for v in lat.values())
    summary = {r["row"]: r for r in json.loads((out / "summary.json").read_text())}
    assert summary["thin"]["latency_b1_ms"] == lat["thin"]["best_ms"]
    assert (out / "top1_vs_macs.png").stat().st_size > 0 and (out / "top1_vs_latency.png").stat().st_size > 0
    # another budget's folder timed in the same interleaved run: each folder gets its own rows and the teacher
    out2 = tmp_path / "ev2"
    argv2 = [*argv[:argv.index("--out")], "--out", str(out2), "--budget", "0.3", "--rows", "thin"]
    assert mod.main(argv2) == 0
    assert mod.main([*argv, "--latency", "--latency-batches", "1", "--latency-repeats", "1",
                     "--with", str(out2)]) == 0
    both = [json.loads((o / "latency.json").read_text()) for o in (out, out2)]
    assert set(both[0]["batches"]["1"]) == {"teacher", *rows} and set(both[1]["batches"]["1"]) == {"teacher", "thin"}
    assert both[0]["timed_together"] == both[1]["timed_together"] == [str(out), str(out2)]
    assert both[0]["batches"]["1"]["teacher"] == both[1]["batches"]["1"]["teacher"]
    summary = {r["row"]: r for r in json.loads((out / "summary.json").read_text())}
    assert summary["thin"]["latency_b1_best"] == both[0]["batches"]["1"]["thin"]["best"]
