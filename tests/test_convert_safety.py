"""convert() decides everything before it swaps: errors leave the model as it was; pointless runs say so."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compconv
from compconv import convert
from compconv.layers.ghost import GhostConv2d
from compconv.models import get_model


def _state(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor]]:
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, state: tuple[list[type], dict[str, torch.Tensor]]) -> None:
    types, sd = state
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(sd[k], now[k]) for k in sd)


@pytest.mark.parametrize("kwargs", [
    {"exclude": "typo*"},
    {"include": ["layer1.*", "layer9.*"]},
    {"overrides": {"layer3.*": {"depth": 1}, "layr2.*": {"depth": 2}}},
])
def test_an_unmatched_selector_fails_before_any_layer_is_swapped(kwargs: dict) -> None:
    model = get_model("cifar_resnet20")
    state = _state(model)
    with pytest.raises(ValueError, match="matched no conv layer"):
        convert(model, "compconv", c0=16, **kwargs)
    _assert_unchanged(model, state)


def test_a_selector_of_the_wrong_type_fails_before_any_layer_is_swapped() -> None:
    model = get_model("cifar_resnet20")
    state = _state(model)
    with pytest.raises(TypeError, match=r"exclude selectors must be a str pattern, .* a callable .* got int 3"):
        convert(model, "compconv", exclude=["layer1.*", 3])  # type: ignore[list-item]
    _assert_unchanged(model, state)


@pytest.mark.parametrize("keep_stem", [True, False])
def test_converting_a_converted_model_is_a_no_op_with_a_report(keep_stem: bool) -> None:
    model = get_model("cifar_resnet20")
    convert(model, "compconv", c0=16, keep_stem=keep_stem)
    state = _state(model)
    # ResNet-20: 19 convs (stem + 3 stages x 3 blocks x 2).
    with pytest.warns(UserWarning, match="converted 0 of 19 conv layers"):
        _, rep = convert(model, "compconv", c0=16, keep_stem=keep_stem, return_report=True)
    _assert_unchanged(model, state)
    assert len(rep.layers) == 19 and not rep.converted
    done = [r for r in rep.layers if r.reason == "already converted (CompConv2d)"]
    assert len(done) == (18 if keep_stem else 19)
    if keep_stem:
        assert rep.layers[0].reason.startswith("stem conv")
    # Another method does not replace a compact conv either.
    with pytest.warns(UserWarning, match="converted 0 of 19"):
        _, rep = convert(model, "ghost", keep_stem=True, return_report=True)
    assert sum(r.reason.startswith("already converted") for r in rep.layers) == (18 if keep_stem else 19)


def test_a_model_without_convs_is_an_error() -> None:
    with pytest.raises(ValueError, match="model has no nn.Conv2d layers"):
        convert(nn.Sequential(nn.Linear(4, 4)), "compconv")
    with pytest.raises(ValueError, match=r"model is itself a Conv2d; wrap it \(nn.Sequential\(conv\)\)"):
        convert(nn.Conv2d(4, 4, 3), "compconv")


def test_an_input_size_the_model_cannot_run_fails_before_the_swap() -> None:
    model = get_model("cifar_resnet20")
    state = _state(model)
    with pytest.raises(ValueError, match=r"forward at input_size=\(1, 4, 32, 32\) failed before any layer"):
        convert(model, "compconv", c0=16, input_size=(1, 4, 32, 32))  # 4 channels into a 3-channel stem
    _assert_unchanged(model, state)


def test_a_changed_output_shape_is_caught_and_the_swap_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    build = GhostConv2d.from_conv.__func__  # type: ignore[attr-defined]

    def wrong_stride(cls: type, conv: nn.Conv2d, **hp: object) -> GhostConv2d:
        new = build(cls, conv, **hp)
        if conv.in_channels == 32 and conv.out_channels == 32:
            new.primary.stride = (2, 2)  # a replacement that halves the map: must never pass silently
        return new

    monkeypatch.setattr(GhostConv2d, "from_conv", classmethod(wrong_stride))
    model = get_model("cifar_resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    state = _state(model)
    with pytest.raises(ValueError, match=r"layer 'layer2.0.conv2'.*\(1, 32, 8, 8\).*\(1, 32, 16, 16\).*restored"):
        convert(model, "ghost", input_size=(1, 3, 32, 32))
    _assert_unchanged(model, state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_a_conversion_that_converts_nothing_warns_with_the_reasons() -> None:
    model = get_model("cifar_resnet20")
    with pytest.warns(UserWarning, match=r"converted 0 of 19 conv layers; the model is unchanged.*dense conv"):
        _, rep = convert(model, "xsepconv", return_report=True)  # no depthwise conv in ResNet-20
    assert len(rep.converted) == 0  # what the trainer tests to refuse such a run


def test_a_conversion_that_raises_macs_warns_with_the_totals() -> None:
    # SlimConv on a depthwise host (as in EfficientNet's conv_dw): its SE, 1x1 and projection cost more than
    # the depthwise 3x3 it replaces.
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1, groups=32))
    with pytest.warns(UserWarning, match="made the model more expensive") as rec:
        _, rep = convert(model, "slimconv", input_size=(1, 3, 16, 16), return_report=True)
    # Before, by hand: stem 16*16*32*3*9 = 221,184; depthwise 16*16*32*1*9 = 73,728; total 294,912.
    t = rep.totals()
    after = 16 * 16 * 32 * 3 * 9 + compconv.profile(model[1], (1, 32, 16, 16)).total_macs
    assert t["macs_before"] == 294_912 and t["macs_after"] == after > 294_912
    msg = str(rec[0].message)
    assert f"294,912 -> {after:,}" in msg and f"1 73,728 -> {after - 221_184:,}" in msg


def test_a_cheaper_conversion_does_not_warn() -> None:
    import warnings

    model = get_model("cifar_resnet20")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(model, "compconv", c0=16, input_size=(1, 3, 32, 32))
