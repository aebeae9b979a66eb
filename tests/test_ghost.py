"""GhostConv2d: equivalence to GhostNet's GhostModule, shapes, counts, errors, conversion."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compconv.convert import convert
from compconv.layers import GhostConv2d, get_method
from compconv.layers.ghost import ghost_channels
from compconv.profile import profile


class ReferenceGhostModule(nn.Module):
    """GhostNet's ``GhostModule`` (huawei-noah/ghostnet, ``ghostnet.py``), with the host's conv geometry.

    The cheap op computes all ``m (s - 1)`` ghosts and the output is truncated, as in the original.
    """

    def __init__(self, inp, oup, kernel_size, stride, padding, ratio, dw_size, norm, act):
        super().__init__()
        self.oup = oup
        init = math.ceil(oup / ratio)
        new = init * (ratio - 1)

        def post(c):
            return nn.Sequential(
                *([nn.BatchNorm2d(c)] if norm else []), *([nn.ReLU(inplace=True)] if act else [])
            )

        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init, kernel_size, stride, padding, bias=False), post(init)
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init, new, dw_size, 1, dw_size // 2, groups=init, bias=False), post(new)
        )

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, : self.oup]


def ghost_counts(c_in: int, c_out: int, k: tuple[int, int], s: int, d: int) -> tuple[int, int]:
    """(params, MACs per output pixel): ``m C_in k^2 + (C_out - m) d^2`` with ``m = ceil(C_out / s)``."""
    m = -(-c_out // s)
    per_pixel = m * c_in * k[0] * k[1] + (c_out - m) * d * d
    return per_pixel, per_pixel


# (C_in, C_out, kernel, stride, padding, ratio, dw_size, norm, act, H, W)
CASES = [
    (8, 16, 3, 1, 1, 2, 3, False, False, 7, 9),
    (8, 15, 3, 2, 1, 2, 3, False, False, 7, 9),  # odd C_out: one ghost fewer than primaries
    (6, 10, 1, 1, 0, 3, 3, False, False, 5, 6),  # 1x1 primary (GhostNet's own use), s = 3
    (6, 11, 5, 2, 2, 4, 5, True, True, 9, 8),  # s = 4 with truncation, BN + ReLU as GhostNet
    (4, 7, 3, 1, 0, 3, 1, True, False, 6, 5),  # valid padding, 1x1 cheap op
    (4, 1, 3, 1, 1, 2, 3, False, False, 4, 4),  # C_out = 1: no ghosts
]


@pytest.mark.parametrize("case", CASES)
def test_equals_ghostnet_module(case: tuple) -> None:
    ci, co, k, s, p, r, d, norm, act, H, W = case
    torch.manual_seed(0)
    ours = GhostConv2d(ci, co, k, s, p, bias=False, ratio=r, dw_size=d, norm=norm, act=act).double()
    ref = ReferenceGhostModule(ci, co, k, s, p, r, d, norm, act).double()
    with torch.no_grad():
        ref.primary_conv[0].weight.copy_(ours.primary.weight)
        if ours.cheap is not None:
            # our cheap op holds exactly the ghosts the truncation keeps: the first C_out - m of GhostNet's
            ref.cheap_operation[0].weight[: ours.ghost_channels].copy_(ours.cheap.weight)
    x = torch.randn(3, ci, H, W, dtype=torch.float64)
    y = ours(x)
    # train mode: BN uses batch statistics per channel, so kept channels agree too
    torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-12)
    assert y.shape == nn.Conv2d(ci, co, k, s, p)(x.float()).shape


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_every_parameter(case: tuple) -> None:
    ci, co, k, s, p, r, d, norm, act, H, W = case
    torch.manual_seed(0)
    m = GhostConv2d(ci, co, k, s, p, bias=True, ratio=r, dw_size=d, norm=norm, act=act)
    x = torch.randn(2, ci, H, W, requires_grad=True)
    (m(x) * torch.randn(1, co, 1, 1)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, prm in m.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", CASES)
def test_macs_and_params(case: tuple) -> None:
    ci, co, k, s, p, r, d, norm, act, H, W = case
    m = GhostConv2d(ci, co, k, s, p, bias=False, ratio=r, dw_size=d, norm=norm, act=act)
    x = torch.randn(2, ci, H, W)
    with FlopCounterMode(display=False) as fc:
        y = m(x)
    params, per_pixel = ghost_counts(ci, co, m.kernel_size, r, d)
    macs = per_pixel * y.shape[0] * y.shape[2] * y.shape[3]
    assert fc.get_total_flops() == 2 * macs  # nothing computed is thrown away
    prof = profile(m, x)
    assert prof.total_macs == macs
    bn = 2 * co if norm else 0  # BN weight + bias over the primary and ghost channels
    assert prof.total_params == params + bn == sum(t.numel() for t in m.parameters())


def test_pinned_counts() -> None:
    # 64 -> 64, 3x3 at 32x32, s=2, d=3: m = 32; params 32*64*9 + 32*9 = 18,432 + 288 = 18,720;
    # MACs 32*32*18,720 = 19,169,280 (the plain conv: 37,748,736; ratio ~ 1/2 + 1/(2*64)).
    m = GhostConv2d(64, 64, 3, 1, 1, bias=False)
    prof = profile(m, (1, 64, 32, 32))
    assert prof.total_params == 18_720
    assert prof.total_macs == 19_169_280


def test_ghost_channels() -> None:
    assert ghost_channels(64, 2) == (32, 32)
    assert ghost_channels(15, 2) == (8, 7)
    assert ghost_channels(10, 3) == (4, 6)
    assert ghost_channels(5, 1) == (5, 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=8, out_channels=8, kernel_size=3, groups=8), r"depthwise conv \(groups=8\)"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, groups=2), r"grouped conv \(groups=2\)"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, ratio=0), r"ratio must be a positive int"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, ratio=2.5), r"ratio must be a positive int"),
        (
            dict(in_channels=8, out_channels=8, kernel_size=3, dw_size=2),
            r"dw_size must be a positive odd int",
        ),
    ],
)
def test_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GhostConv2d(**kwargs)


def test_from_conv_ineligible_and_repr() -> None:
    assert get_method("ghost") is GhostConv2d
    assert "depthwise" in GhostConv2d.ineligible_reason(nn.Conv2d(16, 16, 3, groups=16))
    assert (
        GhostConv2d.ineligible_reason(nn.Conv2d(16, 32, 1)) is None
    )  # 1x1 convs are fine (GhostNet uses them)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2, padding_mode="reflect").double()
    m = GhostConv2d.from_conv(conv, ratio=3)
    assert m.primary.weight.dtype == torch.float64 and m.bias is not None
    assert (m.stride, m.padding, m.dilation, m.padding_mode) == ((2, 2), (2, 2), (2, 2), "reflect")
    x = torch.randn(1, 16, 11, 10, dtype=torch.float64)
    assert m(x).shape == conv(x).shape
    assert "ratio=3" in repr(m) and "primary=8" in repr(m) and "ghost=16" in repr(m)


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    a = GhostConv2d(8, 12, 3, 1, 1, ratio=3, norm=True, act=True)
    b = GhostConv2d(8, 12, 3, 1, 1, ratio=3, norm=True, act=True)
    a.train()
    a(torch.randn(4, 8, 5, 5))  # update BN running stats
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not any("index" in k for k in a.state_dict())


def test_convert_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.Conv2d(32, 24, 1),
    )
    model, report = convert(model, "ghost", return_report=True)
    reasons = {r.name: r.reason for r in report.layers}
    assert isinstance(model[1], GhostConv2d) and isinstance(model[3], GhostConv2d)
    assert "stem" in reasons["0"] and "depthwise" in reasons["2"]
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 24, 4, 4)


@settings(max_examples=40, deadline=None)
@given(
    ci=st.integers(1, 8),
    co=st.integers(1, 12),
    k=st.sampled_from([1, 3, 5, (1, 3)]),
    s=st.integers(1, 2),
    p=st.integers(0, 2),
    r=st.integers(1, 4),
    d=st.sampled_from([1, 3, 5]),
    H=st.integers(1, 9),
    W=st.integers(1, 9),
    bias=st.booleans(),
)
def test_hypothesis_shapes_and_counts(ci, co, k, s, p, r, d, H, W, bias) -> None:
    kk = (k, k) if isinstance(k, int) else k
    if any(size + 2 * p - (kd - 1) < 1 for size, kd in zip((H, W), kk, strict=True)):
        return
    m = GhostConv2d(ci, co, k, s, p, bias=bias, ratio=r, dw_size=d)
    conv = nn.Conv2d(ci, co, k, s, p)
    x = torch.randn(2, ci, H, W)
    y = m(x)
    assert y.shape == conv(x).shape
    assert y.shape[-2:] == m.output_size(H, W)
    params, per_pixel = ghost_counts(ci, co, m.kernel_size, r, d)
    with FlopCounterMode(display=False) as fc:
        m(x)
    assert fc.get_total_flops() == 2 * per_pixel * 2 * y.shape[2] * y.shape[3]
    assert sum(t.numel() for t in m.parameters()) == params + (co if bias else 0)


@pytest.mark.slow
def test_ghost_vgg16_matches_compconv_paper_table5() -> None:
    """CompConv paper Table 5 row "Ghost-VGG16 [9]": 7.7M params, 158M FLOPs (MACs), CIFAR-10.

    Host: Li et al.'s CIFAR VGG-16 (``cifar_vgg16_li``, the GhostNet/HetConv CIFAR VGG), every conv but the
    stem a Ghost module with s=2, d=3. Tolerance 1% (7.7M is printed to 0.1M: half a unit is 0.65%).
    """
    from compconv.models import get_model
    from compconv.paper.hetconv_tables import count_model

    c = count_model(lambda: get_model("cifar_vgg16_li"), (1, 3, 32, 32), "ghost")
    assert abs(c.params / 7.7e6 - 1) < 0.01
    assert abs(c.macs / 158e6 - 1) < 0.01


def test_weight_and_reset_parameters_for_code_written_for_conv2d() -> None:
    """Issue 14: `model.apply(weights_init)` (DCGAN tutorial) reached for m.weight: AttributeError without a hint."""
    m = GhostConv2d(8, 8, 3, padding=1)

    def weights_init(mod: nn.Module) -> None:
        if mod.__class__.__name__.find("Conv") != -1:
            nn.init.normal_(mod.weight.data, 0.0, 0.02)

    with pytest.raises(AttributeError, match=r"GhostConv2d has no single .weight; its parameters are "
                                             r"\['bias', 'primary.weight', 'cheap.weight'\]"):
        nn.Sequential(m).apply(weights_init)
    with torch.no_grad():
        m.primary.weight.zero_()
        m.bias.fill_(1.0)
    m.reset_parameters()
    # Kaiming normal, fan_out = m k^2 = 4 * 9: std sqrt(2 / 36) = 0.2357 (over 288 draws, within 25%)
    assert abs(m.primary.weight.std().item() / math.sqrt(2 / 36) - 1) < 0.25
    assert torch.equal(m.bias, torch.zeros(8))
