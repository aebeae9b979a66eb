"""The model zoo registry and its builders."""

from __future__ import annotations

import pytest
import torch

from compconv import CompConv2d, profile
from compconv.models import get_model, list_models, register_model


def test_registry_lists_filters_and_refuses_duplicates() -> None:
    names = list_models()
    assert names == sorted(names)
    for n in ("cifar_vgg16", "cifar_resnet18", "cifar_resnet50", "cifar_resnet20", "cifar_resnet56", "resnet50",
              "comp128_resnet50", "comp128_cifar_vgg16", "comp_vgg16_d3", "comp_vgg16_1s_d1", "comp_vgg16_5s_d2"):
        assert n in names
    expected = {f"comp{c}_resnet50" for c in (32, 64, 128, 256, 512)}
    assert set(list_models("comp*_resnet50", exclude="*cifar*")) == expected
    assert "resnet50" not in list_models(exclude="*resnet*")
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet50")(lambda: None)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet5'.*Did you mean"):
        get_model("resnet5")


CIFAR_MODELS = ["cifar_vgg16", "cifar_resnet18", "cifar_resnet20", "cifar_resnet56", "comp128_cifar_vgg16",
                "comp32_cifar_resnet20", "comp_vgg16_d4", "comp_vgg16_1s_d2", "comp_vgg16_5s_d3"]


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_models_build_and_run(name: str) -> None:
    model = get_model(name, num_classes=7).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_comp_variants_are_cheaper_and_keep_the_stem() -> None:
    base = profile(get_model("cifar_resnet50"), (1, 3, 32, 32))
    comp = get_model("comp128_cifar_resnet50")
    assert not isinstance(comp.conv1, CompConv2d) and isinstance(comp.layer1[0].conv1, CompConv2d)
    p = profile(comp, (1, 3, 32, 32))
    assert p.total_macs < base.total_macs / 2 and p.total_params < base.total_params / 2


def test_resnet20_matches_he_et_al() -> None:
    p = profile(get_model("cifar_resnet20"), (1, 3, 32, 32))
    assert round(p.total_params / 1e6, 2) == 0.27  # He et al. 2016, Table 6: 0.27M
    with pytest.raises(ValueError, match="6n\\+2"):
        from compconv.models.cifar_resnet import CifarResNet

        CifarResNet(21)


def test_get_model_with_method_converts() -> None:
    m = get_model("cifar_resnet20", method="compconv", method_options={"c0": 16})
    assert isinstance(m.layer3[0].conv1, CompConv2d) and m.layer3[0].conv1.depth == 2  # C_in 32, C0 16 -> d=2
