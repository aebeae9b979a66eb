"""The nn.Conv2d contract, for every registered method: where nn.Conv2d works, the compact conv works too.

Higher-order autograd and torch.func transforms, padding modes on small maps, unbatched and wrong inputs,
``.weight`` / ``reset_parameters`` for code written for nn.Conv2d, argument errors, top-level exports.
Parametrised over ``compconv.list_methods()``, so a new method enrols itself.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

import compconv
from compconv import get_method, list_methods

METHODS = list_methods()
MODES = ("zeros", "reflect", "replicate", "circular")
# Options that make the small test modules exercise each method's full structure.
OPTIONS: dict[str, dict[str, Any]] = {"compconv": {"depth": 2}, "xsepconv": {"downsample_min_k": 3}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _host(method: str, c_in: int = 4, c_out: int = 8, **geo: Any) -> nn.Conv2d:
    """A host conv the method accepts: dense, or depthwise for methods that only replace depthwise convs."""
    geo = {"kernel_size": 3, "padding": 1, **geo}
    cls, opts = get_method(method), OPTIONS.get(method, {})
    host = nn.Conv2d(c_in, c_out, **geo)
    if cls.ineligible_reason(host, **opts) is not None:
        host = nn.Conv2d(c_in, c_in, groups=c_in, **geo)
    assert cls.ineligible_reason(host, **opts) is None, (method, host)
    return host


def _make(method: str, host: nn.Conv2d | None = None, **opts: Any) -> nn.Module:
    host = _host(method) if host is None else host
    cls = get_method(method)
    hp, _ = cls.resolve_hparams(host, **{**OPTIONS.get(method, {}), **opts})
    return cls.from_conv(host, **hp)


# -- 1. higher-order autograd and torch.func ---------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_gradient_penalty_double_backward(method: str) -> None:
    """R1-style penalty: grad of the output w.r.t. the input with create_graph, then backward of its norm."""
    torch.manual_seed(0)
    m = _make(method).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)  # the issue's example
    g.norm().backward()
    # A nonlinear loss makes the incoming gradient depend on the output: the second derivative then flows
    # through every op's backward (a once_differentiable one raised here).
    m.zero_grad()
    (g,) = torch.autograd.grad((m(x) ** 2).sum(), x, create_graph=True)
    (g**2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_and_gradgradcheck_in_float64(method: str) -> None:
    torch.manual_seed(0)
    m = _make(method).double()
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in m.named_parameters())
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, *params), fast_mode=True)


@pytest.mark.parametrize("method", METHODS)
def test_per_sample_gradients_with_vmap_grad_equal_a_loop(method: str) -> None:
    torch.manual_seed(0)
    m = _make(method).double().eval()  # per-sample gradients: BN with its running statistics
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return (functional_call(m, p, (xi.unsqueeze(0),)) ** 2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        ref = torch.autograd.grad((m(x[i : i + 1]) ** 2).sum(), list(m.parameters()))
        for (name, _), r in zip(m.named_parameters(), ref, strict=True):
            torch.testing.assert_close(per_sample[name][i], r, msg=f"{method}: {name}, sample {i}")


# -- 2. padding modes on small maps --------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
def test_the_issues_reflect_example_gives_the_hosts_1x1(method: str, mode: str) -> None:
    """Host Conv2d(4, 4, 3, padding=0, reflect) on a 3x3 input gives 1x1; so must the replacement."""
    host = nn.Conv2d(4, 4, 3, padding=0, padding_mode=mode)
    cls = get_method(method)
    if cls.ineligible_reason(host, **OPTIONS.get(method, {})) is not None:
        # depthwise-only methods: the same situation at stride 2 (XSepConv-B pads the 1x1 output)
        host = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, padding_mode=mode)
        opts = {"variant": "b"} if method == "xsepconv" else {}
        x = torch.randn(2, 4, 2, 2)
    else:
        opts, x = {}, torch.randn(2, 4, 3, 3)
    depths = [1, 2] if method == "compconv" else [None]
    for depth in depths:
        m = _make(method, host, **opts, **({"depth": depth} if depth else {})).eval()
        assert host(x).shape == (2, 4, 1, 1)
        assert m(x).shape == (2, 4, 1, 1), (method, mode, depth)


def _draw_host(method: str, data: st.DataObject) -> nn.Conv2d:
    mode = data.draw(st.sampled_from(MODES), label="padding_mode")
    if method == "xsepconv":  # depthwise, odd k, padding k // 2 (the method's domain)
        k = data.draw(st.sampled_from([3, 5, 7]), label="k")
        return nn.Conv2d(4, 4, k, stride=data.draw(st.sampled_from([1, 2])), padding=k // 2, groups=4,
                         padding_mode=mode)
    k = data.draw(st.sampled_from([1, 2, 3, 5]), label="k")
    stride = data.draw(st.sampled_from([1, 2]), label="stride")
    padding = data.draw(st.sampled_from([0, 1, 2] + (["same"] if stride == 1 else [])), label="padding")
    dilation = data.draw(st.sampled_from([1, 2]), label="dilation")
    c_in, c_out = data.draw(st.sampled_from([4, 8])), data.draw(st.sampled_from([4, 8]))
    return nn.Conv2d(c_in, c_out, k, stride, padding, dilation, padding_mode=mode)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_output_shape_equals_the_hosts_for_every_padding_mode_and_small_input(method: str, data: Any) -> None:
    torch.manual_seed(0)
    host = _draw_host(method, data)
    cls = get_method(method)
    opts: dict[str, Any] = dict(OPTIONS.get(method, {}))
    if method == "compconv":
        opts["depth"] = data.draw(st.integers(1, 3), label="depth")
    if method == "xsepconv":
        opts["variant"] = data.draw(st.sampled_from(["standard", "no2x2", "b", "p"]), label="variant")
    hp, _ = cls.resolve_hparams(host, **opts)
    assume(cls.ineligible_reason(host, **hp) is None)
    h, w = data.draw(st.integers(1, 7), label="h"), data.draw(st.integers(1, 7), label="w")
    x = torch.randn(2, host.in_channels, h, w)
    try:
        ref = host(x)
    except RuntimeError:  # the host itself cannot run here (map smaller than its pad or kernel)
        assume(False)
    m = cls.from_conv(host, **hp).eval()
    assert m(x).shape == ref.shape
    assert m(x[0]).shape == host(x[0]).shape  # unbatched too


# -- 3. input checks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_unbatched_input_works_as_in_conv2d(method: str) -> None:
    torch.manual_seed(0)
    host = _host(method)
    m = _make(method, host).eval()
    x = torch.randn(4, 6, 6)
    y = m(x)
    assert y.shape == host(x).shape == (host.out_channels, 6, 6)
    torch.testing.assert_close(y, m(x.unsqueeze(0))[0])


@pytest.mark.parametrize("method", METHODS)
def test_wrong_channel_count_names_in_channels(method: str) -> None:
    m = _make(method)
    with pytest.raises(ValueError, match=r"expected in_channels=4 input channels.*\(2, 3, 8, 8\)"):
        m(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expected in_channels=4 input channels"):
        m(torch.randn(3, 8, 8))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(8, 8), (1, 2, 4, 8, 8)])
def test_input_of_another_rank_says_what_is_expected(method: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"expected input of shape \(N, C, H, W\) or \(C, H, W\)"):
        _make(method)(torch.randn(*shape))


@pytest.mark.parametrize("method", METHODS)
def test_fx_trace_and_export_still_work(method: str) -> None:
    torch.manual_seed(0)
    m = _make(method).eval()
    x = torch.randn(2, 4, 6, 6)
    gm = torch.fx.symbolic_trace(m)
    torch.testing.assert_close(gm(x), m(x))
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x))


# -- 4. .weight and reset_parameters ---------------------------------------------------------------------

def _weights_init(m: nn.Module) -> None:
    """The DCGAN tutorial's init, as users paste it."""
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)


@pytest.mark.parametrize("method", METHODS)
def test_missing_weight_is_a_clear_attribute_error(method: str) -> None:
    m = _make(method)
    assert "weight" not in m._parameters  # every built-in method's default has no single weight
    assert not hasattr(m, "weight")
    names = [n for n, _ in m.named_parameters()][:3]
    with pytest.raises(AttributeError, match="has no single .weight") as e:
        _ = m.weight
    msg = str(e.value)
    assert type(m).__name__ in msg and "reset_parameters()" in msg and all(n in msg for n in names)
    with pytest.raises(AttributeError, match="has no single .weight"):
        nn.Sequential(m).apply(_weights_init)
    # registered parameters, buffers and submodules still resolve; other names fail as usual
    for d in (m._parameters, m._buffers, m._modules):
        for name, v in d.items():
            assert getattr(m, name) is v
    with pytest.raises(AttributeError, match="object has no attribute 'no_such_thing'"):
        _ = m.no_such_thing


def test_hetconv_dense_has_a_real_weight_that_conv2d_can_use() -> None:
    torch.manual_seed(0)
    m = compconv.HetConv2d(8, 8, 3, padding=1, part=4, impl="dense")
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(m.weight, m.dense_weight())  # entries off the pattern start at zero
    torch.testing.assert_close(torch.nn.functional.conv2d(x, m.weight, m.bias, padding=1), m(x))
    exact = compconv.HetConv2d(8, 8, 3, padding=1, part=4)
    assert not hasattr(exact, "weight")  # was `weight = None` (a TypeError inside F.conv2d)


@pytest.mark.parametrize("method", METHODS)
def test_reset_parameters_reinitialises_every_parameter_as_at_construction(method: str) -> None:
    torch.manual_seed(0)
    host = _host(method, c_in=16, c_out=16)
    fresh = _make(method, host)
    m = _make(method, host)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
        for b in m.buffers():
            if b.is_floating_point():
                b.fill_(float("nan"))
    m.reset_parameters()
    for (name, p), (_, p0) in zip(m.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        if p0.numel() > 1 and bool((p0 == p0.flatten()[0]).all()):  # a constant init (zeros, ones)
            torch.testing.assert_close(p, p0, msg=name)
        elif p0.numel() >= 64:  # a random init: the same scale (the std of >= 64 draws, within 40%)
            ratio = (p.std() / p0.std()).item()
            assert 0.6 < ratio < 1.4, (name, ratio)
    for (name, b), (_, b0) in zip(m.named_buffers(), fresh.named_buffers(), strict=True):
        torch.testing.assert_close(b, b0, msg=name)  # BN statistics back to their start, index buffers kept


# -- 5./6. batch and argument errors ------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arg", ["kernel_size", "stride", "padding", "dilation"])
@pytest.mark.parametrize("bad", [(3, 3, 3), (1.5, 1), "x"])
def test_malformed_tuples_name_the_argument(method: str, arg: str, bad: Any) -> None:
    cls = get_method(method)
    geo: dict[str, Any] = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 1}
    geo[arg] = bad
    if arg == "padding" and bad == "x":
        match = "padding must be an int, a pair or one of 'same', 'valid'"
    else:
        match = rf"{arg} must be an int or a pair of ints, but got {bad!r}".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=match):
        cls(**geo)


@pytest.mark.parametrize("method", METHODS)
def test_batch_one_in_training_runs_or_names_the_module(method: str) -> None:
    """Batch 1 in training: runs (as nn.Conv2d), or says which module needs a larger batch."""
    m = _make(method).train()
    x = torch.randn(1, 4, 6, 6)
    cls = get_method(method)
    if cls.min_train_batch > 1:
        with pytest.raises(ValueError, match=rf"{cls.__name__} in training mode needs a batch of at least "
                                             rf"{cls.min_train_batch}, but got batch size 1"):
            m(x)
        assert m.eval()(x).shape[0] == 1  # eval mode takes batch 1
    else:
        assert m(x).shape[0] == 1


# -- 7. exports ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_every_method_class_is_exported_at_the_top_level(method: str) -> None:
    cls = get_method(method)
    assert getattr(compconv, cls.__name__) is cls
    assert cls.__name__ in compconv.__all__


# -- 6. the host's padding mode reaches every inner conv -----------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_circular_host_stays_shift_equivariant_under_roll(method: str) -> None:
    """A circular-padded stride-1 conv commutes with torch.roll; so must its replacement (every inner op).

    Ghost's cheap depthwise conv used zero padding: the rolled output differed by ~1.6 at the border.
    """
    torch.manual_seed(0)
    host = _host(method, padding_mode="circular")
    m = _make(method, host).eval()
    x = torch.randn(2, host.in_channels, 6, 7)
    shift, dims = (2, 3), (2, 3)
    with torch.no_grad():
        assert torch.allclose(host(torch.roll(x, shift, dims)), torch.roll(host(x), shift, dims), atol=1e-5)
        y_rolled, rolled_y = m(torch.roll(x, shift, dims)), torch.roll(m(x), shift, dims)
    assert y_rolled.shape == rolled_y.shape == host(x).shape
    assert torch.allclose(y_rolled, rolled_y, atol=1e-5), (method, (y_rolled - rolled_y).abs().max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_every_padded_inner_conv_uses_the_hosts_padding_mode(method: str, mode: str) -> None:
    """No inner conv that pads may fall back to zeros (reflect / replicate have no roll identity to test)."""
    host = _host(method, padding_mode=mode)
    m = _make(method, host)
    padded = [(n, c) for n, c in m.named_modules()
              if isinstance(c, nn.Conv2d) and c.padding not in ((0, 0), "valid")]
    # (HetConv pads the input itself in forward, its convs have padding 0: the roll test covers it)
    assert all(c.padding_mode == mode for _, c in padded), [(n, c.padding_mode) for n, c in padded]


# docs/compconv.md "Initial weights differ between methods": which init each method's inner convs start from
_KAIMING_FAN_OUT = {"ghost", "hetconv"}


@pytest.mark.parametrize("method", METHODS)
def test_initial_weights_follow_the_documented_scheme(method: str) -> None:
    import math

    torch.manual_seed(0)
    groups = 64 if method == "xsepconv" else 1  # XSepConv replaces depthwise convs
    conv = get_method(method)(64, 64, 5 if method == "xsepconv" else 3, padding="same", groups=groups)
    inner = [m for m in conv.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() >= 256
             and not (method == "slimconv" and m.kernel_size == (1, 1))]  # SE gate 1x1s: tiny, skipped
    assert inner, method
    for m in inner:
        w = m.weight.detach()
        rf = w.shape[2] * w.shape[3]
        want = (math.sqrt(2 / (w.shape[0] * rf)) if method in _KAIMING_FAN_OUT
                else 1 / math.sqrt(3 * w.shape[1] * rf))  # PyTorch's default: kaiming_uniform(a=sqrt(5))
        assert float(w.std()) == pytest.approx(want, rel=0.15), (method, m)
    # the doc's loop gives every method the same Kaiming start
    model = nn.Sequential(conv)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    for m in inner:
        w = m.weight.detach()
        assert float(w.std()) == pytest.approx(math.sqrt(2 / (w.shape[0] * w.shape[2] * w.shape[3])), rel=0.15)


def test_initial_weights_doc_hosts_ratio_and_slimconv_blocks() -> None:
    """docs/compconv.md "Initial weights": the CompConv ratio range, the zoo hosts, SlimConv's block rewrite."""
    import math
    from pathlib import Path

    from compconv.layers.slimconv import convert_blocks

    words = " ".join((Path(__file__).resolve().parents[1] / "docs" / "compconv.md").read_text().split())
    torch.manual_seed(0)
    comp = compconv.convert(compconv.get_model("cifar_resnet20"), method="compconv")
    ratios = [math.sqrt(6 * m.in_channels / m.c_prim) for m in comp.modules() if isinstance(m, compconv.CompConv2d)]
    for m in comp.modules():  # the formula is the measured ratio of Kaiming fan-out to the drawn weights
        if isinstance(m, compconv.CompConv2d):
            w = m.convs[0].weight.detach()
            kaiming = math.sqrt(2 / (w.shape[0] * 9))
            assert kaiming / float(w.std()) == pytest.approx(math.sqrt(6 * m.in_channels / m.c_prim), rel=0.15)
    assert f"{math.floor(10 * min(ratios)) / 10}-{max(ratios):.1f}x on ResNet-20's layers" in words
    vgg, r20 = compconv.get_model("cifar_vgg16"), compconv.get_model("cifar_resnet20")
    w = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)][1].weight  # 64 -> 64, 3x3
    assert float(w.detach().std()) == pytest.approx(1 / math.sqrt(3 * w[0].numel()), rel=0.1)  # PyTorch default
    w = r20.layer1[0].conv1.weight
    assert float(w.detach().std()) == pytest.approx(math.sqrt(2 / (w.shape[0] * 9)), rel=0.1)  # Kaiming fan-out
    slim = convert_blocks(compconv.get_model("cifar_resnet20"))
    top = slim.layer1[0].conv1.top[0]
    k = math.sqrt(2 / (top.weight.shape[0] * 9))
    assert float(top.weight.detach().std()) == pytest.approx(k, rel=0.15)
    slim.layer1[0].conv1.reset_parameters()
    assert float(top.weight.detach().std()) == pytest.approx(1 / math.sqrt(3 * top.weight[0].numel()), rel=0.15)
