"""deploy's fast exact forms of 1x1 CompConvs: the two-GEMM LowRankPointwise, and the per-layer choice."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import compconv
from compconv.deploy import DeployedCompConv2d, LowRankPointwise, deploy, tune_pointwise
from compconv.layers.compconv import CompConv2d

TOL = 1e-4


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c).eval()
    bn.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
    bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(c, generator=g))
        bn.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return bn


def _layer(c_in: int, c_out: int, depth: int, identity: str, *, bias: bool, bn: bool, shuffle: bool,
           stride: int = 1, width_multiple: int = 1, seed: int = 0) -> tuple[nn.Module, DeployedCompConv2d]:
    torch.manual_seed(seed)
    comp = CompConv2d(c_in, c_out, 1, stride=stride, bias=bias, depth=depth, identity=identity,  # type: ignore[arg-type]
                      shuffle=shuffle, width_multiple=width_multiple).eval()
    with torch.no_grad():
        if comp.bias is not None:
            comp.bias.uniform_(-1, 1)
        if comp.tail is not None:
            comp.tail.weight.uniform_(-1, 1)
    norm = _bn(c_out, seed) if bn else None
    ref = nn.Sequential(comp, norm).eval() if norm is not None else comp
    return ref, DeployedCompConv2d.from_compconv(comp, norm)  # type: ignore[return-value]


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = (a - b).abs().max().item()
    assert err < TOL * max(1.0, b.abs().max().item()), err


@pytest.mark.parametrize("depth,identity", [(1, "fixed"), (2, "fixed"), (2, "group"), (2, "random"), (2, "conv"),
                                            (3, "fixed"), (3, "group"), (3, "random"), (3, "conv")])
@pytest.mark.parametrize("bias,bn,shuffle", [(True, True, True), (False, False, False), (True, False, True)])
def test_lowrank_equals_the_module_it_replaces(depth, identity, bias, bn, shuffle) -> None:
    ref, dep = _layer(48, 56, depth, identity, bias=bias, bn=bn, shuffle=shuffle)
    low = LowRankPointwise.from_deployed(dep)
    assert low is not None
    for stride in (1, 2):  # stride: a new layer (the stride belongs to W_1)
        if stride == 2:
            ref, dep = _layer(48, 56, depth, identity, bias=bias, bn=bn, shuffle=shuffle, stride=2)
            low = LowRankPointwise.from_deployed(dep)
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 48, 7, 7).contiguous(memory_format=fmt)
            with torch.no_grad():
                out = low(x)
                _assert_close(out, ref(x))
            assert out.is_contiguous(memory_format=fmt)
    # The autograd path (functional, no in-place accumulation) computes the same.
    x = torch.randn(1, 48, 5, 5, requires_grad=True)
    _assert_close(low(x).detach(), ref(x).detach())


@settings(max_examples=15, deadline=None)
@given(c_in=st.integers(4, 40), c_out=st.integers(2, 40), depth=st.integers(1, 3),
       identity=st.sampled_from(["fixed", "group", "random", "conv"]), wm=st.sampled_from([1, 4, 8]),
       shuffle=st.booleans(), bn=st.booleans())
def test_lowrank_property_over_small_widths(c_in, c_out, depth, identity, wm, shuffle, bn) -> None:
    try:
        ref, dep = _layer(c_in, c_out, depth, identity, bias=True, bn=bn, shuffle=shuffle, width_multiple=wm)
    except ValueError:  # a width this depth cannot produce: CompConv2d refuses it (tested elsewhere)
        return
    low = LowRankPointwise.from_deployed(dep)
    x = torch.randn(2, c_in, 4, 3)
    with torch.no_grad():
        _assert_close(low(x), ref(x))
        _assert_close(low(x.contiguous(memory_format=torch.channels_last)), ref(x))


def test_lowrank_macs_hand_count_flop_counter_and_profile() -> None:
    # C_in=48, C_out=56, d=3, "fixed": C_prim = ceil(56 / (2 (2^3 - 1))) = 4, no surplus (2*4*7 = 56).
    # GEMM 1 computes W_1's r = 4 channels; the identity slices read x[:, 0:4] and x[:, 0:8], so GEMM 2
    # reads z (4) and x[:, 0:8] (8): per pixel 4*48 + 56*(4 + 8) = 192 + 672 = 864 MACs
    # (the other form, identity rows in GEMM 1: (4 + 8)(48 + 56) = 1248, more). On (2, 48, 7, 7):
    # 2*49*864 = 84672 MACs; the dense 1x1 conv executes 2*49*48*56 = 263424.
    _, dep = _layer(48, 56, 3, "fixed", bias=True, bn=True, shuffle=True)
    low = LowRankPointwise.from_deployed(dep)
    assert (low.rank, low.lo, low.hi) == (4, 0, 8)
    x = torch.randn(2, 48, 7, 7)
    with torch.no_grad():
        y = low(x)
    assert low.count_macs((x,), y) == 2 * 49 * 864 == 84672
    for fmt in (torch.contiguous_format, torch.channels_last):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            low(x.contiguous(memory_format=fmt))
        assert counter.get_total_flops() // 2 == 84672, fmt
    prof = compconv.profile(nn.Sequential(low), x)
    assert prof.total_macs == 84672 and prof.uncounted_macs == 0
    assert prof.total_macs < 263424 / 3


def test_lowrank_folds_a_spread_identity_into_gemm1() -> None:
    # "group", d=2, C_in=48, C_out=56: C_prim = ceil(56/6) = 10; the identity reads channels
    # j*48//10 = 0, 4, ..., 43 (span 44). Reading x[0:44] in GEMM 2 costs 10*48 + 56*(10 + 44) = 3504
    # per pixel; selecting those 10 channels as rows of GEMM 1 costs (10 + 10)(48 + 56) = 2080: chosen.
    _, dep = _layer(48, 56, 2, "group", bias=False, bn=False, shuffle=True)
    low = LowRankPointwise.from_deployed(dep)
    assert (low.rank, low.hi - low.lo) == (20, 0)
    x = torch.randn(1, 48, 3, 3)
    with torch.no_grad():
        assert low.count_macs((x,), low(x)) == 9 * 2080


def test_lowrank_refuses_kxk() -> None:
    comp = CompConv2d(16, 16, 3, padding=1, depth=1).eval()
    assert LowRankPointwise.from_deployed(DeployedCompConv2d.from_compconv(comp)) is None


def _model() -> nn.Module:
    """A small net with 1x1 CompConvs of depth 1, 2, 3 (BN after each, shuffles to fold), a 3x3 one, a head."""
    torch.manual_seed(0)

    def block(c_in: int, c_out: int, k: int = 1, **kw) -> list[nn.Module]:
        return [CompConv2d(c_in, c_out, k, padding=k // 2, bias=False, **kw), _bn(c_out, c_out), nn.ReLU()]

    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        *block(32, 64, depth=1), *block(64, 96, depth=2), *block(96, 64, depth=3, stride=2),
        *block(64, 64, 3, depth=2), *block(64, 48, depth=2, identity="group"),
        nn.Conv2d(48, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return model.eval()


def _n_pointwise(model: nn.Module) -> int:
    return sum(isinstance(m, CompConv2d) and m.kernel_size == (1, 1) and m.plan is not None for m in model.modules())


def test_deploy_lowrank_is_exact_on_a_model() -> None:
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    dep, rep = deploy(model, collapse_1x1="lowrank", example_input=x, return_report=True)  # check=True
    lows = [m for m in dep.modules() if isinstance(m, LowRankPointwise)]
    assert len(lows) == len(rep.lowrank_1x1) == _n_pointwise(model) > 0
    assert not any(isinstance(m, DeployedCompConv2d) and m.kernel_size == (1, 1) for m in dep.modules())
    with torch.no_grad():
        _assert_close(dep(x), model(x))
        _assert_close(dep(x.contiguous(memory_format=torch.channels_last)), model(x))


@pytest.mark.parametrize("fastest", ["split", "dense", "lowrank"])
def test_auto_keeps_the_form_the_timer_says_is_fastest(fastest) -> None:
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    calls = []

    def stub(cands):  # the stub's verdict: `fastest` 1 s, "split" 2 s, the others 3 s (nothing is run)
        calls.append(sorted(cands))
        return {f: 1.0 if f == fastest else 2.0 if f == "split" else 3.0 for f in cands}

    dep, rep = deploy(model, collapse_1x1="auto", example_input=x, timer=stub, return_report=True)
    n = _n_pointwise(model)
    rows = rep.pointwise_forms
    assert len(calls) == len(rows) == n
    kinds = {"split": DeployedCompConv2d, "dense": nn.Conv2d, "lowrank": LowRankPointwise}
    for r, timed in zip(rows, calls, strict=True):
        assert sorted(r["times_ms"]) == timed and {"split", "dense"} <= set(timed)
        # "lowrank" is offered exactly where it executes fewer MACs than the dense conv
        assert ("lowrank" in timed) == ("lowrank" in r["macs"] and r["macs"]["lowrank"] < r["macs"]["dense"])
        assert r["macs"]["split"] < r["macs"]["dense"]
        assert r["times_ms"]["split"] == (1e3 if fastest == "split" else 2e3)
        expect = fastest if fastest in timed else "split"
        assert r["form"] == expect and isinstance(dep.get_submodule(r["name"]), kinds[expect])
    assert any("lowrank" in t for t in calls)  # the d >= 2 layers
    assert rep.collapsed_1x1 == [r["name"] for r in rows if r["form"] == "dense"]
    assert rep.lowrank_1x1 == [r["name"] for r in rows if r["form"] == "lowrank"]
    assert f"kept {fastest}" in str(rep)
    with torch.no_grad():
        _assert_close(dep(x), model(x))


def test_auto_skips_a_form_that_failed_and_rejects_bad_arguments() -> None:
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    rows = tune_pointwise(deploy(model), x, timer=lambda c: {f: (float("nan") if f == "lowrank" else
                                                                 {"split": 2.0, "dense": 3.0}[f]) for f in c})
    assert rows and all(r["form"] == "split" for r in rows)
    with pytest.raises(ValueError, match="forms must be a subset"):
        tune_pointwise(deploy(model), x, forms=("dense",))
    with pytest.raises(TypeError, match="timer must be callable"):
        deploy(model, collapse_1x1="auto", example_input=x, timer="fast")  # type: ignore[arg-type]


def test_bench_lowrank1x1_treatment_keeps_outputs() -> None:
    from compconv.bench.suites import prepare_model

    model = _model()
    x = torch.randn(2, 3, 16, 16)
    m, fmt = prepare_model(model, "deploy_lowrank1x1_cl", num_classes=10)
    assert fmt is torch.channels_last
    assert sum(isinstance(t, LowRankPointwise) for t in m.modules()) == _n_pointwise(model)
    with torch.no_grad():
        _assert_close(m(x.contiguous(memory_format=fmt)), model(x))


def test_bare_module_and_traced_forms() -> None:
    # A bare 1x1 CompConv deploys straight to LowRankPointwise; a 3x3 one has no such form and stays split.
    ref, _ = _layer(32, 40, 3, "fixed", bias=True, bn=False, shuffle=True)
    low = deploy(ref, collapse_1x1="lowrank")
    assert isinstance(low, LowRankPointwise) and low.hi > low.lo  # the identity columns path is exercised
    k3 = CompConv2d(16, 16, 3, padding=1, depth=2).eval()
    assert isinstance(deploy(k3, collapse_1x1="lowrank"), DeployedCompConv2d)
    # Tracers get the functional form (no out= accumulation): a torch.fx trace computes the same.
    x = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        want = ref(x)
        _assert_close(torch.fx.symbolic_trace(low)(x), want)


def test_auto_takes_the_tuple_or_list_example_input_deploy_documents() -> None:
    model = _model()
    x = torch.randn(2, 3, 16, 16)

    def stub(cands):  # noqa: ANN001, ANN202 - "dense" is the fastest
        return {f: 1.0 if f == "dense" else 2.0 for f in cands}

    for example in ((x,), [x]):
        dep, rep = deploy(model, collapse_1x1="auto", example_input=example, timer=stub, return_report=True)
        assert len(rep.pointwise_forms) == _n_pointwise(model) > 0
        assert {r["form"] for r in rep.pointwise_forms} == {"dense"}
        assert rep.example_input_shapes == [(2, 3, 16, 16)]
        with torch.no_grad():
            _assert_close(dep(x), model(x))
    assert len(tune_pointwise(deploy(model), (x,), timer=stub)) == _n_pointwise(model)
    with pytest.raises(TypeError, match="example_input must be a Tensor .* or a tuple of the model's positional "
                                        "arguments holding one, but got tuple"):
        tune_pointwise(deploy(model), ("x",), timer=stub)


def test_auto_refuses_a_timer_that_does_not_answer_seconds_naming_the_layer() -> None:
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    first = next(n for n, m in model.named_modules() if isinstance(m, CompConv2d) and m.kernel_size == (1, 1))
    for answer, err, message in (
        ({"split": 1.0, "dense": -1.0, "lowrank": 1.0}, ValueError,
         rf"timer returned -1\.0 for form 'dense' of 1x1 layer '{first}': it must return seconds per call \(a "
         rf"finite number >= 0, or NaN for a form that failed\)"),
        ({"split": "fast", "dense": 1.0, "lowrank": 1.0}, ValueError, "timer returned 'fast' for form 'split'"),
        ({"split": 1.0, "dense": float("inf"), "lowrank": 1.0}, ValueError, "timer returned inf for form 'dense'"),
        ([1.0], TypeError, rf"timer returned list for 1x1 layer '{first}': it must return \{{form: seconds per "
                           rf"call\}} for the forms it was given"),
    ):
        with pytest.raises(err, match=message):
            deploy(model, collapse_1x1="auto", example_input=x, timer=lambda c, a=answer: a)
