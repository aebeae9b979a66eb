"""XSepConv2d: shapes, the rotating 2x2 padding against explicit references, counts, errors, the MNV3 swap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compconv import convert
from compconv.layers.xsepconv import (
    DIRECTION_ORDER,
    XSepConv2d,
    assign_padding,
    convert_xsepconv,
    pad_2x2,
)
from compconv.models import get_model
from compconv.profile import profile


def _dw(c: int, k: int, s: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c, c, k, s, k // 2, groups=c, bias=False)


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 6), k=st.sampled_from([3, 5, 7]), s=st.sampled_from([1, 2]), h=st.integers(3, 13),
       w=st.integers(3, 13), variant=st.sampled_from(["standard", "no2x2", "b", "p"]))
def test_output_shape_matches_the_replaced_depthwise_conv(c: int, k: int, s: int, h: int, w: int,
                                                          variant: str) -> None:
    if variant == "p" and s == 2:
        return
    dw = _dw(c, k, s)
    m = XSepConv2d.from_conv(dw, downsample_min_k=3, variant=variant)
    x = torch.randn(2, c, h, w)
    assert m(x).shape == dw(x).shape == (2, c, *m.output_size(h, w))


def test_gradients_reach_every_parameter() -> None:
    for variant in ("standard", "no2x2", "b", "p"):
        m = XSepConv2d(6, 6, 5, 1, 2, groups=6, bias=True, variant=variant)
        m(torch.randn(2, 6, 9, 7)).square().sum().backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (variant, name)


def _explicit_pad(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """Zero padding written out element by element (the reference for the F.pad tuples)."""
    n, c, h, w = x.shape
    out = torch.zeros(n, c, h + top + bottom, w + left + right)
    for i in range(h):
        for j in range(w):
            out[:, :, i + top, j + left] = x[:, :, i, j]
    return out


def _explicit_dw2x2(xpad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. 2 of the paper as a loop: ``Y[c,i,j] = sum_{m,n<2} W[c,m,n] Xpad[c,i+m,j+n]``."""
    n, c, hp, wp = xpad.shape
    y = torch.zeros(n, c, hp - 1, wp - 1)
    for i in range(hp - 1):
        for j in range(wp - 1):
            y[:, :, i, j] = (weight[:, 0] * xpad[:, :, i : i + 2, j : j + 2]).sum((-2, -1))
    return y


@pytest.mark.parametrize("direction,sides", [("RB", (0, 1, 0, 1)), ("LT", (1, 0, 1, 0)), ("LB", (1, 0, 0, 1)),
                                             ("RT", (0, 1, 1, 0))])
def test_2x2_layer_with_each_padding_direction_matches_the_explicit_reference(direction: str,
                                                                              sides: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    m = XSepConv2d(3, 3, 5, 1, 2, groups=3, pad_direction=direction, norm_act=False, bias=False)
    x = torch.randn(2, 3, 5, 6)
    ref = _explicit_dw2x2(_explicit_pad(x, *sides), m.dw2x2.weight.detach())
    got = m.dw2x2(pad_2x2(x, direction))
    torch.testing.assert_close(got, ref)
    # and the whole module is that 2x2 followed by the 1xk and kx1 depthwise convs
    full = F.conv2d(F.conv2d(ref, m.dw1xk.weight, padding=(0, 2), groups=3), m.dwkx1.weight, padding=(2, 0),
                    groups=3)
    torch.testing.assert_close(m(x), full)


def test_original_four_group_padding_pads_channel_groups_lt_rb_lb_rt() -> None:
    x = torch.randn(1, 10, 4, 5)  # 10 channels -> groups of 3, 3, 2, 2 (earlier groups take the extras)
    got = pad_2x2(x, strategy="original")
    sides = {"LT": (1, 0, 1, 0), "RB": (0, 1, 0, 1), "LB": (1, 0, 0, 1), "RT": (0, 1, 1, 0)}
    start = 0
    for name, size in zip(("LT", "RB", "LB", "RT"), (3, 3, 2, 2), strict=True):
        torch.testing.assert_close(got[:, start : start + size], _explicit_pad(x[:, start : start + size],
                                                                               *sides[name]))
        start += size


def _centroid(y: torch.Tensor) -> tuple[float, float]:
    h, w = y.shape[-2:]
    ii, jj = torch.meshgrid(torch.arange(h, dtype=y.dtype), torch.arange(w, dtype=y.dtype), indexing="ij")
    return float((y * ii).sum() / y.sum()), float((y * jj).sum() / y.sum())


def test_rotating_directions_cancel_the_half_pixel_shift() -> None:
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    ones = torch.ones(1, 1, 2, 2)
    y = x
    for d in DIRECTION_ORDER[:1]:
        y = F.conv2d(pad_2x2(y, d), ones)
    assert _centroid(y) == (3.5, 3.5)  # RB padding alone moves content half a pixel to the top-left
    y = x
    for d in DIRECTION_ORDER:  # RB, LT, LB, RT: consecutive pairs cancel
        y = F.conv2d(pad_2x2(y, d), ones)
    assert _centroid(y) == pytest.approx((4.0, 4.0))


def test_assign_padding_rotates_in_forward_order_and_offers_the_4group_last_layer() -> None:
    model = get_model("xsep_mobilenet_v3_small")
    dirs = [m.pad_direction for m in model.modules() if isinstance(m, XSepConv2d)]
    assert dirs == ["RB", "LT", "LB", "RT", "RB", "LT"]  # the paper's N = 6
    seq = nn.Sequential(*[XSepConv2d(4, 4, 5, 1, 2, groups=4) for _ in range(5)])
    assert assign_padding(seq, last_original=True) == ["RB", "LT", "LB", "RT", "orig"]  # N % 4 == 1
    assert assign_padding(seq, strategy="original") == ["orig"] * 5
    # forward order from an example input: the same as registration order in a Sequential
    assert assign_padding(seq, example_input=torch.randn(1, 4, 6, 6)) == ["RB", "LT", "LB", "RT", "RB"]


@pytest.mark.parametrize("k,s,h", [(5, 1, 14), (3, 1, 9), (7, 2, 28), (9, 2, 28)])
def test_macs_match_flop_counter_and_the_paper_formula(k: int, s: int, h: int) -> None:
    c = 8
    m = XSepConv2d.from_conv(_dw(c, k, s), downsample_min_k=3)
    x = torch.randn(1, c, h, h)
    with FlopCounterMode(display=False) as fc:
        m(x)
    macs = profile(m, x).total_macs
    assert 2 * macs == fc.get_total_flops()
    if s == 1:  # 4hwc + 2khwc
        assert macs == (4 + 2 * k) * h * h * c
    else:  # 2x2 at full resolution, 1xk at h x w/2, kx1 at h/2 x w/2 (h, w = input size)
        assert macs == 4 * h * h * c + k * h * (h // 2) * c + k * (h // 2) ** 2 * c
    conv_weights = sum(p.numel() for n, p in m.named_parameters() if n.startswith("dw"))
    assert conv_weights == (4 + 2 * k) * c


def test_settings_it_cannot_take_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="depthwise"):
        XSepConv2d(8, 16, 5, padding=2)
    with pytest.raises(ValueError, match="kernel_size must be square and odd"):
        XSepConv2d(8, 8, 4, padding=2, groups=8)
    with pytest.raises(ValueError, match="k >= 7"):
        XSepConv2d(8, 8, 5, 2, 2, groups=8)  # the paper keeps stride-2 DWs below k = 7
    with pytest.raises(ValueError, match="padding must be kernel_size // 2"):
        XSepConv2d(8, 8, 5, 1, 0, groups=8)
    with pytest.raises(ValueError, match="k must be an odd int"):
        XSepConv2d(8, 8, 5, 1, 2, groups=8, k=4)
    with pytest.raises(ValueError, match="pad_direction must be one of"):
        XSepConv2d(8, 8, 5, 1, 2, groups=8, pad_direction="up")
    with pytest.raises(ValueError, match="variant='p'"):
        XSepConv2d(8, 8, 7, 2, 3, groups=8, variant="p")
    with pytest.raises(ValueError, match="activation must be one of"):
        XSepConv2d(8, 8, 5, 1, 2, groups=8, activation="gelu")
    assert "XSepConv replaces depthwise convs" in XSepConv2d.ineligible_reason(nn.Conv2d(8, 8, 3, padding=1))
    assert XSepConv2d.ineligible_reason(_dw(8, 5)) is None


def test_convert_on_mobilenet_v2_replaces_stride1_depthwise_and_keeps_the_rest_with_reasons() -> None:
    model = get_model("mobilenet_v2")
    model, report = convert_xsepconv(model, return_report=True)
    xs = [m for m in model.modules() if isinstance(m, XSepConv2d)]
    assert len(xs) == len(report.converted) == 13  # 17 DW 3x3 convs, 4 of them stride 2 (kept: k < 7)
    assert all(r.groups == r.c_in and r.stride == (1, 1) for r in report.converted)
    assert any("k >= 7" in r.reason for r in report.kept)
    assert any("dense conv" in r.reason for r in report.kept)
    assert {m.activation for m in xs} == {"relu6"}  # the host's nonlinearity goes between the layers
    assert [m.pad_direction for m in xs][:5] == ["RB", "LT", "LB", "RT", "RB"]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    # plain convert gives the same layers (default ReLU, every 2x2 padded RB)
    plain = convert(get_model("mobilenet_v2"), "xsepconv")
    assert sum(isinstance(m, XSepConv2d) for m in plain.modules()) == 13


def test_mobilenet_v3_small_swap_counts() -> None:
    with torch.device("meta"):
        base = profile(get_model("mobilenet_v3_small"), (1, 3, 224, 224))
        xs = profile(get_model("xsep_mobilenet_v3_small"), (1, 3, 224, 224))
    # Only the DW layers change: 4 blocks at 14x14 (exp 240, 240, 120, 144) go 25 -> 14 MACs per pixel and
    # channel, 2 blocks at 7x7 (exp 576, 576) go 25 -> 10 (k = 3).
    saved = 14 * 14 * (240 + 240 + 120 + 144) * (25 - 14) + 7 * 7 * 2 * 576 * (25 - 10)
    assert base.total_macs - xs.total_macs == saved


@pytest.mark.slow
def test_xsepconv_table_rows_within_tolerance() -> None:
    from compconv.paper.xsepconv_tables import rows

    out = rows()
    checked = [r for r in out if r.tol_params is not None or r.tol_macs is not None]
    assert len(checked) >= 4
    bad = [(r.row, r.params_diff, r.macs_diff) for r in checked if r.status != "reproduced"]
    assert not bad
    assert all(r.note for r in out if r.status in ("not reproducible", "gap"))


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate", "zeros"])
def test_variant_b_at_stride_2_pads_its_small_output_in_any_mode(mode: str) -> None:
    """Issue 14: XSepConv-B's 2x2 pads the stride-2 output (1x1 here) with the host's mode; F.pad refused."""
    host = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, padding_mode=mode)
    x = torch.randn(2, 4, 2, 2)
    m = XSepConv2d.from_conv(host, variant="b", downsample_min_k=3)
    assert m(x).shape == host(x).shape == (2, 4, 1, 1)
    # k larger than the host's kernel: the 1xk / kx1 pad more than the host did, on the same map
    host = nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode=mode)
    m = XSepConv2d.from_conv(host, k=7)
    assert m(torch.randn(2, 4, 2, 3)).shape == (2, 4, 2, 3)
