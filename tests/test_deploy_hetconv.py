"""deploy's HetConv forms: the dense conv a HetConv layer equals, and the per-layer choice (collapse_hetconv)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import compconv
from compconv.deploy import collapse_hetconv, deploy, tune_hetconv
from compconv.layers.hetconv import HetConv2d, hetconv_macs

TOL = 1e-4


def _het(m: int, n: int, k: int = 3, *, part: int = 4, impl: str = "exact", seed: int = 0, **kw) -> HetConv2d:
    torch.manual_seed(seed)
    het = HetConv2d(m, n, k, part=part, impl=impl, **kw).eval()  # type: ignore[arg-type]
    if het.bias is not None:
        with torch.no_grad():
            het.bias.uniform_(-1, 1)
    return het


def _model(seed: int = 0) -> nn.Module:
    """A small CIFAR ResNet with its 3x3 convs as HetConv (P = 4) and BNs with non-trivial statistics."""
    torch.manual_seed(seed)
    model = compconv.get_model("cifar_resnet20", num_classes=10, method="hetconv", method_options={"part": 4})
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


def _hetconvs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, HetConv2d)]


@pytest.mark.parametrize("impl", ["exact", "masked", "dense"])
@pytest.mark.parametrize(
    "geometry",
    [dict(stride=1, padding=1), dict(stride=2, padding=1, bias=True), dict(stride=1, padding=2, dilation=2),
     dict(stride=1, padding=1, padding_mode="reflect", bias=True), dict(stride=2, padding="valid"),
     dict(stride=1, padding="same", padding_mode="circular")],
)
def test_collapse_equals_the_layer(impl, geometry) -> None:
    het = _het(8, 12, part=4, impl=impl, **geometry)
    conv = collapse_hetconv(het)
    assert type(conv) is nn.Conv2d and conv.kernel_size == het.kernel_size
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), het(x), rtol=TOL, atol=TOL)
    # the dense conv executes the dense layer's MACs: Ho Wo N M K^2
    with FlopCounterMode(display=False) as fc:
        y = conv(x)
    assert fc.get_total_flops() // 2 == y.shape[0] * y.shape[2] * y.shape[3] * 12 * 8 * 9


@settings(max_examples=25, deadline=None)
@given(
    m_over=st.integers(1, 3), n_over=st.integers(1, 3), part=st.sampled_from([1, 2, 4]),
    k=st.sampled_from([3, 5]), stride=st.integers(1, 2), bias=st.booleans(), size=st.integers(3, 8),
)
def test_collapse_property(m_over, n_over, part, k, stride, bias, size) -> None:
    het = _het(part * m_over, part * n_over, k, part=part, stride=stride, padding=k // 2, bias=bias)
    x = torch.randn(1, het.in_channels, size, size)
    with torch.no_grad():
        torch.testing.assert_close(collapse_hetconv(het)(x), het(x), rtol=TOL, atol=TOL)


def test_deploy_collapse_true_folds_the_bn_into_the_dense_conv() -> None:
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    names = _hetconvs(model)
    dep, rep = deploy(model, collapse_hetconv=True, example_input=x, return_report=True)
    assert names and rep.collapsed_hetconv == names
    assert not _hetconvs(dep) and all(isinstance(dep.get_submodule(n), nn.Conv2d) for n in names)
    # every converted layer is followed by a BN in a ResNet block: each folds into its dense conv now
    assert {c for c, _ in rep.folded_bn} >= set(names)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules())
    with torch.no_grad():
        torch.testing.assert_close(dep(x), model(x), rtol=TOL, atol=TOL)
    assert f"{len(names)} HetConv collapsed to dense convs" in str(rep)
    # without the option the layers stay HetConv (and their BNs stay: nothing to fold them into)
    assert _hetconvs(deploy(model)) == names


@pytest.mark.parametrize("fastest", ["hetconv", "dense"])
def test_auto_keeps_the_form_the_timer_says_is_faster(fastest) -> None:
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    calls = []

    def stub(cands):  # noqa: ANN001, ANN202 - `fastest` 1 s, the other 2 s (nothing is run)
        calls.append(sorted(cands))
        return {f: 1.0 if f == fastest else 2.0 for f in cands}

    names = _hetconvs(model)
    dep, rep = deploy(model, collapse_hetconv="auto", example_input=x, timer=stub, return_report=True)
    rows = rep.hetconv_forms
    assert [r["name"] for r in rows] == names and calls == [["dense", "hetconv"]] * len(names)
    kind = HetConv2d if fastest == "hetconv" else nn.Conv2d
    for r in rows:
        assert r["form"] == fastest and isinstance(dep.get_submodule(r["name"]), kind)
        assert r["times_ms"] == {f: 1e3 if f == fastest else 2e3 for f in ("hetconv", "dense")}
        het = model.get_submodule(r["name"])
        n_, _, h, w = r["input_shape"]
        s = het.stride[0]
        pixels = n_ * ((h + 2 - 3) // s + 1) * ((w + 2 - 3) // s + 1)
        # hetconv: Eq. 4's MACs; dense: the dense layer's (counted by FlopCounterMode, checked by hand here)
        assert r["macs"]["hetconv"] == hetconv_macs(het.in_channels, het.out_channels, (3, 3), 4, pixels)
        assert r["macs"]["dense"] == pixels * het.out_channels * het.in_channels * 9
    assert rep.collapsed_hetconv == (names if fastest == "dense" else [])
    assert f"kept {fastest}" in str(rep)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), model(x), rtol=TOL, atol=TOL)


def test_auto_times_in_the_input_memory_format_and_skips_failed_forms() -> None:
    model = _model()
    x = torch.randn(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    formats = []

    def stub(cands):  # noqa: ANN001, ANN202 - the dense form "fails" (NaN): the HetConv is kept
        dense, inp = cands["dense"].__defaults__  # the form is built in the memory format of its input
        cl = torch.channels_last
        formats.append((inp.is_contiguous(memory_format=cl), dense.weight.is_contiguous(memory_format=cl)))
        return {"hetconv": 2.0, "dense": float("nan")}

    rows = tune_hetconv(model, (x,), timer=stub)
    assert rows and all(r["form"] == "hetconv" for r in rows)
    assert formats[0] == (True, True) and all(a == b for a, b in formats)
    assert _hetconvs(model) and model.training is False


def test_bare_layer_hooks_and_bad_arguments() -> None:
    het = _het(8, 8, part=2, padding=1, bias=True)
    x = torch.randn(2, 8, 6, 6)
    dep, rep = deploy(het, collapse_hetconv=True, return_report=True)
    assert type(dep) is nn.Conv2d and rep.collapsed_hetconv == [""]
    with torch.no_grad():
        torch.testing.assert_close(dep(x), het(x), rtol=TOL, atol=TOL)
    # a layer with a user's hook keeps being that module (the hook must keep seeing it)
    model = _model()
    first = _hetconvs(model)[0]
    model.get_submodule(first).register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match=rf"collapse_hetconv=True left 1 HetConv2d as they are: {first}: has hooks"):
        dep, rep = deploy(model, collapse_hetconv=True, return_report=True)
    assert isinstance(dep.get_submodule(first), HetConv2d) and len(_hetconvs(dep)) == 1
    assert list(rep.kept_hetconv) == [first] and f"kept HetConv {first}: has hooks" in str(rep)
    for bad in ("dense", 1, "yes"):
        with pytest.raises(ValueError, match=r"collapse_hetconv must be one of True, False, 'auto', but got"):
            deploy(model, collapse_hetconv=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"collapse_hetconv='auto' needs example_input"):
        deploy(model, collapse_hetconv="auto")
    with pytest.raises(TypeError, match="collapse_hetconv takes a HetConv2d, but got Conv2d"):
        collapse_hetconv(nn.Conv2d(3, 3, 3))  # type: ignore[arg-type]
    name = _hetconvs(_model())[0]
    with pytest.raises(ValueError, match=rf"timer returned -1\.0 for form 'dense' of HetConv layer '{name}'"):
        tune_hetconv(_model(), torch.randn(1, 3, 8, 8), timer=lambda c: {"hetconv": 1.0, "dense": -1.0})


def test_bench_hetconv_treatments_keep_outputs() -> None:
    from compconv.bench.suites import prepare_model

    model = _model()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        for t in ("deploy_densehet", "deploy_densehet_cl", "deploy_autohet_cl", "deploy_auto1x1_autohet"):
            m, fmt = prepare_model(model, t, num_classes=10, example_input=x)
            torch.testing.assert_close(m(x.contiguous(memory_format=fmt)), ref, rtol=TOL, atol=TOL)
            assert fmt is (torch.channels_last if "_cl" in t else torch.contiguous_format)
            if "densehet" in t:
                assert not _hetconvs(m)
    with pytest.raises(ValueError, match="example_input"):
        prepare_model(model, "deploy_autohet", num_classes=10)
    for bad in ("densehet", "deploy_densehet_autohet", "deploy_cl_densehet"):
        with pytest.raises(ValueError, match="treatment must be one of"):
            prepare_model(model, bad, num_classes=10, example_input=x)


def test_the_evidence_latency_tries_the_dense_forms_on_hetconv_models_only() -> None:
    from test_benchmark_scripts import _load

    mod = _load("compress_evidence")
    assert mod.treatments_for(_model()) == mod.LATENCY_TREATMENTS + mod.HETCONV_TREATMENTS
    assert mod.treatments_for(compconv.get_model("cifar_resnet20", num_classes=10)) == mod.LATENCY_TREATMENTS
    assert all("het" in t for t in mod.HETCONV_TREATMENTS)


def test_auto_times_each_layer_on_the_input_it_gets_after_the_earlier_decisions() -> None:
    # An exact HetConv returns NCHW even for a channels_last input; its dense conv keeps channels_last. Once
    # the first layer is collapsed, the second sees channels_last: it must be timed on that.
    cl = torch.channels_last
    torch.manual_seed(0)
    m = nn.Sequential(HetConv2d(8, 8, 3, padding=1, part=4), nn.ReLU(), HetConv2d(8, 8, 3, padding=1, part=4))
    m = m.eval().to(memory_format=cl)
    x = torch.randn(2, 8, 8, 8).contiguous(memory_format=cl)
    timed = []

    def stub(cands):  # noqa: ANN001, ANN202 - dense is the faster
        timed.append(cands["hetconv"].__defaults__[1].is_contiguous(memory_format=cl))
        return {"hetconv": 2.0, "dense": 1.0}

    with torch.no_grad():
        ref = m(x)
        dep, rep = deploy(m, collapse_hetconv="auto", example_input=x, timer=stub, return_report=True)
        seen = []
        dep[2].register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous(memory_format=cl)))
        torch.testing.assert_close(dep(x), ref, rtol=TOL, atol=TOL)
    assert [r["name"] for r in rep.hetconv_forms] == ["0", "2"] and timed == [True, True] == seen + [True]


class _KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = HetConv2d(8, 8, 3, padding=1, part=4)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.h(x=x))


@pytest.mark.parametrize("how", [True, "auto"])
def test_a_layer_called_by_keyword_stays_with_the_reason(how) -> None:
    model = _KeywordCall().eval()
    x = torch.randn(2, 8, 8, 8)
    with pytest.warns(UserWarning, match=r"left 1 HetConv2d as they are: h: called with keyword arguments"):
        dep, rep = deploy(model, collapse_hetconv=how, example_input=x, return_report=True,
                          timer=lambda c: {f: 1.0 for f in c})
    assert isinstance(dep.h, HetConv2d) and rep.hetconv_forms == [] and "h" in rep.kept_hetconv
    with torch.no_grad():
        torch.testing.assert_close(dep(x), model(x), rtol=TOL, atol=TOL)


def test_a_bn_after_a_grouped_hetconv_is_kept_with_a_reason_that_says_how_to_fold_it() -> None:
    model = _model()
    _, rep = deploy(model, return_report=True)
    after = {n: why for n, why in rep.kept_bn.items() if "HetConv2d" in why}
    assert len(after) == len(_hetconvs(model)) > 0
    assert set(after.values()) == {"after a HetConv2d in its grouped form (deploy(..., collapse_hetconv=True) "
                                   "makes it a dense conv, which folds it)"}
