"""convert(): rules, selectors, overrides, the report, and every torchvision family."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import compconv
from compconv import CompConv2d, convert
from compconv.models import get_model


def _convs(model: nn.Module) -> dict[str, nn.Module]:
    """The model's conv slots (not the inner convs of a CompConv2d)."""
    out: dict[str, nn.Module] = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, CompConv2d)) and not any(n.startswith(p + ".") for p in out):
            out[n] = m
    return out


def test_paper_rule_on_resnet50_keeps_only_the_stem_and_reports_every_conv() -> None:
    model = get_model("resnet50")
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    out, report = convert(model, "compconv", c0=128, return_report=True)
    assert out is model and type(out).__name__ == "ResNet"  # in place, own type kept
    assert len(report.layers) == n_convs == 53
    assert [r.name for r in report.kept] == ["conv1"] and report.kept[0].reason.startswith("stem conv")
    assert isinstance(model.layer1[0].conv2, CompConv2d) and isinstance(model.layer4[0].downsample[0], CompConv2d)
    by_name = {r.name: r for r in report.layers}
    # Eq. 6 with C0 = 128 on C_in: 64 -> d=1, 256 -> d=2, 512 -> d=3 (and capped at 3 above).
    assert by_name["layer1.0.conv1"].depth == 1 and by_name["layer2.0.conv1"].depth == 2
    assert by_name["layer3.0.conv1"].depth == 3 and by_name["layer4.0.conv1"].depth == 3
    r = by_name["layer4.0.conv2"]  # 512 -> 512, d=3: C_prim = ceil(512 / 14) = 37
    assert (r.c_prim, r.params_before, r.params_after) == (37, 512 * 512 * 9,
                                                           sum(p.numel() for p in model.layer4[0].conv2.parameters()))


def test_report_has_macs_when_input_size_given() -> None:
    model = get_model("cifar_resnet20")
    _, report = convert(model, "compconv", c0=16, input_size=(1, 3, 32, 32), return_report=True)
    tot = report.totals()
    assert tot["macs_before"] > tot["macs_after"] > 0
    stem = report.layers[0]
    assert stem.macs_before == stem.macs_after == 32 * 32 * 16 * 3 * 9
    text = str(report)
    assert "stem conv" in text and "MACs" in text and "layer3.2.conv2" in text
    assert report.to_dict()["totals"] == tot


def test_depthwise_and_grouped_convs_are_kept_with_reason() -> None:
    model = torchvision.models.mobilenet_v2(num_classes=10)
    _, report = convert(model, "compconv", return_report=True)
    dw = [r for r in report.layers if r.groups > 1]
    assert dw and all(r.action == "kept" and "depthwise" in r.reason for r in dw)
    assert any(r.action == "converted" for r in report.layers)


def test_convert_1x1_false_keeps_pointwise_convs() -> None:
    model = get_model("resnet18")
    _, report = convert(model, "compconv", convert_1x1=False, return_report=True)
    for r in report.layers:
        if r.kernel == (1, 1):
            assert r.action == "kept" and "1x1" in r.reason


def test_include_exclude_selectors() -> None:
    model = get_model("cifar_resnet20")
    convert(model, include="layer3.*", exclude=["*.conv2"])
    conv = _convs(model)
    assert all(isinstance(m, CompConv2d) == (n.startswith("layer3") and n.endswith("conv1")) for n, m in conv.items())
    # A module object selects itself and its children; a type selects by isinstance; a callable decides.
    model = get_model("cifar_resnet20")
    convert(model, include=model.layer2[0])
    assert {n for n, m in _convs(model).items() if isinstance(m, CompConv2d)} == {"layer2.0.conv1", "layer2.0.conv2"}
    model = get_model("cifar_resnet20")
    convert(model, exclude=lambda name, m: m.out_channels == 64)
    assert all(isinstance(m, CompConv2d) == (m.out_channels != 64 and n != "conv1") for n, m in _convs(model).items())


def test_selector_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="matched no conv layer"):
        convert(get_model("cifar_resnet20"), include="layer9.*")
    # a name in include and in overrides is listed once; a long list is cut
    names = [f"layer{i}.9.conv1" for i in range(1, 11)]
    with pytest.raises(ValueError, match=r"matched no conv layer: \['layer1.9.conv1', .*'layer8.9.conv1'\] and 2 "
                                         r"more \(conv names") as e:
        convert(get_model("cifar_resnet20"), include=names, overrides={n: {"depth": 1} for n in names})
    assert str(e.value).count("'layer1.9.conv1'") == 1


def test_overrides_set_per_layer_options() -> None:
    model = get_model("cifar_vgg16")
    convert(model, c0=128, overrides={"features.40": {"depth": 1}, "features.3": {"identity": "conv", "depth": 2}})
    assert model.features[40].depth == 1 and model.features[37].depth == 3
    assert model.features[3].identity == "conv" and model.features[3].depth == 2


def test_depth_is_lowered_when_a_layer_is_too_narrow() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(4, 64, 3, padding=1))
    _, report = convert(model, depth=3, return_report=True)
    # C_in = 4 is below the widest identity slice at d=3 (2 * C_prim = 10) and d=2 (C_prim = 11) -> d=1.
    last = report.layers[2]
    assert last.action == "converted" and last.depth == 1 and "lowered 3->1" in last.reason
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 64, 8, 8)


def test_bad_method_and_options() -> None:
    with pytest.raises(ValueError, match="unknown method 'compcnv'.*Did you mean 'compconv'"):
        convert(get_model("cifar_resnet20"), "compcnv")
    with pytest.raises(ValueError, match="depth_from must be one of"):
        convert(get_model("cifar_resnet20"), depth_from="c_mid")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert("resnet", "compconv")  # type: ignore[arg-type]


def test_depth_from_readings_change_depths_as_documented() -> None:
    def depths(**kw: object) -> dict[str, int]:
        m = get_model("resnet50")
        _, rep = convert(m, c0=128, return_report=True, **kw)
        return {r.name: r.depth for r in rep.converted}

    c_in, c_out, block = depths(), depths(depth_from="c_out"), depths(depth_from="block")
    # layer1.0.conv3: 64 -> 256. From C_in d=1; from C_out d=2; the block's width (conv2's C_in = 64) d=1.
    assert (c_in["layer1.0.conv3"], c_out["layer1.0.conv3"], block["layer1.0.conv3"]) == (1, 2, 1)
    # layer2.0.conv1: 256 -> 128 (width 128): d = 2, 1, 1.
    assert (c_in["layer2.0.conv1"], c_out["layer2.0.conv1"], block["layer2.0.conv1"]) == (2, 1, 1)


# One small member of every torchvision classification family (grouped convs: ResNeXt, RegNet; depthwise:
# MobileNet, EfficientNet, MNASNet, ShuffleNet, ConvNeXt; concatenations: DenseNet, GoogLeNet, SqueezeNet).
FAMILIES = ["resnet18", "resnext50_32x4d", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small", "densenet121",
            "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x0_5", "squeezenet1_0", "mnasnet0_5",
            "googlenet", "convnext_tiny", "alexnet"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_every_torchvision_family_converts_and_trains(arch: str) -> None:
    kw = {"aux_logits": False, "init_weights": False} if arch == "googlenet" else {}
    model = torchvision.models.get_model(arch, num_classes=10, **kw)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval()(x).shape
    _, report = convert(model, "compconv", c0=64, return_report=True)
    assert report.converted, f"{arch}: nothing converted"
    model.train()
    y = model(x)
    assert y.shape == expected
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_detection_model_converts() -> None:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=160)
    x = torch.randn(1, 3, 128, 128)
    body = model.backbone
    with torch.no_grad():
        before = {k: v.shape for k, v in body.eval()(x).items()}
    _, report = convert(model, "compconv", c0=128, return_report=True)
    assert any(r.name.startswith("backbone.body.layer") and r.action == "converted" for r in report.layers)
    with torch.no_grad():
        after = {k: v.shape for k, v in body(x).items()}
    assert after == before
    model.train()
    losses = model([x[0]], [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        assert "boxes" in model([x[0]])[0]


def test_public_api_is_exported() -> None:
    for name in ("convert", "profile", "CompConv2d", "get_model", "list_models", "list_methods", "get_method"):
        assert hasattr(compconv, name)


def test_plain_convert_runs_the_methods_network_level_steps() -> None:
    from compconv.layers.xsepconv import DIRECTION_ORDER, XSepConv2d

    model = convert(torchvision.models.mobilenet_v3_small(num_classes=10), "xsepconv")
    layers = [m for m in model.modules() if isinstance(m, XSepConv2d)]
    assert len(layers) >= 4
    assert [m.pad_direction for m in layers] == [DIRECTION_ORDER[i % 4] for i in range(len(layers))]
    fixed = convert(torchvision.models.mobilenet_v3_small(num_classes=10), "xsepconv", pad_direction="LT")
    assert {m.pad_direction for m in fixed.modules() if isinstance(m, XSepConv2d)} == {"LT"}


def test_overrides_must_be_a_dict_of_dicts() -> None:
    with pytest.raises(TypeError, match="overrides must be a dict"):
        convert(get_model("cifar_resnet20"), overrides=[("layer1.*", {"depth": 1})])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"overrides\['layer1.\*'\] must be a dict"):
        convert(get_model("cifar_resnet20"), overrides={"layer1.*": 1})  # type: ignore[dict-item]
