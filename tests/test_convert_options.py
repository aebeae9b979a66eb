"""convert() never silently does nothing: options are checked once, before the model is walked or touched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compconv
from compconv import convert
from compconv.convert import check_options
from compconv.models import get_model

# (method, options, the option the error must name, what it must offer: allowed names/values or a close match)
BAD = [
    ("ghost", {"c0": 128}, "'c0'", "['act', 'dw_size', 'norm', 'ratio']"),
    ("compconv", {"detph": 2}, "'detph'", "Did you mean 'depth'"),
    ("compconv", {"dpeth": 2}, "'dpeth'", "Did you mean 'depth'"),
    ("ghost", {"raito": 3}, "'raito'", "Did you mean 'ratio'"),
    ("compconv", {"depth": -1}, "depth must be an int >= 0", "got -1"),
    ("compconv", {"identity": "bogus"}, "identity must be one of", "'fixed', 'group', 'random', 'conv'"),
    ("compconv", {"width_multiple": 0}, "width_multiple must be an int >= 1", "got 0"),
    ("compconv", {"depth": 2, "c0": 64}, "expected depth or c0", "depth=2, c0=64"),
    ("ghost", {"ratio": 0}, "ratio must be an int >= 1", "got 0"),
    ("ghost", {"dw_size": 2}, "dw_size must be an odd int", "got 2"),
    ("slimconv", {"split": 1}, "split must be an int >= 2", "got 1"),
    ("slimconv", {"k": 1.0}, "k must be 2s/3", "1.0"),
    ("xsepconv", {"variant": "q"}, "variant must be one of", "'standard', 'no2x2', 'b', 'p'"),
    ("xsepconv", {"activation": "gelu"}, "activation must be one of", "'relu', 'relu6', 'hardswish'"),
    ("hetconv", {"part": 0}, "part must be a positive int or 'pc'", "got 0"),
    ("hetconv", {"impl": "fast"}, "impl must be one of", "'exact', 'masked', 'dense'"),
    ("compconv", {"depth_from": "c_mid"}, "depth_from must be one of", "'c_in', 'c_out', 'block'"),
    ("ghost", {"depth_from": "c_out"}, "'depth_from'", "ratio"),
]


@pytest.mark.parametrize(("method", "opts", "names", "offers"), BAD, ids=[f"{m}-{o}" for m, o, _, _ in BAD])
def test_invalid_option_is_an_error_before_the_model_is_touched(method: str, opts: dict, names: str,
                                                                offers: str) -> None:
    model = get_model("cifar_resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as e:
        convert(model, method, **opts)
    assert names in str(e.value) and offers in str(e.value)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("method", "opts", "names", "offers"), BAD[:4] + BAD[8:9])
def test_invalid_option_through_get_model_fails_before_building(method: str, opts: dict, names: str,
                                                                offers: str) -> None:
    with pytest.raises(ValueError, match=names.replace("(", r"\(")):
        get_model("cifar_resnet20", method=method, method_options=opts)
    with pytest.raises(ValueError, match=names.replace("(", r"\(")):
        check_options(method, opts)


def test_get_model_method_options_without_method_is_an_error() -> None:
    with pytest.raises(ValueError, match="method_options .* given without a method"):
        get_model("cifar_resnet20", method_options={"c0": 16})


def test_get_model_method_options_may_carry_convert_arguments() -> None:
    m = get_model("cifar_resnet20", method="compconv", method_options={"c0": 16, "exclude": "layer3.*"})
    assert isinstance(m.layer2[0].conv1, compconv.CompConv2d) and type(m.layer3[0].conv1) is nn.Conv2d


def test_bad_override_option_is_named_with_its_selector() -> None:
    model = get_model("cifar_resnet20")
    with pytest.raises(ValueError, match=r"overrides\['layer3.\*'\]: unknown option 'detph'.*Did you mean 'depth'"):
        convert(model, "compconv", overrides={"layer3.*": {"detph": 1}})
    assert not any(isinstance(m, compconv.CompactConv2d) for m in model.modules())


@pytest.mark.parametrize(("method", "symbol", "name"), [("ghost", "s", "ratio"), ("ghost", "d", "dw_size"),
                                                    ("compconv", "C0", "c0"), ("compconv", "d", "depth")])
def test_a_papers_symbol_names_the_option_it_stands_for(method: str, symbol: str, name: str) -> None:
    """A reader of GhostNet types s=2 (the ratio) and of CompConv C0=128: the error says which option that is."""
    with pytest.raises(ValueError, match=rf"unknown option '{symbol}' for method '{method}'; its options are .*"
                                         rf"Did you mean '{name}'\? \(the paper's {symbol} is compconv's {name}\)"):
        convert(get_model("cifar_resnet20"), method, **{symbol: 2})


def test_override_depth_replaces_a_global_c0_and_back() -> None:
    # c0 and depth both chose d: an override that sets one replaces the other (no "both given" error).
    model = get_model("cifar_resnet20")
    _, rep = convert(model, "compconv", c0=16, overrides={"layer3.*": {"depth": 1}}, return_report=True)
    by = {r.name: r for r in rep.layers}
    # Eq. 6 with C0 = 16: layer2 C_in 32 -> d = floor(log2(32/16)) + 1 = 2; layer3 forced to 1.
    assert by["layer2.1.conv1"].depth == 2 and by["layer3.1.conv1"].depth == 1
    model = get_model("cifar_resnet20")
    _, rep = convert(model, "compconv", depth=1, overrides={"layer3.*": {"c0": 16}}, return_report=True)
    by = {r.name: r for r in rep.layers}
    # layer3 C_in 64 with C0 = 16: d = min(floor(log2(4)) + 1, 3) = 3; elsewhere depth 1.
    assert by["layer2.1.conv1"].depth == 1 and by["layer3.1.conv1"].depth == 3


def test_valid_options_that_some_layers_cannot_take_keep_those_layers_with_a_reason() -> None:
    # part=3 is a valid HetConv part; it divides none of ResNet-20's widths (16, 32, 64): every layer is
    # kept with the layer's reason, and the conversion says loudly that it converted nothing.
    model = get_model("cifar_resnet20")  # 19 convs: the stem + 3 stages x 3 blocks x 2 (identity shortcuts)
    with pytest.warns(UserWarning, match=r"converted 0 of 19 conv layers"):
        _, rep = convert(model, "hetconv", part=3, return_report=True)
    assert len(rep.converted) == 0
    assert all("part=3 must divide" in r.reason for r in rep.kept[1:] if r.kernel == (3, 3))


def test_bad_convert_arguments_are_named() -> None:
    model = get_model("cifar_resnet20")
    with pytest.raises(ValueError, match=r"input_size must be 4 positive ints"):
        convert(model, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match=r"input_size must be 4 positive ints"):
        convert(model, input_size=(1, 3, 32.7, 32))
    with pytest.raises(ValueError, match="keep_stem must be True or False"):
        convert(model, keep_stem="no")  # type: ignore[arg-type]
    assert not any(isinstance(m, compconv.CompactConv2d) for m in model.modules())


def test_every_method_accepts_its_own_defaults_and_names() -> None:
    import inspect

    for name in compconv.list_methods():
        cls = compconv.get_method(name)
        kw = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
        # every keyword-only hyper-parameter at its default is a valid option
        cls.validate_options({p.name: p.default for p in kw})


def _three_convs() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1),
                         nn.Conv2d(64, 256, 3, padding=1))


def _depths(**kw: object) -> list[int | None]:
    _, rep = convert(_three_convs(), "compconv", c0=32, return_report=True, **kw)  # type: ignore[arg-type]
    return [r.depth for r in rep.layers]


def test_depth_from_in_overrides_applies_to_the_matched_layers_only() -> None:
    # Eq. 6, d = min(floor(log2(C / c0)) + 1, 3) with c0 = 32 (the stem is kept: depth None):
    #   "1" (32 -> 64):  C_in 32 -> 1;  C_out 64 -> 2
    #   "2" (64 -> 256): C_in 64 -> 2;  C_out 256 -> min(log2(8) + 1, 3) = 3
    assert _depths() == [None, 1, 2]
    assert _depths(depth_from="c_out") == [None, 2, 3]
    assert _depths(overrides={"*": {"depth_from": "c_out"}}) == [None, 2, 3]  # was ignored: [None, 1, 2]
    assert _depths(overrides={"2": {"depth_from": "c_out"}}) == [None, 1, 3]
    assert _depths(depth_from="c_out", overrides={"1": {"depth_from": "c_in"}}) == [None, 1, 3]
    with pytest.raises(ValueError, match=r"overrides\['\*'\]: depth_from must be one of"):
        _depths(overrides={"*": {"depth_from": "c_mid"}})


@pytest.mark.parametrize("arg", ["keep_stem", "convert_1x1", "include", "exclude", "input_size", "hardware_aware",
                                 "overrides", "verbose", "return_report", "timer"])
def test_a_whole_model_argument_inside_overrides_is_an_error_naming_it(arg: str) -> None:
    model = _three_convs()
    with pytest.raises(ValueError, match=rf"overrides\['\*'\]: '{arg}' is an argument of convert\(\) for the "
                                         r"whole model, not a per-layer option"):
        convert(model, "compconv", overrides={"*": {arg: False}})
    assert all(type(m) is nn.Conv2d for m in model)


def test_xsepconv_override_of_activation_and_padding_survives_the_network_level_steps() -> None:
    # finalize_conversion gives every XSepConv its host's activation and the rotating padding; a layer whose
    # override fixed them keeps the override (it was silently reset while the report showed the override).
    def net() -> nn.Sequential:
        dw = [m for _ in range(2) for m in (nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())]
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *dw)

    with pytest.warns(UserWarning, match="more expensive"):
        plain = convert(net(), "xsepconv")
    assert (plain[1].activation, plain[1].pad_direction) == ("relu", "RB")  # host's ReLU, 1st of the rotation
    with pytest.warns(UserWarning, match="more expensive"):
        m, rep = convert(net(), "xsepconv", overrides={"1": {"activation": "hardswish", "pad_direction": "LT"}},
                         return_report=True)
    assert (m[1].activation, m[1].pad_direction) == ("hardswish", "LT")
    assert isinstance(m[1].act1, nn.Hardswish)
    assert rep.layers[1].options == {"activation": "hardswish", "pad_direction": "LT"}
    assert (m[4].activation, m[4].pad_direction) == ("relu", "LT")  # not overridden: 2nd of RB, LT, LB, RT


def test_bad_include_and_exclude_name_the_argument_and_the_selector_types() -> None:
    model = _three_convs()
    with pytest.raises(TypeError, match=r"include must be a str pattern, an nn.Module, a module type or a "
                                        r"callable \(name, module\) -> bool, or a list of them, but got int 2"):
        convert(model, include=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"exclude selectors must be .* but got float 1.5"):
        convert(model, exclude=["1", 1.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"include=\[\] selects nothing"):
        convert(model, include=[])
    with pytest.raises(ValueError, match=r"exclude=\[\] selects nothing"):
        convert(model, exclude=())
    with pytest.raises(TypeError, match=r"called as sel\(name, module\) -> bool"):
        convert(model, include=lambda name: True)  # type: ignore[arg-type, misc]
    with pytest.raises(TypeError, match=r"called as sel\(name, module\) -> bool"):
        convert(model, overrides={lambda: True: {"depth": 1}})  # type: ignore[dict-item]
    assert all(type(m) is nn.Conv2d for m in model)
    # a list, tuple or generator of selectors still works
    _, rep = convert(model, "compconv", depth=1, include=(s for s in ["2"]), return_report=True)
    assert [r.action for r in rep.layers] == ["kept", "kept", "converted"]
