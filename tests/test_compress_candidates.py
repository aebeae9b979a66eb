"""Candidates and their exact cost (compconv.compress.candidates)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import compconv
from compconv.compress.candidates import find_layers, layer_candidates, option_ladder

pytestmark = pytest.mark.usefixtures("one_thread")


def _flop_macs(module: nn.Module, shape: tuple[int, ...]) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        module.eval()(torch.zeros(shape))
    return fc.get_total_flops() // 2


def test_ladders():
    dense = nn.Conv2d(16, 32, 3, padding=1)
    assert option_ladder("compconv", dense) == [{"depth": 1}, {"depth": 2}, {"depth": 3}]
    assert option_ladder("ghost", dense) == [{"ratio": r} for r in (2, 3, 4, 6, 8)]
    assert option_ladder("hetconv", dense) == [{"part": p} for p in (2, 4, 8, 16)]  # divisors of gcd(16, 32) > 1
    assert option_ladder("slimconv", nn.Conv2d(6, 6, 3)) == [{"split": 2}, {"split": 3}]  # C_in >= 2 split
    with pytest.raises(ValueError, match="ladder="):
        option_ladder("nosuch", dense)


def test_resnet20_costs_by_hand_and_flop_counter():
    model = compconv.get_model("cifar_resnet20")
    layers = find_layers(model, (1, 3, 32, 32))
    assert "conv1" not in layers  # the stem is kept
    assert list(layers)[0] == "layer1.0.conv1" and layers["layer1.0.conv1"] == (1, 16, 32, 32)
    cands = {lc.name: lc for lc in layer_candidates(model, "compconv", layers)}
    lc = cands["layer1.0.conv1"]
    labels = [c.label for c in lc.candidates]
    # 16 -> 16, d=3: C_prim = ceil(16/14) = 2 gives 2*2*7 = 28 channels, surplus 12; A_0 (4*2 = 8) absorbs
    # 8, the remaining 4 exceed T_1's 2 identity channels: CompConv cannot build it, so it is not offered
    assert labels == ["keep", "depth=1", "depth=2"]
    # keep: 32*32 pixels * 16 out * 16 in * 9 = 2,359,296 MACs; 16*16*9 = 2304 params
    assert (lc.keep.macs, lc.keep.params) == (2_359_296, 2_304)
    # d=1: C_prim = 8; W_1 16->8 3x3 (8*16*9 = 1152) + tail DW 8 channels 3x3 (72): 1224 params, x1024 pixels
    d1 = lc.candidates[1]
    assert (d1.params, d1.macs) == (1_224, 1_224 * 1024)
    conv = model.get_submodule("layer1.0.conv1")
    for cand in lc.candidates[1:]:
        mod = compconv.get_method("compconv").from_conv(conv, **cand.options)
        assert cand.macs == _flop_macs(mod, lc.in_shape)


@pytest.mark.parametrize("method", ["ghost", "hetconv"])
def test_peer_costs_match_flop_counter(method):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1))
    layers = find_layers(model, (1, 3, 16, 16))
    assert layers == {"1": (1, 8, 16, 16)}
    (lc,) = layer_candidates(model, method, layers)
    cls = compconv.get_method(method)
    for cand in lc.candidates[1:]:
        mod = cls.from_conv(model[1], **cand.options)
        assert cand.macs == _flop_macs(mod, lc.in_shape)
    if method == "ghost":
        # ratio 2: primary 8 ch: 8*8*9 = 576 per pixel, 8 ghosts DW 3x3: 72 per pixel; 8x8 output pixels
        assert lc.candidates[1].macs == (576 + 72) * 64


def test_exclude_and_keep_stem():
    model = compconv.get_model("cifar_resnet20")
    all_layers = find_layers(model, (1, 3, 32, 32), keep_stem=False)
    assert "conv1" in all_layers and len(all_layers) == 19
    some = find_layers(model, (1, 3, 32, 32), exclude="layer3.*")
    assert not any(n.startswith("layer3") for n in some) and len(some) == 12
