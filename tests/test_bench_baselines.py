"""Dense alternatives at equal MACs (``compconv.bench.baselines``): within 3% of the target, dense, runnable."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compconv import convert, profile
from compconv.bench.baselines import dense_baselines, magnitude_pruned, width_scaled
from compconv.layers.base import CompactConv2d
from compconv.serialization import build_base

pytest.importorskip("torch_pruning")


pytestmark = pytest.mark.usefixtures("one_thread")


def _target(name: str, size: int) -> tuple[nn.Module, int]:
    host = build_base(name, num_classes=10)
    comp = convert(copy.deepcopy(host), "compconv", c0=128)
    return host, profile(comp, (1, 3, size, size)).total_macs


@pytest.mark.parametrize(("name", "width_method"), [
    ("cifar_resnet20", "width_knob"),       # CifarResNet(widths=...)
    ("resnet18", "torch_pruning_uniform"),  # torchvision ResNet: no width knob
    ("mobilenet_v2", "width_knob"),         # torchvision width_mult
])
def test_both_baselines_land_within_3_percent_of_the_converted_models_macs(name: str, width_method: str) -> None:
    size = 32
    host, target = _target(name, size)
    host_macs = profile(host, (1, 3, size, size)).total_macs
    assert target < host_macs
    got = dense_baselines(name, target, (2, 3, size, size), host_kwargs={"num_classes": 10})
    assert set(got) == {"width", "prune"}
    for kind, (model, rec) in got.items():
        macs = profile(model, (1, 3, size, size)).total_macs  # counted again, independently of the record
        assert rec.macs == macs and rec.target_macs == target and rec.host_macs == host_macs
        assert abs(macs / target - 1) <= 0.03, (kind, macs, target)
        assert rec.rel_error == pytest.approx(macs / target - 1)
        assert rec.kind == kind and rec.params == sum(p.numel() for p in model.parameters())
        # a plain dense model: only nn.Conv2d convs, none of them compact
        assert not any(isinstance(m, CompactConv2d) for m in model.modules())
        with torch.no_grad():
            assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, 10)
    assert got["width"][1].method == width_method
    assert got["prune"][1].method == "torch_pruning_magnitude" and 0 < got["prune"][1].value < 1


def test_width_scaled_cifar_resnet_scales_every_stage() -> None:
    host, target = _target("cifar_resnet20", 32)
    model, rec = width_scaled(host, target, (1, 3, 32, 32))  # a module: recognised by its type
    w = rec.value
    widths = [s[0].conv2.out_channels for s in (model.layer1, model.layer2, model.layer3)]
    assert widths == [round(w * 16), round(w * 32), round(w * 64)]
    assert len(model.layer1) == 3 and model.fc.out_features == 10  # same depth, same classifier


def test_prune_keeps_the_classifier_and_the_cifar_residual_stream() -> None:
    host, target = _target("cifar_resnet20", 32)
    model, rec = magnitude_pruned("cifar_resnet20", target, (1, 3, 32, 32), host_kwargs={"num_classes": 10})
    assert model.fc.out_features == 10 and model.fc.in_features == 64  # the option-A stream is not pruned
    assert model.conv1.out_channels == 16
    inner = [b.conv1.out_channels for b in model.layer3]
    assert all(c < 64 for c in inner) and "inner channels" in rec.note


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1e6"])
def test_bad_targets_raise_naming_target_macs(bad: object) -> None:
    with pytest.raises(ValueError, match="target_macs must be a positive int"):
        width_scaled("cifar_resnet20", bad, (1, 3, 32, 32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target_macs must be a positive int"):
        magnitude_pruned("cifar_resnet20", bad, (1, 3, 32, 32))  # type: ignore[arg-type]


def test_a_target_above_the_host_or_out_of_reach_raises() -> None:
    host_macs = profile(build_base("cifar_resnet20"), (1, 3, 32, 32)).total_macs
    for fn in (width_scaled, magnitude_pruned):
        with pytest.raises(ValueError, match="above the host's"):
            fn("cifar_resnet20", host_macs + 1, (1, 3, 32, 32))
    # 1000 MACs: even width 0.01 (1 channel per stage) keeps the stem's 3*16*9*32*32 = 442,368 MACs
    with pytest.raises(ValueError, match="came only within"):
        width_scaled("cifar_resnet20", 1000, (1, 3, 32, 32))
    with pytest.raises(ValueError, match="kinds must be"):
        dense_baselines("cifar_resnet20", host_macs // 2, (1, 3, 32, 32), kinds=("thin",))
    with pytest.raises(ValueError, match="input_size"):
        width_scaled("cifar_resnet20", host_macs // 2, (3, 32, 32))


def test_group_norm_importance_prunes_a_trained_model_object_to_the_target_and_bad_names_raise() -> None:
    host, target = _target("cifar_resnet20", 32)
    before = {k: v.clone() for k, v in host.state_dict().items()}
    model, rec = magnitude_pruned(host, target, (1, 3, 32, 32), importance="group_norm")
    assert rec.method == "torch_pruning_group_norm" and "GroupMagnitudeImportance" in rec.note
    assert abs(rec.rel_error) <= 0.03
    assert all(torch.equal(v, host.state_dict()[k]) for k, v in before.items())  # the host is not changed
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="importance must be one of .*magnitude.*group_norm.*'l2'"):
        magnitude_pruned(host, target, (1, 3, 32, 32), importance="l2")


def test_a_float64_host_gets_float64_dense_alternatives_on_its_device() -> None:
    host = build_base("cifar_resnet20", num_classes=10).double()
    target = profile(host, (1, 3, 32, 32)).total_macs // 2
    got = dense_baselines(host, target, (1, 3, 32, 32))  # Torch-Pruning traced the float32 example: it failed
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for kind, (model, rec) in got.items():
        assert {p.dtype for p in model.parameters()} == {torch.float64}, kind
        assert abs(rec.rel_error) <= 0.03 and model(x).shape == (2, 10)
