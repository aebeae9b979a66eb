"""The speed benchmark: timer, headline arithmetic, and ``compconv bench --quick`` end to end (no timing asserts)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import compconv
from compconv.bench.report import headline, markdown
from compconv.bench.suites import default_layer_cases, default_model_cases
from compconv.bench.timing import interleaved_median
from compconv.cli import main


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
        _row("converted", "eager", 3.0, 100),
        _row("converted", "deploy_cl_compile", 1.0, 100),
    ]
    (h,) = headline(rows)
    # best vanilla 2.0 s, best converted 1.0 s: speed-up 2; MAC ratio 300/100 = 3; share 2/3 < 0.8 target.
    assert h["best_vanilla"] == "deploy_cl" and h["best_converted"] == "deploy_cl_compile"
    assert h["speedup"] == pytest.approx(2.0) and h["mac_ratio"] == pytest.approx(3.0)
    assert h["real_share"] == pytest.approx(2 / 3) and h["target"] == 0.8 and h["met"] is False
    md = markdown({"hardware": {"cpu": "X"}, "headline": [h], "model_rows": []})
    assert "| Comp-VGG16 | infer b32 | deploy_cl |" in md


def test_default_suites_cover_the_issue() -> None:
    labels = [c.label for c in default_model_cases(["compconv", "ghost"])]
    assert {"Comp-VGG16", "Comp128-ResNet50", "Comp512-ResNet50", "ghost-VGG16", "ghost-ResNet50"} <= set(
        labels
    )
    # every method's cases convert something (XSepConv has no depthwise conv to replace in VGG-16/ResNet-50)
    from compconv import get_model, list_methods

    for case in default_model_cases(list_methods()):
        if case.base == "resnet50":
            continue  # large; the CIFAR and MobileNet cases cover every method
        van = get_model(case.base, num_classes=case.num_classes)
        conv = get_model(case.base, method=case.method, method_options=dict(case.options), num_classes=case.num_classes)
        assert sum(p.numel() for p in conv.parameters()) < sum(p.numel() for p in van.parameters()), case.label
    layers = default_layer_cases()
    assert {c.c_in for c in layers} == {64, 128, 256, 512} and {c.h for c in layers} == {56, 28, 14, 7}
    assert {c.k for c in layers} == {1, 3} and {c.stride for c in layers} == {1, 2}
    assert {c.batch for c in layers} == {1, 32}


def test_bench_rejects_unknown_names(capsys) -> None:
    assert main(["bench", "--quick", "--methods", "nosuch", "--json", "", "--md", "", "--plot", ""]) == 2
    assert "unknown method" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_quick_end_to_end(tmp_path) -> None:
    out = tmp_path / "b.json"
    md, png = tmp_path / "b.md", tmp_path / "b.png"
    rc = main(
        [
            "bench",
            "--quick",
            "--methods",
            "compconv",
            "--width-multiples",
            "8",
            "--threads",
            "1",
            "--json",
            str(out),
            "--md",
            str(md),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["hardware"]["cpu"] and res["loadavg_start"] is not None and res["gemm_ceiling_gmacs"] > 0
    rows = res["model_rows"]
    labels = {r["model"] for r in rows}
    assert labels == {"compconv-ResNet20", "Comp-ResNet20-w8"}
    treatments = {(r["kind"], r["treatment"]) for r in rows if r["mode"] == "infer"}
    for kind in ("vanilla", "converted"):  # the same treatments for both: a fair baseline
        assert {(kind, t) for t in ("eager", "deploy", "deploy_cl")} <= treatments
    assert {r["mode"] for r in rows} == {"infer", "train"}
    for r in rows:
        assert r["error"] is None and r["latency_s"] > 0
        assert r["real_share"] == pytest.approx(r["latency_ratio"] / r["mac_ratio"])
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
