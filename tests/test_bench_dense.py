"""The bench's dense alternatives at equal MACs: rows, the ``vs_dense_*`` columns and the regime-split headline,
computed from the measured times (a stub timer gives known times; no timing assertions)."""

from __future__ import annotations

import pytest

from compconv.bench import suites
from compconv.bench.report import headline, markdown
from compconv.bench.suites import ModelCase, run_model_suite
from compconv.bench.timing import Measurement

pytest.importorskip("torch_pruning")

BASE = {"vanilla": 4.0, "converted": 2.0, "dense_width": 3.0, "dense_prune": 1.6}  # seconds, by kind
FACTOR = {"eager": 1.25, "deploy_cl": 1.0, "deploy_cl_compile": 0.5, "train_eager": 3.0}


def _stub_time(name: str) -> float:
    kind, t = name.split("/")
    return BASE[kind] * FACTOR[t]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_dense_rows_and_relative_columns_come_from_the_measured_times(monkeypatch) -> None:
    timed: list[list[str]] = []

    def stub(cands, **kw):  # noqa: ANN001, ANN003, ANN202
        timed.append(sorted(cands))  # every configuration of the group in one interleaved call
        return {n: Measurement(n, _stub_time(n), [_stub_time(n)]) for n in cands}

    monkeypatch.setattr(suites, "interleaved_median", stub)
    case = ModelCase("Comp-R20", "cifar_resnet20", "compconv", {"c0": 16}, 16, 10)
    rows = run_model_suite([case], batches=(1,), train_batch=2, treatments=("eager", "deploy_cl", "deploy_cl_compile"),
                           train_treatments=("train_eager",), repeats=1, warmup=0, min_time=0.0, log=lambda s: None)
    kinds = ("vanilla", "converted", "dense_width", "dense_prune")
    assert timed[0] == sorted(f"{k}/{t}" for k in kinds for t in ("eager", "deploy_cl", "deploy_cl_compile"))
    assert timed[1] == sorted(f"{k}/train_eager" for k in kinds)
    by = {(r["mode"], r["kind"], r["treatment"]): r for r in rows}
    conv = {r["macs"] for r in rows if r["kind"] == "converted"}.pop()
    for kind in ("dense_width", "dense_prune"):  # at the converted model's MACs, within 3%
        r = by[("infer", kind, "eager")]
        assert abs(r["macs"] / conv - 1) <= 0.03 and r["dense"]["target_macs"] == conv
        assert r["dense"]["macs"] == r["macs"] and r["converted_layers"] == 0
    assert by[("infer", "dense_width", "eager")]["method"] == "width_knob"
    assert by[("infer", "dense_prune", "eager")]["method"] == "torch_pruning_magnitude"
    # vs_dense_X = best X latency in the same regime / this latency
    # eager regime: best dense_width = deploy_cl 3.0 s; converted eager = 2.0 * 1.25 = 2.5 s -> 1.2
    r = by[("infer", "converted", "eager")]
    assert r["regime"] == "eager" and r["vs_dense_width"] == pytest.approx(3.0 / 2.5)
    assert r["vs_dense_prune"] == pytest.approx(1.6 / 2.5)
    # compiled regime: dense_width compiled 1.5 s, converted compiled 1.0 s -> 1.5
    r = by[("infer", "converted", "deploy_cl_compile")]
    assert r["regime"] == "compiled" and r["vs_dense_width"] == pytest.approx(1.5 / 1.0)
    assert by[("train", "vanilla", "train_eager")]["vs_dense_prune"] == pytest.approx((1.6 * 3) / (4.0 * 3))
    # the old columns are unchanged: best vanilla (any treatment: compiled 2.0 s) / this
    assert by[("infer", "converted", "eager")]["latency_ratio"] == pytest.approx(2.0 / 2.5)

    heads = {(h["mode"], h["regime"]): h for h in headline(rows)}
    assert set(heads) == {("infer", "eager"), ("infer", "compiled"), ("train", "eager")}
    h = heads[("infer", "eager")]  # best converted deploy_cl 2.0 s; best vanilla eager-regime deploy_cl 4.0 s
    assert h["best_converted"] == "deploy_cl" and h["speedup"] == pytest.approx(2.0)
    assert h["vs_dense_width"] == pytest.approx(3.0 / 2.0) and h["vs_dense_prune"] == pytest.approx(1.6 / 2.0)
    assert h["best_dense_prune_ms"] == pytest.approx(1600.0)
    md = markdown({"hardware": {"cpu": "X"}, "headline": headline(rows), "model_rows": rows})
    assert "vs dense width" in md and "## Dense alternatives at equal MACs" in md
    assert "| Comp-R20 | dense_prune | torch_pruning_magnitude | pruning ratio |" in md


def test_a_baseline_that_cannot_be_built_is_an_error_row_and_the_rest_is_timed(monkeypatch) -> None:
    from compconv.bench import baselines

    monkeypatch.setattr(suites, "interleaved_median",
                        lambda cands, **kw: {n: Measurement(n, 1.0, [1.0]) for n in cands})
    real = baselines.dense_baselines

    def no_pruning(host, target, size, *, kinds, **kw):  # noqa: ANN001, ANN003, ANN202 - as without torch-pruning
        if "prune" in kinds:
            raise ImportError("the prune baseline needs Torch-Pruning")
        return real(host, target, size, kinds=kinds, **kw)

    monkeypatch.setattr(baselines, "dense_baselines", no_pruning)
    case = ModelCase("Comp-R20", "cifar_resnet20", "compconv", {"c0": 16}, 16, 10)
    rows = run_model_suite([case], batches=(1,), train_batch=0, treatments=("eager",), repeats=1, warmup=0,
                           min_time=0.0, log=lambda s: None)
    (err,) = [r for r in rows if "mode" not in r]
    assert err["kind"] == "dense_prune" and "needs Torch-Pruning" in err["error"]
    timed = [r for r in rows if "mode" in r]
    assert {r["kind"] for r in timed} == {"vanilla", "converted", "dense_width"}
    assert all(r["vs_dense_width"] == 1.0 for r in timed)
    assert all(r["vs_dense_prune"] != r["vs_dense_prune"] for r in timed)  # nan: nothing to compare with
    with pytest.raises(ValueError, match="dense_baselines must be among"):
        run_model_suite([case], batches=(1,), train_batch=0, treatments=("eager",), dense_baselines=("thin",),
                        log=lambda s: None)


def test_default_cases_include_the_issue_hosts() -> None:
    labels = {c.label: c for c in suites.default_model_cases(["compconv"])}
    assert {"Comp-VGG16", "Comp128-ResNet20", "Comp128-ResNet50", "Comp128-MobileNetV2"} <= set(labels)
    pytest.importorskip("timm")
    assert labels["Comp128-MobileNetV3L"].base == "timm:mobilenetv3_large_100"
    assert labels["Comp128-EfficientNetB0"].base == "timm:efficientnet_b0"


def test_hardware_aware_rows_keep_what_the_timer_says_is_slower_and_the_headline_says_so(monkeypatch) -> None:
    """``--hardware-aware``: a converted_hw model per inference batch, converted at that batch's input size;
    the layers its timer finds slower stay dense (listed in ``hw_kept``), and the headline compares it with
    the best vanilla (``hw_speedup``)."""
    from compconv import hardware_aware as ha
    from compconv.bench.report import headline, markdown
    from compconv.layers.base import CompactConv2d

    shapes: list[tuple[int, ...]] = []

    def stub(name, module, x):  # noqa: ANN001, ANN202 - compact forms of layer1.* are "slower"
        shapes.append(tuple(x.shape))
        if not isinstance(module, CompactConv2d):
            return 1e-3
        return 2e-3 if name.startswith("layer1.") else 0.5e-3

    monkeypatch.setattr(ha, "benchmark_timer", stub)
    real_median = suites.interleaved_median

    def median(cands, **kw):  # noqa: ANN001, ANN202 - whole models ("m", the guard) equal: nothing reverted
        return {"m": Measurement("m", 1.0, [1.0])} if set(cands) == {"m"} else real_median(cands, **kw)

    monkeypatch.setattr(suites, "interleaved_median", median)
    case = ModelCase("tiny", "cifar_resnet20", "compconv", {"c0": 16}, 16, 10)
    rows = run_model_suite([case], batches=(2,), train_batch=0, treatments=("eager",), repeats=1, warmup=0,
                           min_time=0.0, dense_baselines=(), hardware_aware=True, log=lambda s: None)
    hw = [r for r in rows if r.get("kind") == "converted_hw"]
    conv = [r for r in rows if r.get("kind") == "converted"]
    assert len(hw) == 1 and len(conv) == 1
    assert hw[0]["hw_kept"] == [f"layer1.{b}.conv{c}" for b in range(3) for c in (1, 2)]
    assert hw[0]["converted_layers"] == conv[0]["converted_layers"] - 6
    assert hw[0]["macs"] > conv[0]["macs"]  # the kept layers are dense again
    assert {s[0] for s in shapes} == {2}  # timed at the inference batch, not at batch 1
    (h,) = headline(rows)
    van = min(r["latency_s"] for r in rows if r.get("kind") == "vanilla")
    assert h["hw_speedup"] == pytest.approx(van / hw[0]["latency_s"])
    assert h["hw_kept"] == 6
    assert "hw speedx" in markdown({"headline": [h], "model_rows": rows})


def test_dense_target_is_the_faster_dense_alternative_within_1_15x() -> None:
    from compconv.bench.report import headline

    def row(kind: str, lat: float) -> dict:
        return {"model": "Comp128-ResNet20", "mode": "infer", "batch": 1, "treatment": "deploy_cl", "kind": kind,
                "latency_s": lat, "mac_ratio": 2.0, "macs": 1, "method": "compconv"}

    for conv_lat, met in ((1.14, True), (1.16, False)):
        (h,) = headline([row("vanilla", 2.0), row("converted", conv_lat), row("dense_width", 1.2),
                         row("dense_prune", 1.0)])
        assert h["vs_dense_best"] == pytest.approx(1.0 / conv_lat)
        assert h["dense_target"] == 1.15 and h["dense_met"] is met


@pytest.mark.filterwarnings("ignore:convert.*converted 0 of:UserWarning")
def test_hardware_aware_rows_time_layers_on_the_runs_dtype_and_each_treatments_memory_format(monkeypatch) -> None:
    """``--hardware-aware`` converts once per (batch, treatment): its layers are timed in the run's dtype on
    NCHW inputs for the NCHW treatments and on channels_last inputs for the ``_cl`` ones."""
    import torch

    from compconv import hardware_aware as ha
    from compconv.bench.cli import build_arg_parser
    from compconv.layers.base import CompactConv2d

    seen: list[tuple[torch.dtype, str, bool]] = []
    whole: list[int] = []

    def stub(name, module, x):  # noqa: ANN001, ANN202 - compact forms "slower" in NCHW, "faster" in channels_last
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        seen.append((x.dtype, x.device.type, cl))
        if not isinstance(module, CompactConv2d):
            return 1e-3
        return 0.5e-3 if cl else 2e-3

    monkeypatch.setattr(ha, "benchmark_timer", stub)
    def median(cands, **kw):  # noqa: ANN001, ANN202 - the whole model ("m") is timed as the treatment runs it
        if set(cands) == {"m"}:
            whole.append(kw["repeats"])
        return {n: Measurement(n, 1.0, [1.0]) for n in cands}

    monkeypatch.setattr(suites, "interleaved_median", median)
    case = ModelCase("tiny", "cifar_resnet20", "compconv", {"c0": 16}, 16, 10)
    rows = run_model_suite([case], batches=(2,), train_batch=0, treatments=("eager", "deploy", "deploy_cl"),
                           repeats=1, warmup=0, min_time=0.0, dtype=torch.float64, dense_baselines=(),
                           hardware_aware=True, log=lambda s: None)
    assert {(d, dev) for d, dev, _ in seen} == {(torch.float64, "cpu")}
    n_layers = len(seen) // 6  # each candidate layer: dense and compact, in each of the three conversions
    assert sum(cl for *_, cl in seen) == 2 * n_layers > 0 and sum(not cl for *_, cl in seen) == 4 * n_layers
    # the whole model, source and converted, once per conversion that converted anything (deploy_cl)
    assert whole == [5, 5]  # median of 5 rounds each
    hw = {r["treatment"]: r for r in rows if r.get("kind") == "converted_hw"}
    conv = {r["treatment"]: r for r in rows if r.get("kind") == "converted"}
    assert set(hw) == {"eager", "deploy", "deploy_cl"}
    for t in ("eager", "deploy"):  # the NCHW conversion: every compact form was "slower", so all kept dense
        assert len(hw[t]["hw_kept"]) == n_layers and hw[t]["converted_layers"] == 0
        assert hw[t]["macs"] > conv[t]["macs"]
    cl = hw["deploy_cl"]  # the channels_last conversion: every compact form was "faster", so none kept
    assert cl["hw_kept"] == [] and cl["converted_layers"] == conv["deploy_cl"]["converted_layers"]
    assert cl["macs"] == conv["deploy_cl"]["macs"]
    text = " ".join(build_arg_parser().format_help().split())
    assert "on --device in --dtype, in NCHW for the NCHW treatments and in channels_last for the _cl ones" in text
    assert "the whole model against its source as the treatment runs it" in text
