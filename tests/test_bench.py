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
