"""``convert(..., hardware_aware=True)``: layers whose compact form is not faster are kept, with both timings."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from compconv import convert
from compconv import hardware_aware as ha
from compconv.layers.base import CompactConv2d
from compconv.models import get_model

SLOW = "layer1.0.conv1"


pytestmark = pytest.mark.usefixtures("one_thread")


def _stub(calls: list[tuple[str, str, tuple[int, ...], bool, bool]]):  # noqa: ANN202
    """Dense 1 ms per call; compact 0.5 ms, except layer SLOW whose compact form takes 2 ms."""

    def timer(name: str, module: nn.Module, x: torch.Tensor) -> float:
        compact = isinstance(module, CompactConv2d)
        calls.append((name, "compact" if compact else "dense", tuple(x.shape), module.training,
                      torch.is_grad_enabled()))
        if not compact:
            return 1e-3
        return 2e-3 if name == SLOW else 0.5e-3

    return timer


def test_a_layer_the_timer_says_is_slower_is_kept_and_reported_with_its_timings() -> None:
    torch.manual_seed(0)
    plain = convert(get_model("cifar_resnet20"), "compconv", c0=16, input_size=(2, 3, 32, 32), return_report=True)[1]
    model = get_model("cifar_resnet20").train()
    original = model.layer1[0].conv1
    calls: list = []
    model, report = convert(model, "compconv", c0=16, input_size=(2, 3, 32, 32), hardware_aware=True,
                            timer=_stub(calls), return_report=True)
    row = {r.name: r for r in report.layers}[SLOW]
    assert row.action == "kept" and row.reason == "kept (hardware_aware): compact 2 ms >= dense 1 ms"
    assert model.layer1[0].conv1 is original  # the dense conv itself stays in the model
    # every other layer the plain conversion converts is converted, with its timings in the report
    assert {r.name for r in report.converted} == {r.name for r in plain.converted} - {SLOW}
    assert len(report.converted) == len(plain.converted) - 1 > 0
    for r in report.converted:
        assert "hardware_aware: compact 0.5 ms < dense 1 ms" in r.reason
    # each candidate timed once per form, at the input it sees at input_size (batch 2), in eval, without grad
    assert sorted(n for n, *_ in calls if n) == sorted([r.name for r in plain.converted] * 2)
    # and the whole model twice (source, converted: 1 ms each by this stub, so nothing is reverted)
    assert [(k, s, t, g) for n, k, s, t, g in calls if not n] == [("dense", (2, 3, 32, 32), False, False)] * 2
    assert (SLOW, "dense", (2, 16, 32, 32), False, False) in calls
    assert (SLOW, "compact", (2, 16, 32, 32), False, False) in calls
    assert model.training and original.training  # modes restored after timing
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.filterwarnings("ignore:convert.*converted 0 of:UserWarning")
def test_equal_timings_keep_the_dense_conv() -> None:
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1))
    model, report = convert(model, "compconv", depth=1, input_size=(1, 3, 8, 8), hardware_aware=True,
                            timer=lambda name, m, x: 1e-4, return_report=True)
    assert not report.converted and type(model[1]) is nn.Conv2d
    assert report.layers[1].reason == "kept (hardware_aware): compact 0.1 ms >= dense 0.1 ms"


def test_time_pair_sums_the_calls_of_a_layer_and_times_each_shape_once() -> None:
    dense = nn.Conv2d(8, 8, 3, padding=1)
    compact = nn.Conv2d(8, 8, 1)
    seen: list = []

    def timer(name: str, m: nn.Module, x: torch.Tensor) -> float:
        seen.append((m is dense, tuple(x.shape)))
        return (2.0 if m is dense else 1.0) * x.shape[-1]  # seconds proportional to the width: 4 or 2

    t_dense, t_compact = ha.time_pair("c", dense, compact, [(1, 8, 4, 4), (1, 8, 4, 4), (1, 8, 2, 2)], timer)
    assert t_dense == 2 * (2.0 * 4) + 2.0 * 2 and t_compact == 2 * (1.0 * 4) + 1.0 * 2  # 20 and 10 seconds
    assert len(seen) == 4  # 2 shapes x 2 forms
    for bad in (float("nan"), -1.0, None, True):
        with pytest.raises(ValueError, match="timer returned"):
            ha.time_pair("c", dense, compact, [(1, 8, 4, 4)], lambda n, m, x, b=bad: b)
    with pytest.raises(ValueError, match="no input shapes"):
        ha.time_pair("c", dense, compact, [], timer)


def test_bad_arguments_are_refused_before_the_model_is_touched() -> None:
    model = get_model("cifar_resnet20")
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="hardware_aware=True times every layer at input_size, which is missing"):
        convert(model, "compconv", hardware_aware=True)
    with pytest.raises(ValueError, match="hardware_aware must be True or False"):
        convert(model, "compconv", hardware_aware="yes", input_size=(1, 3, 32, 32))
    with pytest.raises(ValueError, match="used with hardware_aware=True"):
        convert(model, "compconv", timer=lambda n, m, x: 0.0)
    with pytest.raises(TypeError, match="timer must be a callable"):
        convert(model, "compconv", hardware_aware=True, input_size=(1, 3, 32, 32), timer=0.001)
    with pytest.raises(ValueError, match="timer returned"):  # a broken timer: raised before any swap
        convert(model, "compconv", hardware_aware=True, input_size=(1, 3, 32, 32), timer=lambda n, m, x: math.nan)
    assert [type(m) for m in model.modules()] == before


@pytest.mark.filterwarnings("ignore:convert.*converted 0 of:UserWarning")
def test_the_default_timer_runs_on_a_tiny_model(monkeypatch) -> None:
    monkeypatch.setattr(ha, "MIN_RUN_TIME", 0.002)
    t = ha.benchmark_timer("c", nn.Conv2d(4, 4, 3, padding=1).eval(), torch.randn(1, 4, 8, 8))
    assert isinstance(t, float) and t > 0
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    _, report = convert(model, "compconv", depth=1, input_size=(1, 3, 8, 8), hardware_aware=True,
                        return_report=True)
    row = report.layers[1]  # converted or kept, the report gives both timings (no assertion on which)
    assert " ms" in row.reason and "hardware_aware" in row.reason


def _layouts(calls: list) -> Callable:  # noqa: ANN202
    def timer(name: str, module: nn.Module, x: torch.Tensor) -> float:
        strict_cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        calls.append((x.dtype, strict_cl))
        return 0.5e-3 if isinstance(module, CompactConv2d) else 1e-3

    return timer


def test_layers_are_timed_in_the_models_memory_format_and_dtype_and_replacements_follow_its_layout() -> None:
    for fmt in (torch.channels_last, torch.contiguous_format):
        calls: list = []
        model = get_model("cifar_resnet20").to(memory_format=fmt)
        assert ha.model_memory_format(model) == fmt
        model, report = convert(model, "compconv", c0=16, input_size=(2, 3, 16, 16), hardware_aware=True,
                                timer=_layouts(calls), return_report=True)
        assert report.converted and {cl for _, cl in calls} == {fmt == torch.channels_last}
        for name in (r.name for r in report.converted):  # the compact layers are in the model's layout too
            for p in model.get_submodule(name).parameters():
                if p.dim() == 4 and p.shape[-1] > 1:
                    assert p.is_contiguous(memory_format=fmt), (name, fmt)
    calls = []
    convert(get_model("cifar_resnet20").double(), "compconv", c0=16, input_size=(1, 3, 16, 16),
            hardware_aware=True, timer=_layouts(calls))
    assert {d for d, _ in calls} == {torch.float64}


def test_a_meta_device_model_is_refused_before_anything_is_timed() -> None:
    calls: list = []
    with torch.device("meta"):
        model = get_model("cifar_resnet20")
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"hardware_aware=True times every layer on this machine, but the model is "
                                         r"on the meta device .* model\.to_empty\(device='cpu'\)"):
        convert(model, "compconv", input_size=(1, 3, 32, 32), hardware_aware=True, timer=_layouts(calls))
    assert not calls and [type(m) for m in model.modules()] == before
    with pytest.raises(ValueError, match="cannot time Conv2d on the meta device"):
        ha.time_module("c", model.conv1, [(1, 3, 8, 8)], _layouts(calls))


def test_a_timer_that_raises_is_reported_with_the_layer_and_the_timer_signature() -> None:
    model = get_model("cifar_resnet20")
    before = [type(m) for m in model.modules()]

    def boom(name: str, module: nn.Module, x: torch.Tensor) -> float:
        raise RuntimeError("boom")

    def two_args(module: nn.Module, x: torch.Tensor) -> float:
        return 1e-3

    with pytest.raises(RuntimeError, match=r"timer raised RuntimeError for layer 'layer1\.0\.conv1' \(Conv2d on "
                                           r"input \(1, 16, 32, 32\)\): boom; the timer is called as "
                                           r"timer\(name, module, x\) -> seconds per call"):
        convert(model, "compconv", hardware_aware=True, input_size=(1, 3, 32, 32), timer=boom)
    with pytest.raises(TypeError, match=r"timer raised TypeError for layer 'layer1\.0\.conv1' .*2 positional "
                                        r"arguments.*timer\(name, module, x\) -> seconds per call"):
        convert(model, "compconv", hardware_aware=True, input_size=(1, 3, 32, 32), timer=two_args)  # type: ignore[arg-type]
    assert [type(m) for m in model.modules()] == before


def _guard_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1) for i in range(5)]).eval()


# compact time per layer (dense: 1 ms each): gains 0.2, 0.4, 0.8, 0.9 ms
COMPACT_MS = {"1": 0.8, "2": 0.6, "3": 0.2, "4": 0.1}


def _guard_timer(overhead_ms: float, calls: list):  # noqa: ANN202
    """Layers as COMPACT_MS says; the whole model 10 ms + per compact layer (its time - 1 ms + overhead), an
    inter-layer cost a layer timing cannot see (a fusion the compact form breaks)."""

    def timer(name: str, module: nn.Module, x: torch.Tensor) -> float:
        if name:
            return 1e-3 * (COMPACT_MS[name] if isinstance(module, CompactConv2d) else 1.0)
        compact = [n for n, m in module.named_children() if isinstance(m, CompactConv2d)]
        calls.append(tuple(compact))
        return 1e-3 * (10 + sum(COMPACT_MS[n] - 1 + overhead_ms for n in compact))

    return timer


def test_a_converted_model_slower_as_a_whole_reverts_its_least_gaining_layers() -> None:
    calls: list = []
    # overhead 0.6 ms: converting all four gives 10.1 ms > 10 ms; reverting layer "1" (gain 0.2) gives 9.7 ms
    model, report = convert(_guard_net(), "compconv", depth=1, input_size=(1, 3, 8, 8), hardware_aware=True,
                            timer=_guard_timer(0.6, calls), return_report=True)
    assert type(model[1]) is nn.Conv2d and all(isinstance(model[i], CompactConv2d) for i in (2, 3, 4))
    row = report.layers[1]
    assert row.action == "kept" and row.reason.startswith(
        "kept (hardware_aware, whole model): converted model 10.1 ms > source 10 ms; reverting the 1 "
        "least-gaining layer(s) gives 9.7 ms")
    assert [r.name for r in report.converted] == ["2", "3", "4"]
    assert calls[0] == () and calls[1] == ("1", "2", "3", "4")  # the source, then the converted model
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 16, 8, 8)


@pytest.mark.filterwarnings("ignore:convert.*converted 0 of:UserWarning")
def test_a_whole_model_not_faster_at_all_is_the_source_again() -> None:
    calls: list = []
    net = _guard_net()
    convs = list(net)
    model, report = convert(net, "compconv", depth=1, input_size=(1, 3, 8, 8), hardware_aware=True,
                            timer=_guard_timer(2.0, calls), return_report=True)  # every layer costs 1+ ms
    assert not report.converted and all(model[i] is convs[i] for i in range(5))
    assert all("whole model" in r.reason for r in report.layers[1:])


def test_a_converted_model_faster_as_a_whole_keeps_every_layer() -> None:
    calls: list = []
    model, report = convert(_guard_net(), "compconv", depth=1, input_size=(1, 3, 8, 8), hardware_aware=True,
                            timer=_guard_timer(0.0, calls), return_report=True)
    assert [r.name for r in report.converted] == ["1", "2", "3", "4"] and len(calls) == 2


def test_a_layer_not_reached_at_input_size_is_never_reverted_by_the_whole_model_check() -> None:
    class TwoPaths(nn.Module):  # conv "b" is never called by forward
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.a = nn.Conv2d(16, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(self.stem(x))

    def timer(name: str, module: nn.Module, x: torch.Tensor) -> float:
        if name:
            return 0.5e-3 if isinstance(module, CompactConv2d) else 1e-3
        slow = any(isinstance(m, CompactConv2d) for n, m in module.named_children() if n == "a")
        return 2e-3 if slow else 1e-3  # the whole model is slower whenever "a" is compact

    model, report = convert(TwoPaths(), "compconv", depth=1, input_size=(1, 3, 8, 8), hardware_aware=True,
                            timer=timer, return_report=True)
    rows = {r.name: r for r in report.layers}
    assert rows["a"].action == "kept" and "whole model" in rows["a"].reason
    assert rows["b"].action == "converted" and "not reached" in rows["b"].reason
    assert isinstance(model.b, CompactConv2d) and type(model.a) is nn.Conv2d
