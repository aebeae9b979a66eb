"""compconv.deploy: eval-mode equivalence on every zoo model and method, the rewrites it promises, export."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import compconv
from compconv.deploy import DeployedCompConv2d, deploy, fold_bn_into_conv
from compconv.layers.compconv import CompConv2d, plan_compconv, prim_channels
from compconv.models import get_model, list_models

TOL = 1e-4


def _randomize_bn(model: nn.Module, seed: int = 0, zero_some: bool = False) -> nn.Module:
    """Non-trivial BN statistics (mild, so deep nets keep O(1) outputs); optionally some gamma = 0."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.2 * torch.rand(c, generator=g) - 0.1)
            m.running_var.copy_(0.8 + 0.8 * torch.rand(c, generator=g))
            with torch.no_grad():  # gamma < 1 keeps 100-layer nets' outputs O(1..100) at random init
                m.weight.copy_(0.4 + 0.5 * torch.rand(c, generator=g))
                if zero_some:
                    m.weight[::3] = 0.0  # identity channels cannot absorb a zero scale: test that path
                m.bias.copy_(0.2 * torch.rand(c, generator=g) - 0.1)
    return model


def _check(model: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    model.eval()
    with torch.no_grad():
        ref = model(x)
        dep = deploy(model, **kw)
        out = dep(x)
    scale = max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err < TOL * scale, f"max abs err {err} (output scale {scale})"
    assert not dep.training
    assert all(not p.requires_grad for p in dep.parameters())
    return dep


def _input_for(name: str) -> torch.Tensor:
    size = 32 if name.startswith(("cifar", "comp_vgg")) or "_cifar_" in name else 64
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


# -- every zoo model --------------------------------------------------------------------------------------
# Every zoo model, except the C0 sweep's repeats: comp{32,64,256,512}_* have the structure of comp128_* with
# other depths, which comp128_resnet50 (d = 1..3), comp_vgg16_d4 and the random configurations below cover.
ZOO = [n for n in list_models() if not re.match(r"comp(32|64|256|512)_", n)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_deploy_equivalence_every_zoo_model(name: str) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(get_model(name)).eval()
    x = _input_for(name)
    with torch.no_grad():
        scale = model(x).abs().max().item()
    if scale > 1e3:  # float32 cannot resolve 1e-4 of such outputs: check the rewrite's arithmetic in float64
        model, x = model.double(), x.double()
    dep = _check(model, x)
    assert not any(isinstance(m, CompConv2d) for m in dep.modules())
    # Every BN right after a conv is folded (the zoo's nets have no other kind).
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules()), name


# -- every method -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", compconv.list_methods())
def test_deploy_equivalence_every_method(method: str) -> None:
    torch.manual_seed(0)
    for base, size in (("cifar_resnet20", 16), ("cifar_vgg16", 32)):
        model = get_model(base, num_classes=10)
        try:
            model = compconv.convert(model, method)
        except ValueError as e:  # a method that converts nothing here (e.g. only depthwise convs)
            pytest.skip(f"{method} cannot convert {base}: {e}")
        _check(_randomize_bn(model, zero_some=True), torch.randn(2, 3, size, size))


@pytest.mark.parametrize("method", compconv.list_methods())
def test_deploy_each_method_module_followed_by_bn_and_conv(method: str) -> None:
    cls = compconv.get_method(method)
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=32 if method == "xsepconv" else 1)
    hp, _ = cls.resolve_hparams(conv)
    if cls.ineligible_reason(conv, **hp):
        conv = nn.Conv2d(32, 32, 3, padding=1)
        hp, _ = cls.resolve_hparams(conv)
    torch.manual_seed(0)
    mod = cls.from_conv(conv, **hp)
    model = nn.Sequential(
        mod, nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1), nn.BatchNorm2d(8)
    )
    _check(_randomize_bn(model, zero_some=True), torch.randn(2, 32, 9, 9))


# -- CompConv's rewrites ----------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(
    c_in=st.sampled_from([8, 16, 24, 48]),
    c_out=st.sampled_from([6, 16, 30, 64]),
    k=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    depth=st.integers(0, 3),
    identity=st.sampled_from(["fixed", "group", "random", "conv"]),
    shuffle=st.booleans(),
    bias=st.booleans(),
    multiple=st.sampled_from([1, 8]),
    tail_kind=st.sampled_from(["conv", "compconv", "residual"]),
)
def test_compconv_deploy_matches(
    c_in, c_out, k, stride, depth, identity, shuffle, bias, multiple, tail_kind
) -> None:
    try:
        comp = CompConv2d(
            c_in,
            c_out,
            k,
            stride,
            k // 2,
            bias=bias,
            depth=depth,
            identity=identity,
            shuffle=shuffle,
            width_multiple=multiple,
        )
    except ValueError:
        return  # an impossible plan (too narrow for this depth) is refused by the module itself
    torch.manual_seed(0)
    if tail_kind == "residual":  # the output feeds an add: the shuffle must stay, fused into the write
        model = nn.Sequential(comp, nn.BatchNorm2d(c_out))
    elif tail_kind == "conv":
        model = nn.Sequential(
            comp,
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(c_out, 5, 3, padding=1),
        )
    else:
        nxt = CompConv2d(c_out, 12, 3, 1, 1, depth=1 if c_out < 12 else 2, identity=identity)
        model = nn.Sequential(comp, nn.BatchNorm2d(c_out), nn.ReLU(), nxt)
    _randomize_bn(model, zero_some=True)
    with torch.no_grad():
        for m in model.modules():  # non-zero biases so that their folding is tested
            if isinstance(m, CompConv2d) and getattr(m, "bias", None) is not None:  # d=0 has no .bias
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, c_in, 7, 7)
    dep = _check(model, x)
    first = dep[0]
    assert isinstance(dep[1], nn.Identity)  # BN folded
    if depth == 0:
        assert type(first) is nn.Conv2d
        return
    assert isinstance(first, DeployedCompConv2d)
    if tail_kind != "residual":
        assert first._shuffle_g == 1  # the shuffle went into the consumer
    _check(model, x.contiguous(memory_format=torch.channels_last))


def test_deploy_writes_each_part_once_and_folds_the_shuffle() -> None:
    comp = CompConv2d(64, 64, 3, padding=1, depth=3)  # C_prim = 5: T_1, T_2, A_0, B_0
    model = nn.Sequential(comp, nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 4, 1))
    dep = deploy(_randomize_bn(model))
    d = dep[0]
    assert d._shuffle_g == 1 and len(d._pieces) == 4  # one contiguous write per part
    kept = deploy(_randomize_bn(nn.Sequential(comp, nn.BatchNorm2d(64))))[0]
    assert kept._shuffle_g == 4  # the output reaches the model's output: the shuffle stays...
    assert all(p.step == 4 for p in kept._pieces)  # ...as strided writes into the final slots
    with torch.profiler.profile() as prof, torch.no_grad():
        d(torch.randn(1, 64, 8, 8))
    names = [e.key for e in prof.key_averages()]
    assert "aten::native_batch_norm" not in names and "aten::index_select" not in names


def test_deploy_functional_path_under_autograd_matches() -> None:
    model = _randomize_bn(nn.Sequential(CompConv2d(32, 48, 3, padding=1, depth=2), nn.BatchNorm2d(48)))
    model.eval()
    dep = deploy(model)
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    out = dep(x)  # requires grad: the out= writes cannot be used, the functional form is
    with torch.no_grad():
        ref = model(x)
    assert (out - ref).abs().max().item() < TOL
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_deploy_works_with_grad_mode_on() -> None:
    # deploy rewrites weights in place: it must not need the caller to disable autograd.
    model = _randomize_bn(get_model("cifar_vgg16", method="compconv", num_classes=10)).eval()
    assert torch.is_grad_enabled()
    dep = deploy(model, collapse_1x1=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (dep(x) - model(x)).abs().max().item() < TOL


def test_deploy_bare_modules_and_vanilla() -> None:
    comp = CompConv2d(16, 16, 3, padding=1, depth=2).eval()
    x = torch.randn(1, 16, 5, 5)
    with torch.no_grad():
        assert (deploy(comp)(x) - comp(x)).abs().max() < TOL
    conv, bn = nn.Conv2d(4, 6, 3, bias=False), _randomize_bn(nn.Sequential(nn.BatchNorm2d(6)))[0].eval()
    with torch.no_grad():
        assert (fold_bn_into_conv(conv, bn)(x[:, :4]) - bn(conv(x[:, :4]))).abs().max() < TOL


def test_deploy_untraceable_model_falls_back_to_sequential_pairs() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                return self.body(x)
            return -self.body(x)

    model = _randomize_bn(Branchy())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dep = _check(model, torch.randn(2, 3, 8, 8))
    assert any("could not trace Branchy" in str(x.message) for x in w)  # names the model
    assert isinstance(dep.body[1], nn.Identity)


def test_deploy_errors() -> None:
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        deploy("resnet50")  # type: ignore[arg-type]
    bn = nn.BatchNorm2d(6, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        fold_bn_into_conv(nn.Conv2d(3, 6, 1), bn)
    with pytest.raises(ValueError, match="num_features"):
        fold_bn_into_conv(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(6))
    with pytest.raises(TypeError, match="CompConv2d"):
        DeployedCompConv2d.from_compconv(nn.Conv2d(3, 5, 1))  # type: ignore[arg-type]


# -- compilers and exporters ------------------------------------------------------------------------------
def _small_deployed() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _randomize_bn(
        get_model("cifar_resnet20", num_classes=10, method="compconv", method_options={"c0": 16})
    ).eval()
    return model, deploy(model), torch.randn(2, 3, 16, 16)


def test_torch_export_matches() -> None:
    model, dep, x = _small_deployed()
    ep = torch.export.export(dep, (x,))
    with torch.no_grad():
        assert (ep.module()(x) - model(x)).abs().max().item() < TOL


@pytest.mark.slow
def test_torch_compile_channels_last_matches() -> None:
    model, dep, x = _small_deployed()
    compiled = torch.compile(dep.to(memory_format=torch.channels_last))
    with torch.inference_mode():
        out = compiled(x.contiguous(memory_format=torch.channels_last))
        assert (out - model(x)).abs().max().item() < TOL


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, dep, x = _small_deployed()
    path = tmp_path / "m.onnx"
    torch.onnx.export(dep, (x,), dynamo=True).save(str(path))
    sess = ort.InferenceSession(str(path))
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert abs(out - model(x).numpy()).max() < TOL


# -- hardware-aware widths --------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    c_in=st.integers(8, 600),
    c_out=st.integers(4, 600),
    depth=st.integers(1, 3),
    multiple=st.sampled_from([2, 4, 8, 16]),
)
def test_width_multiple_keeps_c_out_and_rounds(c_in, c_out, depth, multiple) -> None:
    try:
        base = plan_compconv(c_in, c_out, depth)
    except ValueError:
        return
    plan = plan_compconv(c_in, c_out, depth, width_multiple=multiple)
    assert len(plan.sources) == c_out  # exactly C_out channels after the surplus is dropped
    m = plan.width_multiple
    assert m <= multiple and multiple % m == 0 and plan.c_prim % m == 0
    assert plan.c_prim >= base.c_prim and plan.c_prim - base.c_prim < m
    assert all(ci % m == 0 and co % m == 0 for ci, co in plan.conv_widths[1:])
    if m == 1:
        assert plan == base


def test_width_multiple_default_is_the_paper_and_cost_is_reported() -> None:
    # C_prim = ceil(512 / 14) = 37 (Eq. 5, d = 3); rounded up: 40 (x8), 48 (x16).
    assert plan_compconv(512, 512, 3).c_prim == prim_channels(512, 3) == 37
    assert plan_compconv(512, 512, 3, width_multiple=8).c_prim == 40
    assert plan_compconv(512, 512, 3, width_multiple=16).c_prim == 48
    a = CompConv2d(512, 512, 3, padding=1, depth=3)
    b = CompConv2d(512, 512, 3, padding=1, depth=3, width_multiple=16)
    x = torch.randn(1, 512, 4, 4)
    assert b(x).shape == a(x).shape == (1, 512, 4, 4)
    pa, pb = compconv.profile(a, (1, 512, 4, 4)), compconv.profile(b, (1, 512, 4, 4))
    assert pb.total_macs > pa.total_macs and pb.total_params > pa.total_params
    assert pb.total_macs == 16 * b.plan.macs_per_pixel(9)  # 4x4 output pixels
    with torch.utils.flop_counter.FlopCounterMode(display=False) as fc:
        b(x)
    assert fc.get_total_flops() == 2 * pb.total_macs
    assert "width_multiple=16" in repr(b)
    for bad in (0, -8, 2.0, True):
        with pytest.raises(ValueError, match="width_multiple"):
            CompConv2d(64, 64, 3, depth=1, width_multiple=bad)


def test_width_multiple_through_convert_and_deploy() -> None:
    model = get_model("cifar_resnet20", num_classes=10)
    conv = compconv.convert(model, "compconv", c0=16, width_multiple=8)
    comps = [m for m in conv.modules() if isinstance(m, CompConv2d) and m.plan is not None]
    assert comps and all(m.plan.c_prim % m.plan.width_multiple == 0 for m in comps)
    assert any(m.plan.width_multiple == 8 for m in comps)
    _check(_randomize_bn(conv), torch.randn(2, 3, 16, 16))


def test_shuffle_folded_through_residual_adds_and_into_the_classifier() -> None:
    # ResNet-50: conv3 and the downsample of every block write into the residual stream, which is read by
    # the next block's convs and finally by flatten -> fc. All of it takes the shuffled order, so no
    # deployed CompConv keeps a shuffle; VGG's last conv is read by flatten -> Linear.
    for name, size in (("comp128_resnet50", 64), ("comp128_cifar_vgg16", 32)):
        torch.manual_seed(0)
        model = _randomize_bn(get_model(name))
        dep = _check(model, torch.randn(1, 3, size, size))
        deployed = [m for m in dep.modules() if isinstance(m, DeployedCompConv2d)]
        assert deployed and all(m._shuffle_g == 1 for m in deployed), name
        assert all(len(m._pieces) == len(m._part_widths) for m in deployed)  # one write per part


def test_collapse_1x1_is_exact_and_leaves_no_pointwise_compconv() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(get_model("comp128_resnet50"))
    dep = _check(model, torch.randn(1, 3, 64, 64), collapse_1x1=True)
    deployed = [m for m in dep.modules() if isinstance(m, DeployedCompConv2d)]
    assert deployed and all(m.kernel_size != (1, 1) for m in deployed)
    # A bare 1x1 CompConv with stride 2 and the "group" identity: one dense conv, same function.
    comp = CompConv2d(64, 96, 1, stride=2, bias=True, depth=2, identity="group").eval()
    with torch.no_grad():
        comp.bias.uniform_(-1, 1)
        dense = deploy(comp, collapse_1x1=True)
        x = torch.randn(2, 64, 9, 9)
        assert type(dense) is nn.Conv2d and (dense(x) - comp(x)).abs().max().item() < TOL


@pytest.mark.parametrize("dense_wins", [None, True, False])
def test_collapse_1x1_auto_times_each_layer_and_stays_exact(dense_wins) -> None:
    # "auto" keeps, per 1x1 CompConv, whichever form is timed fastest on the example input; whatever it
    # picks, the outputs stay equal. dense_wins forces the timer's verdict (None: the real timer).
    from compconv.deploy import tune_pointwise

    timer = None
    if dense_wins is not None:

        def timer(cands):
            t = {"split": 2.0, "dense": 1.0} if dense_wins else {"split": 1.0, "dense": 2.0}
            return {n: t.get(n, 3.0) for n in cands}

    torch.manual_seed(0)
    model = _randomize_bn(get_model("cifar_resnet50", num_classes=10, method="compconv", method_options={"c0": 128}))
    x = torch.randn(2, 3, 16, 16)
    n_1x1 = sum(isinstance(m, CompConv2d) and m.kernel_size == (1, 1) and m.plan is not None for m in model.modules())
    dep = _check(model, x, collapse_1x1="auto", example_input=x, timer=timer)
    left = [m for m in dep.modules() if isinstance(m, DeployedCompConv2d) and m.kernel_size == (1, 1)]
    if dense_wins is True:
        assert not left
    elif dense_wins is False:
        assert len(left) == n_1x1
    if dense_wins is None:  # tuning an already deployed model reports every 1x1 CompConv once, timed
        rows = tune_pointwise(deploy(model), x, repeats=1)
        assert len(rows) == n_1x1 and all(r["split_ms"] > 0 and r["dense_ms"] > 0 for r in rows)
    with pytest.raises(ValueError, match="example_input"):
        deploy(model, collapse_1x1="auto")
    with pytest.raises(ValueError, match="collapse_1x1 must be one of"):
        deploy(model, collapse_1x1="yes")


def test_collapse_1x1_accepts_only_the_bools_and_the_two_names() -> None:
    """``1`` and ``1.0`` equal ``True`` but are not it: they used to pass the check and collapse nothing."""
    model = _small_deployed()[0]
    for bad in (1, 1.0, 0, "True", None):
        with pytest.raises(ValueError, match=re.escape(
                f"collapse_1x1 must be one of True, False, 'lowrank', 'auto', but got {bad!r}")):
            deploy(model, collapse_1x1=bad)  # type: ignore[arg-type]


def test_a_bad_example_input_names_its_shape_and_dtype_and_what_the_model_expects() -> None:
    model, _, x = _small_deployed()
    for check in (True, False):
        with pytest.raises(ValueError, match=r"example_input \(shape \(2, 4, 16, 16\), dtype float32, device cpu\) "
                                             r"does not run through CifarResNet \(RuntimeError: .*\); the model "
                                             r"expects a batch \(N, 3, H, W\) of dtype float32 on cpu"):
            deploy(model, example_input=torch.randn(2, 4, 16, 16), check=check)
        with pytest.raises(ValueError, match=r"example_input \(shape \(3, 16, 16\), .*expects a batch \(N, 3, H, W\)"):
            deploy(model, example_input=torch.randn(3, 16, 16), check=check)
        for dtype in (torch.int64, torch.float64):
            with pytest.raises(TypeError, match=rf"example_input \(shape \(2, 3, 16, 16\), dtype "
                                                rf"{str(dtype)[6:]}, .*of dtype float32 on cpu"):
                deploy(model, example_input=x.to(dtype), check=check)
    with pytest.raises(TypeError, match="example_input must be a Tensor or a tuple of the model's positional "
                                        "arguments, but got ndarray"):
        deploy(model, example_input=x.numpy())  # type: ignore[arg-type]
