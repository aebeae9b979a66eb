"""SlimConv2d: shapes, the reconstruct arithmetic (flip, split-and-add), counts, errors, block integration."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compconv import convert
from compconv.layers.slimconv import SlimConv2d, convert_blocks, slim_widths, split_from_k
from compconv.models import get_model
from compconv.profile import profile


@settings(max_examples=20, deadline=None)
@given(c=st.integers(8, 40), s=st.sampled_from([1, 2]), h=st.integers(3, 12), w=st.integers(3, 12),
       split=st.sampled_from([2, 3, 4]), k=st.sampled_from([3, 5]))
def test_native_output_shape(c: int, s: int, h: int, w: int, split: int, k: int) -> None:
    q, q2, native = slim_widths(c, split)
    m = SlimConv2d(c, native, k, s, k // 2, bias=False, split=split)
    ref = nn.Conv2d(c, native, k, s, k // 2)
    x = torch.randn(2, c, h, w)
    assert m.proj is None
    assert m(x).shape == ref(x).shape == (2, q + q2, *m.output_size(h, w))


@pytest.mark.parametrize("s", [1, 2])
def test_plain_drop_in_projects_to_out_channels(s: int) -> None:
    m = SlimConv2d(64, 96, 3, s, 1)
    x = torch.randn(2, 64, 15, 15)
    assert m(x).shape == nn.Conv2d(64, 96, 3, s, 1)(x).shape
    assert m.proj is not None and m.proj.in_channels == 48  # 3C/4


def test_paper_shapes_of_spec_section_7() -> None:
    x = torch.randn(2, 64, 56, 56)
    assert SlimConv2d(64, 48, 3, 1, 1, bias=False)(x).shape == (2, 48, 56, 56)
    assert SlimConv2d(64, 48, 3, 2, 1, bias=False)(x).shape == (2, 48, 28, 28)
    assert SlimConv2d(64, 24, 3, 1, 1, bias=False, split=4)(x).shape == (2, 24, 56, 56)  # 3C/8
    assert SlimConv2d(96, 48, 3, 1, 1, bias=False, k=2)(torch.randn(2, 96, 8, 8)).shape == (2, 48, 8, 8)


def test_gradients_reach_every_parameter() -> None:
    for kw in ({}, {"flip": "shuffle"}, {"shuffled_path": True}, {"split": 3}):
        m = SlimConv2d(24, 40, 3, 1, 1, **kw)
        m(torch.randn(2, 24, 6, 6)).square().sum().backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (kw, name)


@pytest.mark.parametrize("flip", ["flip", "none", "both"])
def test_reconstruct_split_and_add_with_flipped_weights(flip: str) -> None:
    torch.manual_seed(0)
    c = 8
    m = SlimConv2d(c, 6, 3, 1, 1, bias=False, flip=flip).eval()
    m.top, m.bottom = nn.Identity(), nn.Identity()  # expose the reconstructed pathways
    x = torch.randn(1, c, 3, 3)
    w = m.se(x)[0, :, 0, 0]
    y = m(x)
    top, bottom = y[0, : c // 2], y[0, c // 2 :]
    wf = w.flip(0)
    w_top = wf if flip == "both" else w
    w_bot = w if flip == "none" else wf
    for i in range(c // 2):  # T[c] = w[c] X[c] + w[c + C/2] X[c + C/2]; B with w_f[c] = w[C-1-c]
        torch.testing.assert_close(top[i], w_top[i] * x[0, i] + w_top[i + c // 2] * x[0, i + c // 2])
        torch.testing.assert_close(bottom[i], w_bot[i] * x[0, i] + w_bot[i + c // 2] * x[0, i + c // 2])


def test_leftover_channels_are_left_out_of_the_chunk_sums() -> None:
    m = SlimConv2d(10, 5, 3, 1, 1, bias=False, split=3)  # q = 3, q2 = 1, channel 9 unused
    x = torch.randn(2, 10, 5, 5)
    x2 = x.clone()
    x2[:, 9] = 0.0
    with torch.no_grad():
        m.se[-2].weight.zero_()  # make w independent of x (the pooled input feeds the SE)
        m.eval()
        torch.testing.assert_close(m(x), m(x2))
    assert "unused_channels=1" in repr(m)


def _module_params(c: int, split: int = 2, n: int = 3) -> int:
    """SE (fc1 C*h, BN 2h, fc2 h*C + C) + top (n^2 q^2 + BN 2q) + bottom (q q2 + 2 q2 + n^2 q2^2 + 2 q2)."""
    q, q2, _ = slim_widths(c, split)
    h = max(c // 32, 2)
    se = c * h + 2 * h + h * c + c
    return se + (n * n * q * q + 2 * q) + (q * q2 + 2 * q2 + n * n * q2 * q2 + 2 * q2)


@pytest.mark.parametrize("c", [64, 128, 256, 512])
def test_module_params_match_the_spec_breakdown(c: int) -> None:
    m = SlimConv2d(c, c // 2 + c // 4, 3, 1, 1, bias=False)
    assert sum(p.numel() for p in m.parameters()) == _module_params(c)
    # the spec's table: 12,484 / 49,544 / 197,392 / 788,000 (the same sums, done by hand)
    assert _module_params(64) == 12484 and _module_params(512) == 788000


@pytest.mark.parametrize("s,h", [(1, 14), (2, 14), (2, 15)])
def test_macs_match_flop_counter_and_the_formula(s: int, h: int) -> None:
    c = 32
    m = SlimConv2d(c, 24, 3, s, 1, bias=False).eval()  # eval: the SE's BN sees (1, h, 1, 1)
    x = torch.randn(1, c, h, h)
    with FlopCounterMode(display=False) as fc:
        m(x)
    macs = profile(m, x).total_macs
    assert 2 * macs == fc.get_total_flops()
    ho = (h + 2 - 3) // s + 1
    hid = max(c // 32, 2)
    # SE FCs on 1x1 + bottom 1x1 at input resolution + the two 3x3 convs at output resolution
    assert macs == 2 * c * hid + 16 * 8 * h * h + 9 * (16 * 16 + 8 * 8) * ho * ho


def test_grouped_and_depthwise_hosts() -> None:
    m = SlimConv2d(128, 96, 3, 1, 1, groups=32, bias=False)  # ResNeXt 32x4d width 128: q 64, q2 32
    assert m.inner_groups == (32, 32)
    dw = SlimConv2d(96, 36, 3, 1, 1, groups=96, bias=False, split=4)  # depthwise host: q 24, q2 12
    assert dw.inner_groups == (24, 12)
    assert dw(torch.randn(2, 96, 7, 7)).shape == (2, 36, 7, 7)
    with pytest.raises(ValueError, match="group_rule='gcd'"):
        SlimConv2d(96, 48, 3, 1, 1, groups=32, bias=False, split=3)  # q2 = 16: 32 does not divide it
    m = SlimConv2d(96, 48, 3, 1, 1, groups=32, bias=False, split=3, group_rule="gcd")
    assert m.inner_groups == (32, 16)


def test_settings_it_cannot_take_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="1x1 conv"):
        SlimConv2d(64, 64, 1)
    with pytest.raises(ValueError, match="too narrow"):
        SlimConv2d(3, 16, 3, padding=1)
    with pytest.raises(ValueError, match="convert_blocks"):
        SlimConv2d(64, 64, 3, padding=1, project=False)
    with pytest.raises(ValueError, match="k must be 2s/3"):
        SlimConv2d(64, 48, 3, padding=1, k=1.5)
    with pytest.raises(ValueError, match="expected split or k"):
        SlimConv2d(64, 48, 3, padding=1, k=2, split=2)
    with pytest.raises(ValueError, match="flip must be one of"):
        SlimConv2d(64, 48, 3, padding=1, flip="mirror")
    assert split_from_k(Fraction(4, 3)) == 2 and split_from_k(4 / 3) == 2 and split_from_k("8/3") == 4
    assert "1x1 conv" in SlimConv2d.ineligible_reason(nn.Conv2d(64, 64, 1))


def test_convert_on_plain_vgg_uses_the_projection_and_says_so() -> None:
    model, report = convert(get_model("cifar_vgg16"), "slimconv", return_report=True)
    assert len(report.converted) == 12 and report.kept[0].reason.startswith("stem")
    assert all("1x1 to" in r.reason for r in report.converted)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convert_blocks_builds_the_paper_resnet50() -> None:
    with torch.device("meta"):
        model = convert_blocks(get_model("resnet50"))
    blk = model.layer2[0]
    assert isinstance(blk.conv2, SlimConv2d) and isinstance(blk.bn2, nn.Identity)
    assert blk.conv2.stride == (2, 2) and blk.conv3.in_channels == 96  # width 128 -> 64 + 32
    p = profile(model, (1, 3, 224, 224))
    # spec §4.2 (arith/slimconv/count.py, the official layer set): 16,758,740 params, 2,652,222,208 MACs
    assert (p.total_params, p.total_macs) == (16758740, 2652222208)


def test_convert_blocks_on_basic_blocks_and_mobilenet_v2_runs() -> None:
    r56 = convert_blocks(get_model("cifar_resnet56", num_classes=100))
    # SlimConv on the block input (C_in = 16, stride 2): conv2 takes 3 * 16 / 4 = 12 channels
    assert isinstance(r56.layer2[0].conv1, SlimConv2d) and r56.layer2[0].conv2.in_channels == 12
    assert r56(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    mb = get_model("sc_mobilenet_v2")
    assert mb(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    with pytest.raises(ValueError, match="found no ResNet bottleneck"):
        convert_blocks(get_model("cifar_vgg16"))


@pytest.mark.slow
def test_slimconv_table_rows_within_tolerance() -> None:
    from compconv.paper.slimconv_tables import rows

    out = rows()
    checked = [r for r in out if r.tol_params is not None or r.tol_macs is not None]
    assert len(checked) >= 20
    bad = [(r.row, r.params_diff, r.macs_diff) for r in checked if r.status != "reproduced"]
    assert not bad
    assert all(r.note for r in out if r.status in ("not reproducible", "gap"))


def test_batch_one_in_training_is_a_clear_error_and_said_at_convert_time() -> None:
    """Issue 14: batch 1 in training failed inside the SE BatchNorm ("Expected more than 1 value per channel")."""
    m = SlimConv2d(8, 8, 3, padding=1).train()
    with pytest.raises(ValueError, match=r"SlimConv2d in training mode needs a batch of at least 2, but got "
                                         r"batch size 1.*BatchNorm"):
        m(torch.randn(1, 8, 6, 6))
    with pytest.raises(ValueError, match="batch size 1"):
        m(torch.randn(8, 6, 6))  # unbatched is a batch of one
    assert m(torch.randn(2, 8, 6, 6)).shape == (2, 8, 6, 6)
    assert m.eval()(torch.randn(1, 8, 6, 6)).shape == (1, 8, 6, 6)
    _, report = convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)),
                        "slimconv", return_report=True)
    assert report.converted and all("batch >= 2" in r.reason for r in report.converted)
