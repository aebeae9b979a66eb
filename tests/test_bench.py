"""The speed benchmark: timer, headline arithmetic, and ``compconv bench --quick`` end to end (no timing asserts)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

import compconv
from compconv.bench.report import headline, markdown
from compconv.bench.suites import default_layer_cases, default_model_cases
from compconv.bench.timing import interleaved_median
from compconv.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_interleaved_median_reports_each_candidate_and_failures() -> None:
    calls = {"a": 0}

    def a() -> None:
        calls["a"] += 1

    def bad() -> None:
        raise RuntimeError("boom")

    res = interleaved_median({"a": a, "bad": bad}, repeats=3, warmup=1, min_time=0.0)
    assert res["a"].error is None and len(res["a"].times) == 3 and res["a"].median >= 0
    assert calls["a"] == 1 + 1 + 3  # warm-up, calibration, 3 repeats of 1 inner call
    assert math.isnan(res["bad"].median) and "boom" in res["bad"].error
    with pytest.raises(ValueError, match="repeats"):
        interleaved_median({"a": a}, repeats=0)


def _row(kind: str, treatment: str, lat: float, macs: int) -> dict:
    return dict(
        model="Comp-VGG16",
        base="cifar_vgg16",
        method="compconv" if kind == "converted" else "vanilla",
        kind=kind,
        mode="infer",
        batch=32,
        treatment=treatment,
        macs=macs,
        mac_ratio=300 / macs,
        latency_s=lat,
    )


def test_headline_compares_best_with_best() -> None:
    rows = [
        _row("vanilla", "eager", 4.0, 300),
        _row("vanilla", "deploy_cl", 2.0, 300),
        _row("vanilla", "deploy_cl_compile", 1.5, 300),
        _row("converted", "eager", 3.0, 100),
        _row("converted", "deploy_cl", 2.5, 100),
        _row("converted", "deploy_cl_compile", 1.0, 100),
    ]
    eager, compiled = headline(rows)  # eager and compiled reported separately, eager first
    # compiled: best vanilla 1.5 s, best converted 1.0 s: speed-up 1.5; MAC ratio 300/100 = 3; share 0.5 < 0.8.
    assert compiled["regime"] == "compiled" and compiled["best_vanilla"] == "deploy_cl_compile"
    assert compiled["speedup"] == pytest.approx(1.5) and compiled["mac_ratio"] == pytest.approx(3.0)
    assert compiled["real_share"] == pytest.approx(0.5) and compiled["target"] == 0.8 and compiled["met"] is False
    # eager: best vanilla deploy_cl 2.0 s, best converted deploy_cl 2.5 s: 0.8x; no dense rows -> None
    assert eager["regime"] == "eager" and eager["best_vanilla"] == "deploy_cl" == eager["best_converted"]
    assert eager["speedup"] == pytest.approx(0.8) and eager["vs_dense_width"] is None
    md = markdown({"hardware": {"cpu": "X"}, "headline": [eager, compiled], "model_rows": []})
    assert "| Comp-VGG16 | infer b32 | eager | deploy_cl |" in md


def test_default_suites_cover_the_issue() -> None:
    labels = [c.label for c in default_model_cases(["compconv", "ghost"])]
    assert {"Comp-VGG16", "Comp128-ResNet50", "Comp512-ResNet50", "ghost-VGG16", "ghost-ResNet50"} <= set(
        labels
    )
    # every method's cases convert something (XSepConv has no depthwise conv to replace in VGG-16/ResNet-50)
    from compconv import list_methods
    from compconv.bench.suites import build_case

    for case in default_model_cases(list_methods()):
        if case.base == "resnet50" or case.base.startswith("timm:"):
            continue  # large; the CIFAR and MobileNet cases cover every method
        van, conv = build_case(case)
        assert sum(p.numel() for p in conv.parameters()) < sum(p.numel() for p in van.parameters()), case.label
    layers = default_layer_cases()
    assert {c.c_in for c in layers} == {64, 128, 256, 512} and {c.h for c in layers} == {56, 28, 14, 7}
    assert {c.k for c in layers} == {1, 3} and {c.stride for c in layers} == {1, 2}
    assert {c.batch for c in layers} == {1, 32}


def test_bench_rejects_unknown_names(capsys) -> None:
    assert main(["bench", "--quick", "--methods", "nosuch", "--json", "", "--md", "", "--plot", ""]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_default_outputs_go_to_a_new_run_dir_never_docs(tmp_path, monkeypatch) -> None:
    from compconv.bench.cli import output_paths

    monkeypatch.chdir(tmp_path)
    ns = argparse.Namespace
    paths = output_paths(ns(json=None, md=None, plot=None, out_dir=None, append=False))
    run = Path(paths["json"]).parent
    assert run.parent == Path("runs", "bench") and not run.exists()  # runs/bench/<date-time>, made on write
    assert paths == {"json": str(run / "bench_speed.json"), "md": str(run / "bench_speed.md"),
                     "plot": str(run / "bench_speed.png")}
    run.mkdir(parents=True)  # a second run in the same second gets its own folder
    assert Path(output_paths(ns(json=None, md=None, plot=None, out_dir=None))["md"]).parent == Path(f"{run}-2")
    # Named paths are kept ("" = not written); the others go to --out-dir.
    got = output_paths(ns(json="docs/results/x.json", md="", plot=None, out_dir="o", append=False))
    assert got == {"json": "docs/results/x.json", "md": "", "plot": str(Path("o", "bench_speed.png"))}
    with pytest.raises(ValueError, match="--append extends the results in --json FILE"):
        output_paths(ns(json=None, md=None, plot=None, out_dir=None, append=True))


def _plot_row(model: str, kind: str, macs: float, lat: float, **kw: object) -> dict:
    method = kw.pop("method", "compconv" if kind == "converted" else "vanilla")
    return dict(model=model, base="cifar_vgg16", method=method, kind=kind, mode="infer", batch=1, treatment="eager",
                macs=macs, latency_s=lat, **kw)


def test_plot_has_no_stacked_labels_and_leaves_out_unconverted_models() -> None:
    from compconv.bench.report import figure
    from plot_helpers import figure_notes, legend_labels, overlapping_texts

    rows = []
    for m in ("Comp-VGG16", "Comp-VGG16-w8", "Comp-VGG16-w16"):  # near-identical points (labels used to stack)
        rows += [_plot_row(m, "vanilla", 3e8, 0.010), _plot_row(m, "converted", 1e8, 0.006, converted_layers=12)]
    # A method that converted nothing: timed by an older bench (a row with mode), or skipped by this one.
    rows += [_plot_row("xsepconv-VGG16", "vanilla", 3e8, 0.010),
             _plot_row("xsepconv-VGG16", "converted", 3e8, 0.010, converted_layers=0, method="xsepconv"),
             dict(model="xsepconv-VGG16b", base="cifar_vgg16", method="xsepconv", converted_layers=0,
                  error="xsepconv converted 0 layers of cifar_vgg16: skipped, not a result")]
    fig = figure({"model_rows": rows, "hardware": {"cpu": "X"}})
    assert overlapping_texts(fig) == []
    labels = legend_labels(fig)
    assert {"Comp-VGG16", "Comp-VGG16-w8", "Comp-VGG16-w16", "vanilla cifar_vgg16"} <= set(labels)
    assert not any(lab.startswith("xsepconv") for lab in labels)
    assert "xsepconv-VGG16, xsepconv-VGG16b" in figure_notes(fig)


def test_a_case_that_converts_nothing_is_not_timed() -> None:
    from compconv.bench.suites import ModelCase, run_model_suite

    case = ModelCase("xsepconv-VGG16", "cifar_vgg16", "xsepconv", {}, 8, 10)  # VGG-16 has no depthwise conv
    rows = run_model_suite([case], batches=(1,), train_batch=0, treatments=("eager",), repeats=1, warmup=0,
                           min_time=0.0, log=lambda s: None)
    assert len(rows) == 1 and "mode" not in rows[0] and rows[0]["error"]


@pytest.mark.slow
def test_bench_quick_end_to_end(tmp_path, monkeypatch) -> None:
    # Run as a user would from the repository root: the docs' committed results must stay untouched.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs" / "results").mkdir(parents=True)
    argv = ["bench", "--quick", "--methods", "compconv", "--width-multiples", "8", "--threads", "1"]
    rc = main(argv)
    assert rc == 0
    assert not [p for p in (tmp_path / "docs").rglob("*") if p.is_file()]
    (run,) = (tmp_path / "runs" / "bench").iterdir()
    out, md, png = run / "bench_speed.json", run / "bench_speed.md", run / "bench_speed.png"
    res = json.loads(out.read_text())
    assert res["hardware"]["cpu"] and res["loadavg_start"] is not None and res["gemm_ceiling_gmacs"] > 0
    rows = res["model_rows"]
    labels = {r["model"] for r in rows}
    assert labels == {"compconv-ResNet20", "Comp-ResNet20-w8"}
    treatments = {(r["kind"], r["treatment"]) for r in rows if r["mode"] == "infer"}
    for kind in ("vanilla", "converted", "dense_width", "dense_prune"):  # the same treatments: fair baselines
        assert {(kind, t) for t in ("eager", "deploy", "deploy_cl")} <= treatments
    assert {r["mode"] for r in rows} == {"infer", "train"}
    for r in rows:
        assert r["error"] is None and r["latency_s"] > 0
        assert r["real_share"] == pytest.approx(r["latency_ratio"] / r["mac_ratio"])
        assert r["vs_dense_width"] > 0 and r["vs_dense_prune"] > 0
    # Width rounding costs MACs: the w8 model has more than the plain one (it is reported, not hidden).
    macs = {r["model"]: r["macs"] for r in rows if r["kind"] == "converted"}
    assert macs["Comp-ResNet20-w8"] > macs["compconv-ResNet20"]
    assert {r["method"] for r in res["layer_rows"]} >= {"vanilla", "compconv", "compconv_w8"}
    assert res["headline"] and "Headline" in md.read_text() and png.stat().st_size > 0


def test_auto1x1_treatment_needs_the_input_and_keeps_outputs() -> None:
    from compconv.bench.suites import prepare_model

    torch.manual_seed(0)
    model = compconv.get_model("cifar_resnet50", num_classes=10, method="compconv", method_options={"c0": 128})
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model.eval()(x)
        m, fmt = prepare_model(model, "deploy_auto1x1_cl", num_classes=10, example_input=x)
        torch.testing.assert_close(m(x.contiguous(memory_format=fmt)), ref, rtol=1e-4, atol=1e-4)
    assert fmt is torch.channels_last
    with pytest.raises(ValueError, match="example_input"):
        prepare_model(model, "deploy_auto1x1", num_classes=10)
    for bad in ("auto1x1", "deploy_auto1x1_dense1x1", "deploy_fast"):
        with pytest.raises(ValueError, match="treatment must be one of"):
            prepare_model(model, bad, num_classes=10, example_input=x)


# ---------------------------------------------------------------------------------------------------------
# Arguments refused up front; --append never loses saved rows; standard JSON (issue 17 review)
# ---------------------------------------------------------------------------------------------------------
def _nothing_may_run(monkeypatch) -> None:  # noqa: ANN001
    """Make the GEMM ceiling and both suites fail loudly: a refused argument must come before any of them."""
    from compconv.bench import suites, timing

    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the bench started although an argument was bad")

    monkeypatch.setattr(timing, "gemm_ceiling", boom)
    monkeypatch.setattr(suites, "run_model_suite", boom)
    monkeypatch.setattr(suites, "run_layer_suite", boom)
    monkeypatch.setattr(suites, "build_case", boom)


def test_a_misspelt_treatment_is_refused_before_anything_runs_and_an_appended_json_is_kept(
        tmp_path, monkeypatch, capsys) -> None:
    _nothing_may_run(monkeypatch)
    saved = tmp_path / "saved.json"
    saved.write_text('{"model_rows": [{"model": "m", "mode": "infer", "batch": 1, "latency_s": 0.5}]}')
    before = saved.read_bytes()
    out = ["--json", str(saved), "--md", str(tmp_path / "x.md"), "--plot", str(tmp_path / "x.png")]
    for argv, flag, bad, allowed in (
        (["--treatments", "eager", "deploy_cll"], "--treatments", "deploy_cll", "deploy_cl_compile"),
        (["--treatments", "train_eager"], "--treatments", "train_eager", "deploy_auto1x1"),
        (["--train-treatments", "train_fast"], "--train-treatments", "train_fast", "train_eager, train_cl"),
    ):
        assert main(["bench", "--quick", "--append", *argv, *out]) == 2
        err = capsys.readouterr().err
        assert f"compconv bench: error: argument {flag}: invalid choice: '{bad}' (choose from" in err
        assert allowed in err
    assert saved.read_bytes() == before  # the saved rows are untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.json"]  # no empty report or plot written


@pytest.mark.parametrize(("argv", "message"), [
    (["--threads", "0"], "argument --threads: must be an integer >= 1, but got 0"),
    (["--size", "0"], "argument --size: must be an integer >= 1 (the input height and width in pixels), but got 0"),
    (["--size", "-5"], "argument --size: must be an integer >= 1"),
    (["--batches", "1", "-1"], "argument --batches: must be an integer >= 0 (0 = no inference rows), but got -1"),
    (["--batches", "0", "--train-batch", "0"], "argument --batches: --batches 0 with --train-batch 0 leaves "
                                              "nothing to time"),
    (["--suite", "layers", "--batches", "0"], "argument --batches: --batches 0 with --suite layers leaves nothing "
                                              "to time"),
    (["--train-batch", "-1"], "argument --train-batch: must be an integer >= 0 (0 = no training rows), but got -1"),
    (["--min-time", "-1"], "argument --min-time: must be a number of seconds >= 0, but got -1.0"),
    (["--min-time", "nan"], "argument --min-time: must be a number of seconds >= 0, but got nan"),
    (["--repeats", "0"], "argument --repeats: must be an integer >= 1, but got 0"),
    (["--warmup", "-1"], "argument --warmup: must be an integer >= 0, but got -1"),
    (["--width-multiples", "0"], "argument --width-multiples: must be an integer >= 1, but got 0"),
    (["--device", "foo"], "argument --device: invalid device 'foo'"),
    (["--device", "meta"], "argument --device: the bench runs on cpu or cuda[:N], but got 'meta'"),
    (["--suite", "layers", "--hardware-aware"], "argument --hardware-aware: it converts the model cases, so it "
                                                "needs --suite all or --suite models, not --suite layers"),
])
def test_bad_bench_arguments_are_refused_up_front_naming_the_flag(argv, message, tmp_path, monkeypatch,
                                                                   capsys) -> None:
    monkeypatch.chdir(tmp_path)
    _nothing_may_run(monkeypatch)
    assert main(["bench", *argv]) == 2
    assert f"compconv bench: error: {message}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no run folder made


def _saved_row(model: str, kind: str, lat: float | None) -> dict:
    return dict(model=model, base="cifar_resnet20", method="compconv" if kind == "converted" else "vanilla",
                kind=kind, mode="infer", batch=2, treatment="eager", macs=100, mac_ratio=2.0 if kind == "converted"
                else 1.0, latency_s=lat, latency_ratio=1.0, latency_ratio_same_treatment=1.0, real_share=0.5,
                gmacs_per_s=1.0, ceiling_share=0.1, error=None)


def test_append_keeps_every_saved_row_this_run_did_not_time_again(tmp_path, monkeypatch) -> None:
    from compconv.bench import suites, timing

    monkeypatch.setattr(timing, "gemm_ceiling", lambda *a, **k: 1.0)
    saved = tmp_path / "saved.json"
    old = [_saved_row("compconv-ResNet20", k, 0.5) for k in ("vanilla", "converted")]
    old.append(_saved_row("other", "vanilla", 0.7))
    saved.write_text(json.dumps({"started": "then", "model_rows": old, "layer_rows": [{"layer": "L", "x": 1}]}))
    argv = ["bench", "--quick", "--methods", "compconv", "--width-multiples", "--suite", "models", "--append",
            "--json", str(saved), "--md", "", "--plot", ""]
    new_rows: list[dict] = []
    monkeypatch.setattr(suites, "run_model_suite", lambda *a, **k: [dict(r) for r in new_rows])

    # 1) nothing timed (every configuration failed to prepare): every saved row stays
    assert main(argv) == 0
    res = json.loads(saved.read_text())
    assert res["model_rows"] == old and res["layer_rows"] == [{"layer": "L", "x": 1}]
    assert res["previous_runs"][0]["started"] == "then"
    # 2) a failed timing (NaN) does not replace a saved time either; it is added, as null
    new_rows[:] = [_saved_row("compconv-ResNet20", "converted", math.nan)]
    assert main(argv) == 0
    rows = json.loads(saved.read_text())["model_rows"]
    assert old[1] in rows and {"converted": 2, "vanilla": 2} == {
        k: sum(r["kind"] == k for r in rows) for k in ("converted", "vanilla")}
    assert [r["latency_s"] for r in rows if r["kind"] == "converted"] == [0.5, None]
    # 3) a timed row replaces the saved rows of its (model, mode, batch); other models' rows stay
    new_rows[:] = [_saved_row("compconv-ResNet20", k, 0.25) for k in ("vanilla", "converted")]
    assert main(argv) == 0
    rows = json.loads(saved.read_text())["model_rows"]
    assert sorted((r["model"], r["kind"], r["latency_s"]) for r in rows) == [
        ("compconv-ResNet20", "converted", 0.25), ("compconv-ResNet20", "vanilla", 0.25), ("other", "vanilla", 0.7)]


def test_bench_json_is_standard_json_with_null_for_nan_and_reads_back(tmp_path) -> None:
    from compconv.bench.report import write_json

    def no_constants(name: str) -> None:
        raise AssertionError(f"not standard JSON: {name}")

    rows = [_saved_row("m", "vanilla", 0.5), _saved_row("m", "converted", math.nan)]
    rows[0]["vs_dense_width"], rows[1]["vs_dense_width"] = math.inf, math.nan
    path = tmp_path / "r.json"
    write_json(str(path), {"model_rows": rows, "ratios": (1.0, -math.inf), "hardware": {"cpu": "X"}})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text, parse_constant=no_constants)
    assert data["ratios"] == [1.0, None]
    assert [r["vs_dense_width"] for r in data["model_rows"]] == [None, None]
    assert data["model_rows"][1]["latency_s"] is None
    # what the bench does with a file it reads back (--append): the headline and report still work
    data["headline"] = headline(data["model_rows"])
    md = markdown(data)
    assert "| m | infer b2 | converted | eager |" in md
