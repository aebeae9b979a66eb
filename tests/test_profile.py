"""profile(): per-layer and total params/MACs, checked against torch.utils.flop_counter and numel()."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compconv import convert, profile
from compconv.layers.ops import DepthwiseConv2d
from compconv.models import get_model


def _flop_counter_macs(model: nn.Module, size: tuple[int, ...]) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(size))
    return fc.get_total_flops() // 2  # FLOPs = 2 x MACs for convs and matmuls


@pytest.mark.parametrize(
    "name,size,opts",
    [
        ("cifar_vgg16", (1, 3, 32, 32), {"c0": 128}),
        ("cifar_resnet56", (2, 3, 32, 32), {"c0": 16}),
        ("cifar_resnet50", (1, 3, 32, 32), {"c0": 128, "identity": "conv"}),
        ("resnet18", (1, 3, 64, 64), {"depth": 2}),
    ],
)
def test_totals_match_flop_counter_and_numel(name: str, size: tuple[int, ...], opts: dict) -> None:
    for converted in (False, True):
        model = get_model(name)
        if converted:
            convert(model, "compconv", **opts)
        p = profile(model, size)
        # 1x1 depthwise tails run as multiplies (DepthwiseConv2d), which the flop counter does not see.
        mods = dict(model.named_modules())
        as_mul = sum(
            r.macs for r in p.rows if isinstance(mods[r.name], DepthwiseConv2d) and mods[r.name].kernel_size == (1, 1)
        )
        assert as_mul > 0 if converted and name == "cifar_resnet50" else True
        assert p.total_macs - as_mul == _flop_counter_macs(model, size)
        assert p.total_params == sum(t.numel() for t in model.parameters())
        assert p.uncounted_macs == 0


def test_rows_are_per_module_and_by_module_sums() -> None:
    model = get_model("cifar_resnet20")
    p = profile(model, (1, 3, 32, 32))
    rows = {r.name: r for r in p.rows}
    # conv1: 3 -> 16, 3x3, 32x32 output: 32*32*16*3*9 MACs, 16*3*9 weights.
    assert (rows["conv1"].macs, rows["conv1"].params, rows["conv1"].output_shape) == (
        32 * 32 * 16 * 27, 16 * 27, (1, 16, 32, 32))
    assert rows["fc"].macs == 64 * 10 and rows["bn1"].macs == 0 and rows["bn1"].params == 32
    by = p.by_module(1)
    assert sum(v["macs"] for v in by.values()) == p.total_macs
    assert by["layer1"]["macs"] == 6 * 32 * 32 * 16 * 16 * 9
    d = json.loads(p.to_json())
    assert d["total_macs"] == p.total_macs and "multiply-accumulates" in d["units"]
    assert "total:" in p.table()


def test_uncounted_ops_are_reported() -> None:
    class MatmulNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1) @ self.w

    p = profile(MatmulNet(), (2, 8, 1, 1))
    assert p.total_macs == 0 and p.uncounted_macs == 2 * 8 * 8
    assert "warning" in p.table()


def test_self_counting_modules_are_respected() -> None:
    class Masked(nn.Conv2d):
        def count_macs(self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
            return output.numel()

        def count_params(self) -> int:
            return 1

    p = profile(nn.Sequential(Masked(4, 4, 3)), (1, 4, 5, 5))
    assert (p.total_macs, p.total_params) == (4 * 3 * 3, 1)


def test_bad_input_size() -> None:
    with pytest.raises(ValueError, match="input_size must be a shape"):
        profile(nn.Conv2d(3, 3, 1), (1, 0, 4, 4))


def _fc_macs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x)
    return fc.get_total_flops() // 2


def test_transposed_1d_and_3d_convs_go_into_the_totals() -> None:
    from compconv.layers.hetconv import HetConv2d

    # The example. HetConv(16 -> 16, 3x3, P=4, masked) at 16x16: each output position of each of the
    # 16 filters has C_in/P = 4 channels at 3x3 and 12 at 1x1: 16 * 16*16 * (4*9 + 12) = 196,608 MACs.
    # ConvTranspose2d(16, 8, 2, stride=2): each of the 16*16*16 input elements is spread over a 2x2 patch of
    # each of the 8 output channels: 16*16*16 * 8 * 2*2 = 131,072 MACs. Total 327,680 (today: 196,608).
    het = HetConv2d(16, 16, 3, padding=1, part=4, impl="masked")
    up = nn.ConvTranspose2d(16, 8, 2, stride=2)
    model = nn.Sequential(het, up)
    p = profile(model, (1, 16, 16, 16))
    rows = {r.name: r for r in p.rows}
    assert rows["0"].macs == 16 * 16 * 16 * (4 * 9 + 12) == 196_608
    assert rows["1"].macs == 16 * 16 * 16 * 8 * 2 * 2 == 131_072 == _fc_macs(up, torch.zeros(1, 16, 16, 16))
    assert p.total_macs == 327_680 and p.uncounted_macs == 0
    assert rows["1"].output_shape == (1, 8, 32, 32)

    # Grouped and strided transposed conv: 4*5*5 inputs x (6/2 output channels per group) x 3*3 = 2,700.
    ct = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    assert profile(ct, (1, 4, 5, 5)).total_macs == 4 * 25 * 3 * 9 == _fc_macs(ct, torch.zeros(1, 4, 5, 5))
    # Conv1d(4, 6, 3) on (2, 4, 10): 2 images x 8 positions x 6 x 4 x 3 = 1,152.
    c1 = nn.Conv1d(4, 6, 3)
    p1 = profile(c1, (2, 4, 10))
    assert p1.total_macs == 2 * 8 * 6 * 4 * 3 == _fc_macs(c1, torch.zeros(2, 4, 10)) and p1.uncounted_macs == 0
    # Conv3d(2, 4, 3, padding=1) on (1, 2, 4, 4, 4): 64 positions x 4 x 2 x 27 = 13,824.
    c3 = nn.Conv3d(2, 4, 3, padding=1)
    p3 = profile(c3, (1, 2, 4, 4, 4))
    assert p3.total_macs == 64 * 4 * 2 * 27 == _fc_macs(c3, torch.zeros(1, 2, 4, 4, 4)) and p3.uncounted_macs == 0
    # ConvTranspose1d / 3d: inputs x C_out/g x prod(kernel).
    t1, t3 = nn.ConvTranspose1d(3, 5, 4, stride=2), nn.ConvTranspose3d(2, 3, 2, stride=2)
    assert profile(t1, (1, 3, 7)).total_macs == 3 * 7 * 5 * 4 == _fc_macs(t1, torch.zeros(1, 3, 7))
    assert profile(t3, (1, 2, 3, 3, 3)).total_macs == 2 * 27 * 3 * 8 == _fc_macs(t3, torch.zeros(1, 2, 3, 3, 3))


def test_a_self_counting_module_does_not_hide_uncounted_ops() -> None:
    from compconv.layers.hetconv import HetConv2d

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.het = HetConv2d(8, 8, 3, padding=1, part=4, impl="masked")  # counts itself (dead weights)
            self.w = nn.Parameter(torch.randn(8 * 4 * 4, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.het(x).flatten(1) @ self.w  # a bare matmul: no module of ours counts it

    p = profile(Net(), (2, 8, 4, 4))
    # het: 8 filters x 16 positions x 2 images x (2*9 + 6) = 6,144; the matmul: 2 rows x 128 x 5 = 1,280
    # (today uncounted_macs is forced to 0 because HetConv counts itself).
    assert p.total_macs == 8 * 16 * 2 * (2 * 9 + 6)
    assert p.uncounted_macs == 2 * 128 * 5
    assert "warning" in p.table()


def _tiny() -> nn.Module:
    return nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3, padding=1), pool=nn.AdaptiveAvgPool2d(1),
                                     flat=nn.Flatten(), fc=nn.Linear(4, 2)))


@pytest.mark.parametrize(
    "size,err,match",
    [
        ((3, 32, 32), ValueError, r"input_size must have 4 entries \(N, C, H, W\).*\(1, 3, 32, 32\)"),
        ((1, 3, 32.7, 32), TypeError, r"input_size must hold ints.*entry 2.*32\.7"),
        ("32", TypeError, r"input_size must be a shape.*'32'"),
        (32, TypeError, r"input_size must be a shape"),
        ((1, 3, True, 32), TypeError, r"input_size must hold ints"),
        ((1, 0, 4, 4), ValueError, r"input_size must be a shape of positive ints"),
        ((1, 1, 32, 32), ValueError, r"input_size \(1, 1, 32, 32\) has 1 channels.*'stem' \(Conv2d\), expects "
                                     r"in_channels=3"),
    ],
)
def test_input_size_is_validated(size, err, match) -> None:  # noqa: ANN001
    with pytest.raises(err, match=match):
        profile(_tiny(), size)


def test_input_size_forms_that_work() -> None:
    m = _tiny()
    # stem: 32*32 positions x 4 x 3 x 9 = 110,592; fc: 4 x 2 = 8.
    macs = 32 * 32 * 4 * 3 * 9 + 4 * 2
    for size in ((1, 3, 32, 32), [1, 3, 32, 32], torch.Size([1, 3, 32, 32]), torch.zeros(1, 3, 32, 32)):
        assert profile(m, size).total_macs == macs
    with pytest.raises(ValueError, match=r"input_size \(1, 5, 8, 8\) has 5 channels.*in_channels=3"):
        profile(m, torch.zeros(1, 5, 8, 8))  # a tensor is checked the same way
    # 1-D and 3-D models take 3 and 5 entries; a model without convs (an MLP) any rank.
    with pytest.raises(ValueError, match=r"input_size must have 3 entries \(N, C, L\)"):
        profile(nn.Conv1d(4, 4, 3), (1, 4, 10, 1))
    with pytest.raises(ValueError, match=r"expects in_channels=2"):
        profile(nn.Conv3d(2, 4, 3), (1, 3, 4, 4, 4))
    assert profile(nn.Linear(6, 3), (5, 6)).total_macs == 5 * 6 * 3


def test_table_only_leaves_false_shows_parents_with_subtree_sums() -> None:
    model = get_model("cifar_resnet20")
    p = profile(model, (1, 3, 32, 32))

    def row(text: str, name: str) -> list[str] | None:
        for line in text.splitlines():
            cells = line.split()
            if cells and cells[0] == name:
                return cells
        return None

    leaves, tree = p.table(), p.table(only_leaves=False)
    assert row(leaves, "layer1") is None  # a container owns no parameters of its own
    # layer1: 3 blocks x 2 convs of 16 -> 16, 3x3 at 32x32 = 6 * 32*32*16*16*9 MACs;
    # params: 6 convs x 16*16*9 + 6 BNs x 2*16 = 13,824 + 192 = 14,016.
    assert row(tree, "layer1")[1:4] == ["Sequential", "14,016", f"{6 * 32 * 32 * 16 * 16 * 9:,}"]
    assert row(tree, "layer1.0")[1:4] == ["BasicBlockA", f"{2 * 2304 + 2 * 32:,}", f"{2 * 32 * 32 * 16 * 16 * 9:,}"]
    assert row(tree, "(model)")[2:4] == [f"{p.total_params:,}", f"{p.total_macs:,}"]
    assert row(tree, "layer1.0.conv1")[2:4] == row(leaves, "layer1.0.conv1")[2:4]  # leaves are the same
    assert p.subtree("layer1") == (14_016, 6 * 32 * 32 * 16 * 16 * 9)
