"""The analysis scripts under benchmarks/ run end to end on tiny settings (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_profile_ops_covers_inference_and_training_steps(tmp_path: Path, capsys) -> None:
    out = tmp_path / "prof.json"
    argv = ["--model", "comp128_cifar_resnet20", "--size", "16", "--batch", "2", "--iters", "1", "--threads", "1"]
    argv += ["--modes", "deploy", "train_eager", "--out", str(out)]
    assert _load("profile_ops").main(argv) == 0
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"deploy", "train_eager"}
    for mode, r in res["modes"].items():
        ops = {o["op"] for o in r["ops"]}
        assert any("convolution" in o for o in ops), (mode, ops)
        assert 0 < sum(o["share"] for o in r["ops"]) <= 1.0 + 1e-9
    # only a training step runs the convolutions' backward and the optimizer
    train_ops = {o["op"] for o in res["modes"]["train_eager"]["ops"]}
    assert "aten::convolution_backward" in train_ops
    assert not any("backward" in o["op"] for o in res["modes"]["deploy"]["ops"])
    assert "train_eager batch 2" in capsys.readouterr().out


def test_traffic_counts_more_elements_per_mac_for_the_converted_model(capsys) -> None:
    import compconv

    mod = _load("traffic")
    van = mod.traffic(compconv.deploy(compconv.get_model("cifar_resnet20")), 32)
    com = mod.traffic(compconv.deploy(compconv.get_model("comp128_cifar_resnet20")), 32)
    assert van["concat_and_write"] == 0 < com["concat_and_write"]  # only CompConv concatenates
    assert com["macs"] < van["macs"]
    assert com["macs"] / com["total"] < van["macs"] / van["total"]  # lower arithmetic intensity
    assert mod.main(["--model", "comp128_cifar_resnet20", "--base", "cifar_resnet20", "--size", "32"]) == 0
    assert "MACs per element moved" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--modes", "train_nope"], ["--modes", "wrong"]])
def test_profile_ops_rejects_unknown_modes(bad: list[str]) -> None:
    with pytest.raises(ValueError, match="treatment"):
        _load("profile_ops").main(["--model", "cifar_resnet20", "--size", "8", "--batch", "1", *bad])


def test_train_speed_takes_the_median_over_the_named_epochs(tmp_path: Path, capsys) -> None:
    mod = _load("train_speed")
    run = tmp_path / "run"
    run.mkdir()
    rows = ["epoch,train_images_per_s"] + [f"{e},{v}" for e, v in enumerate((10, 300, 20, 310, 320), start=1)]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    assert mod.median_speed(run) == (300.0, 5)  # median of 10, 300, 20, 310, 320
    assert mod.median_speed(run, 4, 5) == (315.0, 2)  # epochs 4-5 only: (310 + 320) / 2
    assert mod.main([f"{run}:2-5"]) == 0 and "| run | 2-5 (4) | 305 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="RUN_DIR:FIRST-LAST"):
        mod.main([f"{run}:x"])
    with pytest.raises(ValueError, match="none in"):
        mod.median_speed(run, 7, 9)


def test_hetconv_train_form_times_both_forms_after_checking_they_agree(tmp_path: Path, capsys) -> None:
    mod = _load("hetconv_train_form")
    out = tmp_path / "tf.json"
    argv = ["--models", "cifar_resnet20", "--size", "8", "--batch", "2", "--repeats", "1", "--threads", "1",
            "--json", str(out)]
    assert mod.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert set(row["step_ms"]) == {"vanilla", "hetconv_grouped", "hetconv_dense"}
    assert all(v > 0 for v in row["step_ms"].values())
    assert row["one_step_max_param_diff_float64"] < 1e-9
    # the same architecture: the forms differ only in the kernels run while training
    assert row["macs"]["hetconv_grouped"] == row["macs"]["hetconv_dense"] < row["macs"]["vanilla"]
    assert "| cifar_resnet20 | 4 | 2 |" in capsys.readouterr().out
    # a model with a BatchNorm1d head (which cannot run one image in training mode)
    assert mod.main(["--models", "cifar_vgg16_li", "--batch", "2", "--repeats", "1", "--threads", "1"]) == 0
    with pytest.raises(SystemExit):
        mod.main(["--models", "resnet_twenty"])
