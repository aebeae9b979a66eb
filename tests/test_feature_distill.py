"""Feature distillation (``compconv.train.features``): module choice, the loss, its errors, and the trainer."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import compconv
from compconv.models import get_model
from compconv.train.config import TrainConfig
from compconv.train.features import FeatureDistill, resolve_feature_layers
from train_helpers import REPO, needs_cifar, tiny_config

BLOCKS = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
PROBE = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = get_model("cifar_resnet20", num_classes=10).eval()
    student = compconv.convert(copy.deepcopy(teacher), "compconv", c0=16)
    return student, teacher


def test_auto_picks_every_block_output_of_a_converted_resnet() -> None:
    student, teacher = _pair()
    assert resolve_feature_layers(student, teacher, "auto", PROBE) == BLOCKS


def test_auto_keeps_only_the_blocks_whose_shapes_match() -> None:
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()))
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()))
    # one top-level Sequential, "body": its child "0" differs (4 vs 8 channels), "1" matches
    t, s = nn.Module(), nn.Module()
    t.body, s.body = teacher, student
    t.forward = lambda x: t.body(x)  # type: ignore[method-assign]
    s.forward = lambda x: s.body(x)  # type: ignore[method-assign]
    assert resolve_feature_layers(s, t, "auto", PROBE) == ["body.1"]


def test_auto_without_a_shared_block_names_the_way_out() -> None:
    t = nn.Conv2d(3, 8, 3)
    with pytest.raises(ValueError, match=r"distill_features='auto' found no block output.*no candidates.*--distill"):
        resolve_feature_layers(nn.Conv2d(3, 8, 3), t, "auto", PROBE)
    teacher = nn.Sequential(nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())), nn.Flatten())
    student = nn.Sequential(nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), nn.Flatten())
    refused = (r"candidates refused: \{'0\.0': 'output shapes differ \(student \(2, 4, 30, 30\), "
               r"teacher \(2, 8, 30, 30\)\)'\}")
    with pytest.raises(ValueError, match=refused):
        resolve_feature_layers(student, teacher, "auto", PROBE)


def test_auto_never_picks_single_layers_and_takes_stage_ends_across_depths() -> None:
    import torchvision

    torch.manual_seed(0)
    vgg = get_model("cifar_vgg16", num_classes=10).eval()  # a plain stack: the pooling outputs (stage ends)
    pools = [f"features.{i}" for i, m in enumerate(vgg.features) if isinstance(m, nn.MaxPool2d)]
    assert resolve_feature_layers(copy.deepcopy(vgg), vgg, "auto", PROBE) == pools
    mnet = torchvision.models.mobilenet_v2(num_classes=10).eval()  # blocks, never classifier.0/1 (Dropout, Linear)
    assert resolve_feature_layers(copy.deepcopy(mnet), mnet, "auto", PROBE) == [f"features.{i}" for i in range(19)]
    # ResNet-56 student of a ResNet-20 teacher: blocks are not paired by position, the stage ends are
    deeper = get_model("cifar_resnet56", num_classes=10)
    assert resolve_feature_layers(deeper, get_model("cifar_resnet20", num_classes=10), "auto", PROBE) == \
        ["layer1", "layer2", "layer3"]


def test_explicit_names_are_checked_in_both_models() -> None:
    student, teacher = _pair()
    assert resolve_feature_layers(student, teacher, ["layer2.1", "layer3"], PROBE) == ["layer2.1", "layer3"]
    with pytest.raises(ValueError, match=r"distill_features: the student has no module \['layer4'\]"):
        resolve_feature_layers(student, teacher, ["layer1", "layer4"], PROBE)
    other = get_model("cifar_resnet20", num_classes=10)
    other.fc = nn.Linear(64, 5)
    with pytest.raises(ValueError, match=r"cannot be distilled: \{'fc': 'output shapes differ "
                       r"\(student \(2, 5\), teacher \(2, 10\)\)'\}"):
        resolve_feature_layers(other, teacher, ["layer3", "fc"], PROBE)
    with pytest.raises(ValueError, match=r"'layer1\.0\.relu': 'runs 2 times per forward'"):
        resolve_feature_layers(student, teacher, ["layer1.0.relu"], PROBE)  # a ReLU module used twice per block
    with pytest.raises(ValueError, match=r"modules named more than once: \['layer2'\]"):
        resolve_feature_layers(student, teacher, ["layer2", "layer3", "layer2"], PROBE)
    with pytest.raises(ValueError, match="'auto' or a list of module names"):
        resolve_feature_layers(student, teacher, "blocks", PROBE)
    with pytest.raises(ValueError, match="non-empty list"):
        resolve_feature_layers(student, teacher, [], PROBE)


def test_an_output_overwritten_in_place_is_refused_and_modes_are_restored() -> None:
    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True))

    student, teacher = net(), net().eval()
    student[1].eval()  # a frozen BN in a training student: resolving must not unfreeze it
    with pytest.raises(ValueError, match=r"'1': 'its output is overwritten in place by a later op"):
        resolve_feature_layers(student, teacher, ["1"], PROBE)
    assert student.training and not student[1].training and student[0].training
    assert resolve_feature_layers(student, teacher, ["2"], PROBE) == ["2"]
    fd = FeatureDistill(student, teacher, ["1"])  # built directly, unchecked: the step refuses it too
    with fd:
        student(PROBE)
        with torch.no_grad():
            teacher(PROBE)
        with pytest.raises(RuntimeError, match="overwritten in place"):
            fd.loss()


def test_an_all_zero_teacher_output_counts_the_absolute_error() -> None:
    student, teacher = nn.Sequential(nn.Conv2d(3, 4, 1)), nn.Sequential(nn.Conv2d(3, 4, 1))
    nn.init.zeros_(teacher[0].weight)
    nn.init.zeros_(teacher[0].bias)
    fd = FeatureDistill(student, teacher, ["0"])
    with fd:
        s = student(PROBE)
        teacher(PROBE)
        assert fd.loss().item() == pytest.approx(s.pow(2).sum().item(), rel=1e-6)


def test_the_loss_is_the_mean_relative_squared_error_and_trains_only_the_student() -> None:
    student, teacher = _pair()
    student.train()
    fd = FeatureDistill(student, teacher, ["layer1.2", "layer3"])
    x = torch.randn(4, 3, 32, 32)
    with fd:
        student(x)
        with torch.no_grad():
            teacher(x)
        loss = fd.loss()
    with torch.no_grad():
        t1 = teacher.layer1(teacher.relu(teacher.bn1(teacher.conv1(x))))
        t3 = teacher.layer3(teacher.layer2(t1))
    st = student.train()
    s1 = st.layer1(st.relu(st.bn1(st.conv1(x))))
    s3 = st.layer3(st.layer2(s1))
    hand = (((s1 - t1) ** 2).sum() / (t1**2).sum() + ((s3 - t3) ** 2).sum() / (t3**2).sum()) / 2
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_identical_models_give_zero_and_nothing_is_recorded_outside_a_step() -> None:
    torch.manual_seed(0)
    teacher = get_model("cifar_resnet20", num_classes=10).eval()
    student = copy.deepcopy(teacher)
    fd = FeatureDistill(student, teacher, BLOCKS)
    x = torch.randn(2, 3, 32, 32)
    student(x)  # an evaluation-like forward outside the step: not kept
    assert not fd._s and not fd._t
    with pytest.raises(RuntimeError, match="did not run in this step's forward"), fd:
        fd.loss()
    with fd:
        student(x)
        teacher(x)
        assert fd.loss().item() == 0.0
    fd.remove()
    with fd:
        student(x)
    assert not fd._s


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"distill_features": "auto"}, "without a teacher"),
        ({"distill_features": "layer1", "teacher": "t"}, "'auto' or a non-empty list"),
        ({"distill_features": [], "teacher": "t"}, "'auto' or a non-empty list"),
        ({"distill_features": "auto", "teacher": "t", "compile": True}, "compile=True"),
        ({"distill_feature_weight": 0.0}, "distill_feature_weight must be a finite number > 0"),
        ({"distill_feature_weight": float("nan")}, "distill_feature_weight must be a finite number > 0"),
        ({"distill_feature_weight": 2.0, "teacher": "t"}, "distill_feature_weight given without distill_features"),
    ],
)
def test_bad_settings_are_refused_by_name(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw).validate()


def test_the_cli_flag_and_config_overrides_parse_auto_and_names() -> None:
    from compconv.train.cli import parse_feature_names
    from compconv.train.config import apply_overrides

    for text, want in (("auto", "auto"), ("layer1.0,layer2", ["layer1.0", "layer2"]), ("[layer3]", ["layer3"])):
        assert apply_overrides(TrainConfig(teacher="t"), {"distill_features": text}).distill_features == want
    with pytest.raises(ValueError, match="config key 'distill_features' expects"):
        apply_overrides(TrainConfig(), {"distill_features": [1, 2]})

    assert parse_feature_names("auto") == "auto"
    assert parse_feature_names("layer1.0, layer2") == ["layer1.0", "layer2"]
    with pytest.raises(ValueError, match="--distill-features"):
        parse_feature_names(" , ")


TEACHER = REPO / "docs" / "results" / "train_runs" / "r20-vanilla-cpu60-s0"


@needs_cifar
@pytest.mark.skipif(not (TEACHER / "checkpoints" / "last.pt").is_file(), reason=f"no trained teacher at {TEACHER}")
def test_the_trainer_adds_the_feature_term_to_the_first_step_loss(tmp_path: Path) -> None:
    from compconv.train.data import build_data
    from compconv.train.engine import build_model, train
    from compconv.train.loops import distill_loss
    from compconv.train.sources import build_teacher

    run = dict(train_subset=64, eval_subset=32, batch_size=32, max_steps=1, teacher=str(TEACHER),
               method="compconv", method_options={"c0": 16})
    cfg = tiny_config(tmp_path, name="feat", distill_features="auto", distill_feature_weight=2.5, **run)
    res = train(cfg, command="pytest")
    assert res["distill"]["features"] == BLOCKS and res["distill"]["feature_weight"] == 2.5
    assert res["config"]["distill_feature_weight"] == 2.5
    data = build_data(cfg)
    data.train.set_epoch(0)
    x, y = next(iter(data.train.iter_from(0)))
    student = build_model(cfg, 10).train()
    teacher = build_teacher(str(TEACHER), None, 10)
    fd = FeatureDistill(student, teacher, BLOCKS, weight=2.5)
    with torch.no_grad(), fd:
        s, t = student(x), teacher(x)
        hand = distill_loss(s, t, y, cfg.distill_alpha, cfg.distill_temperature) + 2.5 * fd.loss()
    assert res["history"][0]["train_loss"] == pytest.approx(hand.item(), rel=1e-5)
    plain = train(tiny_config(tmp_path, name="plain", **run), command="pytest")
    assert "features" not in plain["distill"]
    assert plain["history"][0]["train_loss"] < res["history"][0]["train_loss"]
