"""profile(): per-layer and total params/MACs, checked against torch.utils.flop_counter and numel()."""

from __future__ import annotations

import json

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
