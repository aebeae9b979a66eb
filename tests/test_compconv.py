"""CompConv2d: the formulas, the exact output structure, gradients, counts, export, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compconv import CompConv2d, profile
from compconv.layers.compconv import depth_from_c0, plan_compconv, prim_channels
from compconv.layers.ops import align_identity, channel_shuffle, shuffled_cat


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_prim_channels_is_the_smallest_that_covers_c_out(d: int) -> None:
    for c_out in range(1, 1100):
        c = prim_channels(c_out, d)
        assert c == math.ceil(c_out / (2 * (2**d - 1)))
        assert 2 * c * (2**d - 1) >= c_out > 2 * (c - 1) * (2**d - 1)


def test_depth_from_c0_matches_eq6() -> None:
    for c0 in (32, 64, 128, 256, 512):
        for c_in in range(1, 4200, 7):
            expected = min(math.floor(math.log2(max(1.0, c_in / c0))) + 1, 3)
            assert depth_from_c0(c_in, c0) == expected, (c_in, c0)
    # Exact powers of two (where float log2 could round the wrong way) and the VGG-16 widths of the paper.
    assert [depth_from_c0(c, 128) for c in (64, 128, 255, 256, 511, 512, 1024, 2048)] == [1, 1, 1, 2, 2, 3, 3, 3]
    assert depth_from_c0(4096, 128, max_depth=5) == 5


def _reference(m: CompConv2d, x: torch.Tensor) -> torch.Tensor:
    """The spec's definition written out with F.conv2d on the module's weights (no shuffle, no bias)."""
    plan = m.plan
    assert plan is not None
    w = [c.weight for c in m.convs]
    same = [(k - 1) // 2 for k in m.kernel_size]
    b = F.conv2d(x, w[0], stride=m.stride, padding=m.padding)
    xi = x[:, :, :: m.stride[0], :: m.stride[1]]  # "same" padding in these tests
    ts = []
    if plan.depth >= 2:
        t = torch.cat([xi[:, : plan.identity_widths[0]], b], 1)
        ts.append(t)
        for i in range(1, plan.depth - 1):
            t = torch.cat([xi[:, : plan.identity_widths[i]], F.conv2d(t, w[i], padding=same)], 1)
            ts.append(t)
        b = F.conv2d(t, w[plan.depth - 1], padding=same)
    # A_0 = DW(B_0) over all of B_0 (the dropped channels get arbitrary weights), then its last channels dropped.
    c = b.shape[1]
    dw = torch.randn(c, 1, *m.kernel_size)
    if m.tail is not None:
        dw[: plan.tail_channels] = m.tail.weight
    a0 = F.conv2d(b, dw, padding=same, groups=c)[:, : plan.tail_channels]
    ts.append(torch.cat([a0, b], 1))
    return torch.cat(ts, 1)[:, plan.front_drop :]


@pytest.mark.parametrize(
    "c_in,c_out,d,stride",
    [(16, 16, 1, 1), (16, 30, 2, 1), (64, 64, 3, 1), (64, 64, 4, 1), (48, 100, 3, 2), (33, 17, 2, 2)],
)
def test_output_is_exactly_the_specified_concatenation(c_in: int, c_out: int, d: int, stride: int) -> None:
    torch.manual_seed(0)
    m = CompConv2d(c_in, c_out, 3, stride, 1, bias=False, depth=d, shuffle=False)
    x = torch.randn(2, c_in, 9, 11)
    y = m(x)
    torch.testing.assert_close(y, _reference(m, x), rtol=1e-5, atol=1e-5)
    # Identity channels pass through unchanged (bit-exact copies of the subsampled input).
    xi = x[:, :, ::stride, ::stride]
    n_id = 0
    for pos, (kind, step, j) in enumerate(m.plan.sources):
        if kind == "identity":
            assert torch.equal(y[:, pos], xi[:, j]), (pos, step, j)
            n_id += 1
    assert n_id == sum(m.plan.identity_widths) - m.plan.front_drop
    # With the shuffle on, the same weights give the same channels in ShuffleNet order.
    ms = CompConv2d(c_in, c_out, 3, stride, 1, bias=False, depth=d)
    ms.load_state_dict(m.state_dict())
    torch.testing.assert_close(ms(x), y[:, ms.output_permutation()])


def test_truncation_when_surplus_exceeds_a0() -> None:
    # C_out = 64, d = 4: C_prim = 3, 90 channels, surplus 26 > A_0's 24 -> all of A_0 and 2 identity channels go.
    plan = plan_compconv(64, 64, 4)
    assert (plan.c_prim, plan.total_channels, plan.surplus, plan.tail_channels, plan.front_drop) == (3, 90, 26, 0, 2)
    m = CompConv2d(64, 64, 3, 1, 1, depth=4)
    assert m.tail is None
    assert m(torch.randn(1, 64, 5, 5)).shape == (1, 64, 5, 5)


def test_surplus_dropped_from_a0_first() -> None:
    plan = plan_compconv(64, 64, 3)  # C_prim = 5: 70 channels, 6 surplus, A_0 keeps 20 - 6 = 14
    assert (plan.c_prim, plan.surplus, plan.tail_channels, plan.front_drop) == (5, 6, 14, 0)


def test_d0_is_a_plain_conv() -> None:
    m = CompConv2d(8, 12, 3, 2, 1, depth=0)
    ref = nn.Conv2d(8, 12, 3, 2, 1)
    ref.load_state_dict({k.removeprefix("conv."): v for k, v in m.state_dict().items()})
    assert m.bias is None and m.conv.bias is not None  # the plain conv holds the bias
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(m(x), ref(x))


@pytest.mark.parametrize("identity", ["fixed", "group", "random", "conv"])
def test_gradients_reach_every_parameter(identity: str) -> None:
    m = CompConv2d(32, 48, 3, 1, 1, depth=3, identity=identity)
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_identity_modes_pick_the_documented_channels() -> None:
    g = CompConv2d(64, 64, 3, 1, 1, depth=3, identity="group")
    w = g.plan.identity_widths  # (5, 10)
    assert g.identity_index[: w[0]].tolist() == [i * 64 // w[0] for i in range(w[0])]
    r1 = CompConv2d(64, 64, 3, 1, 1, depth=3, identity="random", identity_seed=3)
    r2 = CompConv2d(64, 64, 3, 1, 1, depth=3, identity="random", identity_seed=3)
    assert torch.equal(r1.identity_index, r2.identity_index)
    assert len(set(r1.identity_index[w[0]:].tolist())) == w[1]
    assert "identity_index" in r1.state_dict() and "identity_index" not in g.state_dict()


@pytest.mark.parametrize("c_in,c_out,d,k,stride", [(64, 64, 3, 3, 1), (128, 256, 2, 3, 2), (256, 64, 1, 1, 1),
                                                    (96, 200, 3, 1, 2), (64, 64, 4, 3, 1)])
def test_macs_and_params_match_formula_and_flop_counter(c_in: int, c_out: int, d: int, k: int, stride: int) -> None:
    m = CompConv2d(c_in, c_out, k, stride, k // 2, bias=False, depth=d)
    plan = m.plan
    x = torch.randn(1, c_in, 14, 14)
    with FlopCounterMode(display=False) as fc:
        y = m(x)
    hw = y.shape[-1] * y.shape[-2]
    # Spec Eq. 8 (shifted index): k^2 (C_in C_prim + sum_{i=2..d} (2^(i-1) C_prim)^2 + kept DW channels) per pixel.
    c = plan.c_prim
    per_px = k * k * (c_in * c + sum((2 ** (i - 1) * c) ** 2 for i in range(2, d + 1)) + plan.tail_channels)
    assert plan.macs_per_pixel(k * k) == per_px
    # A 1x1 depthwise tail runs as a broadcast multiply (DepthwiseConv2d), which FlopCounterMode does not
    # see; compconv.profile counts it as the conv it is.
    unseen = plan.tail_channels if k == 1 else 0
    assert fc.get_total_flops() == 2 * (per_px - unseen) * hw
    assert profile(m, tuple(x.shape)).total_macs == per_px * hw
    assert sum(p.numel() for p in m.parameters()) == per_px // 1  # weights: one per MAC per output pixel


def test_cost_is_about_a_sixth_of_dense_at_d3() -> None:
    plan = plan_compconv(512, 512, 3)
    assert 0.15 < plan.macs_per_pixel(9) / (9 * 512 * 512) < 0.19  # spec: ~17% (paper: ~20%)


@pytest.mark.parametrize("padding,h", [(0, 9), (2, 8), ("same", 7), ("valid", 10)])
def test_non_same_padding_and_odd_sizes_match_conv2d_shapes(padding: int | str, h: int) -> None:
    stride = 1 if isinstance(padding, str) else 2
    m = CompConv2d(32, 40, 3, stride, padding, depth=2)
    ref = nn.Conv2d(32, 40, 3, stride, padding)
    x = torch.randn(1, 32, h, h + 1)
    assert m(x).shape == ref(x).shape
    assert m.output_size(h, h + 1) == tuple(ref(x).shape[-2:])


def test_align_identity_reads_receptive_field_centres() -> None:
    x = torch.arange(2 * 10 * 10.0).view(1, 2, 10, 10)
    # k=3, p=0, s=1: centre of output pixel j is input pixel j + 1.
    torch.testing.assert_close(align_identity(x, (3, 3), (1, 1), (0, 0), (1, 1), (8, 8)), x[:, :, 1:9, 1:9])
    # k=3, p=2 (more than same): output pixel 0's centre is input pixel -1 -> zero padding.
    out = align_identity(x, (3, 3), (1, 1), (2, 2), (1, 1), (12, 12))
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 1, 1] == x[0, 0, 0, 0]


@settings(max_examples=40, deadline=None)
@given(
    c_in=st.integers(1, 80),
    c_out=st.integers(1, 80),
    k=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    depth=st.integers(0, 4),
    h=st.integers(5, 12),
)
def test_any_shape_works_or_fails_clearly(c_in: int, c_out: int, k: int, stride: int, depth: int, h: int) -> None:
    try:
        m = CompConv2d(c_in, c_out, k, stride, k // 2, depth=depth)
    except ValueError as e:
        assert "depth" in str(e)
        return
    x = torch.randn(2, c_in, h, h)
    assert m(x).shape == nn.Conv2d(c_in, c_out, k, stride, k // 2)(x).shape


@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    groups=st.integers(1, 4),
    drop=st.integers(0, 6),
    channels_last=st.booleans(),
)
def test_shuffled_cat_equals_cat_drop_shuffle_forward_and_backward(
    widths: list[int], groups: int, drop: int, channels_last: bool
) -> None:
    # The eager one-write path (custom autograd) must equal the functional form exactly, values and grads.
    total = sum(widths)
    if drop >= total or (total - drop) % groups:
        with pytest.raises(ValueError, match="front_drop"):
            shuffled_cat([torch.zeros(1, w, 2, 2) for w in widths], groups, drop)
        return
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    parts = [torch.randn(2, w, 3, 4).contiguous(memory_format=fmt).requires_grad_() for w in widths]
    ref = channel_shuffle(torch.cat(parts, 1)[:, drop:], groups)
    y = shuffled_cat(parts, groups, drop)
    assert torch.equal(y, ref)
    gy = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, parts, gy), torch.autograd.grad(y, parts, gy), strict=True):
        assert torch.equal(a, b)


def test_shuffled_cat_keeps_cats_type_promotion() -> None:
    # Under autocast the identity channels (input dtype) meet bf16 conv outputs: promote as torch.cat does.
    a = torch.randn(1, 2, 3, 3, requires_grad=True)
    b = torch.randn(1, 2, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    y = shuffled_cat([a, b], 2)
    assert y.dtype == torch.float32
    ga, gb = torch.autograd.grad(y.sum(), [a, b])
    assert ga.dtype == torch.float32 and gb.dtype == torch.bfloat16


@pytest.mark.parametrize(("widths", "groups", "drop"), [([2, 3, 3], 2, 0), ([3, 1, 4], 3, 2), ([4, 4], 1, 1)])
def test_shuffled_cat_has_second_derivatives_and_forward_mode(widths: list[int], groups: int, drop: int) -> None:
    """Double backward (create_graph) and forward-mode AD through the one-write Function, checked numerically."""
    torch.manual_seed(0)
    parts = [torch.randn(2, w, 2, 3, dtype=torch.float64, requires_grad=True) for w in widths]
    y = shuffled_cat(parts, groups, drop)
    assert type(y.grad_fn).__name__ == "_ShuffledCatBackward"  # the custom Function, not the functional form

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return shuffled_cat(list(ps), groups, drop) ** 2  # nonlinear after: the incoming grad needs a graph

    assert torch.autograd.gradcheck(f, tuple(parts), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, tuple(parts), fast_mode=True)
    import torch.autograd.forward_ad as fwad

    tangents = [torch.randn_like(p) for p in parts]
    ref = channel_shuffle(torch.cat(tangents, 1)[:, drop:], groups)  # the op is linear: jvp = op(tangents)
    with fwad.dual_level():
        out = shuffled_cat([fwad.make_dual(p.detach(), t) for p, t in zip(parts, tangents, strict=True)],
                           groups, drop)
        assert torch.equal(fwad.unpack_dual(out).tangent, ref)


def test_shuffled_cat_under_vmap_equals_the_functional_form() -> None:
    torch.manual_seed(0)
    parts = [torch.randn(5, 2, 3, 2, 2), torch.randn(5, 2, 3, 2, 2)]
    got = torch.func.vmap(lambda a, b: shuffled_cat([a, b], 3, 0))(*parts)
    want = torch.stack([channel_shuffle(torch.cat([a, b], 1), 3) for a, b in zip(*parts, strict=True)])
    assert torch.equal(got, want)


def test_gradient_penalty_through_compconv_equals_the_functional_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's example (R1 / WGAN-GP): today's one-write path gives the functional form's second derivatives."""
    import compconv.layers.compconv as cc
    from compconv.layers.ops import _functional_shuffled_cat

    torch.manual_seed(0)
    m = CompConv2d(4, 6, 3, padding=1, bias=False, depth=2, width_multiple=2).double()  # front_drop=2, 3 groups
    assert m.plan.front_drop == 2 and m.groups_shuffle == 3
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)

    def penalty_grads() -> list[torch.Tensor]:
        y = m(x)
        (g,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
        return list(torch.autograd.grad(g.pow(2).sum(), list(m.parameters())))

    assert type(m(x).grad_fn).__name__ == "_ShuffledCatBackward"
    got = penalty_grads()
    monkeypatch.setattr(cc, "shuffled_cat", lambda parts, g, d: _functional_shuffled_cat(parts, g, d))
    want = penalty_grads()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_pad_any_is_f_pad_where_f_pad_works_and_extends_it_elsewhere(mode: str) -> None:
    from compconv.layers.ops import PadAnyConv2d, pad_any

    torch.manual_seed(0)
    for h in range(1, 6):
        for p in range(0, 6):
            x = torch.randn(1, 2, h, h + 1)
            try:
                ref = F.pad(x, (p, p, p, p), mode=mode)
            except RuntimeError:  # beyond F.pad: reflect pad >= size, circular pad > size
                y = pad_any(x, (p, p, p, p), mode)
                assert y.shape == (1, 2, h + 2 * p, h + 1 + 2 * p)
                if h == 1:  # a 1-pixel map extends to itself in every mode
                    assert torch.equal(y[:, :, :, p + 1], x[:, :, 0, 1].view(1, 2, 1).expand(1, 2, 1 + 2 * p))
                continue
            assert torch.equal(pad_any(x, (p, p, p, p), mode), ref)
    # reflect of [a, b] by 3: ... b a [a b]: the mirror continues periodically (period 2(size-1) = 2)
    x = torch.tensor([[[[1.0, 2.0]]]])
    assert pad_any(x, (3, 3, 0, 0), "reflect").flatten().tolist() == [2, 1, 2, 1, 2, 1, 2, 1]
    assert pad_any(x, (3, 3, 0, 0), "circular").flatten().tolist() == [2, 1, 2, 1, 2, 1, 2, 1]
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode=mode)
    same = PadAnyConv2d(2, 2, 3, padding=1, padding_mode=mode)
    same.load_state_dict(conv.state_dict())
    x = torch.randn(2, 2, 4, 5)
    assert torch.equal(same(x), conv(x))


def test_reflect_host_on_a_map_smaller_than_the_inner_pad() -> None:
    """Issue 14: host Conv2d(4, 4, 3, padding=0, reflect) on 3x3 -> 1x1; the inner 3x3s pad a 1x1 map."""
    host = nn.Conv2d(4, 4, 3, padding=0, padding_mode="reflect")
    x = torch.randn(2, 4, 3, 3)
    for depth in (1, 2):
        m = CompConv2d.from_conv(host, depth=depth)
        y = m(x)
        assert y.shape == host(x).shape == (2, 4, 1, 1)
        # reflect on a 1x1 map repeats the pixel: the 3x3 tail sees a constant window, i.e. sum of weights
        if depth == 1:
            b = m.convs[0](x)
            t = m.plan.tail_channels
            want = b[:, :t] * m.tail.weight.sum((1, 2, 3)).view(1, -1, 1, 1)
            torch.testing.assert_close(m.tail(b[:, :t]), want)


def test_training_step_gradients_equal_the_functional_form() -> None:
    # The whole module: gradients through the one-write output equal those of the functional reference.
    torch.manual_seed(0)
    m = CompConv2d(24, 40, 3, 1, 1, bias=False, depth=3, width_multiple=8)
    x = torch.randn(2, 24, 6, 6, requires_grad=True)
    y = m(x)
    ref = channel_shuffle(_reference(m, x), m.groups_shuffle)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *m.parameters()], g)
    want = torch.autograd.grad(ref, [x, *m.parameters()], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip() -> None:
    a = CompConv2d(32, 64, 3, 1, 1, depth=3, identity="random", identity_seed=1)
    b = CompConv2d(32, 64, 3, 1, 1, depth=3, identity="random", identity_seed=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 32, 6, 6)
    torch.testing.assert_close(a(x), b(x))


def test_jit_trace() -> None:
    m = CompConv2d(32, 64, 3, 2, 1, depth=3).eval()
    x = torch.randn(1, 32, 8, 8)
    traced = torch.jit.trace(m, x)
    torch.testing.assert_close(traced(x), m(x))


@pytest.mark.slow
def test_torch_compile() -> None:
    m = CompConv2d(32, 64, 3, 1, 1, depth=3).eval()
    x = torch.randn(2, 32, 8, 8)
    compiled = torch.compile(m)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(groups=4), "groups=4"),
        (dict(identity="copy"), "identity must be one of"),
        (dict(depth=2, c0=128), "expected depth or c0"),
        (dict(depth=-1), "depth must be an int >= 0"),
        (dict(padding_mode="mirror"), "padding_mode must be one of"),
        (dict(c0=0), "c0 must be a positive int"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, match: str) -> None:
    base = dict(in_channels=64, out_channels=64, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match=match):
        CompConv2d(**{**base, **kwargs})


def test_too_few_input_channels_for_identity_says_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"in_channels=3.*smaller depth"):
        CompConv2d(3, 64, 3, 1, 1, depth=3)
    CompConv2d(3, 64, 3, 1, 1, depth=3, identity="conv")  # a 1x1 conv identity needs no input channels


@pytest.mark.parametrize("k,stride", [(1, 1), (3, 1), (3, 2), (1, 2)])
def test_depthwise_tail_equals_the_grouped_conv(k: int, stride: int) -> None:
    # A 1x1 DepthwiseConv2d runs as a multiply: the same values as the grouped conv (bit for bit without bias).
    from compconv.layers.ops import DepthwiseConv2d

    torch.manual_seed(0)
    x = torch.randn(3, 6, 7, 7)
    for bias in (False, True):
        dw = DepthwiseConv2d(6, 6, k, stride, k // 2, groups=6, bias=bias)
        ref = F.conv2d(x, dw.weight, dw.bias, stride, k // 2, groups=6)
        if k == 1 and stride == 1 and not bias:  # CompConv's tail: bit for bit
            assert torch.equal(dw(x), ref)
        torch.testing.assert_close(dw(x), ref)
