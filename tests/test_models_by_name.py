"""Models users have, by name (torchvision:/timm:), weights from a file, model objects, the distillation loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import compconv
from compconv.models import get_model, get_model_builder
from compconv.train.config import TrainConfig
from compconv.train.engine import build_model, check_names
from compconv.train.loops import distill_loss
from compconv.train.sources import build_teacher, load_weights


def test_torchvision_model_by_name_has_random_weights_and_the_given_classes() -> None:
    import torchvision

    m = get_model("torchvision:resnet18", num_classes=10)
    ref = torchvision.models.resnet18(num_classes=10)
    assert isinstance(m, torchvision.models.ResNet) and m.fc.out_features == 10
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    # converted on the fly like a zoo model
    conv = get_model("torchvision:resnet18", num_classes=10, method="ghost")
    assert sum(p.numel() for p in conv.parameters()) < sum(p.numel() for p in m.parameters())


def test_timm_model_by_name() -> None:
    pytest.importorskip("timm")
    m = get_model("timm:resnet18", num_classes=7)
    assert m.get_classifier().out_features == 7
    assert m.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("torchvision:resnet1", ["unknown torchvision model 'resnet1'", "torchvision:resnet18"]),
        ("foo:bar", ["'foo:bar'", "torchvision:", "timm:"]),
        ("cifar_resnet2", ["unknown model 'cifar_resnet2'", "list_models()"]),  # the zoo's own text, unchanged
    ],
)
def test_unknown_names_are_refused_before_building(name: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        get_model_builder(name)
    for w in words:
        assert w in str(e.value)
    with pytest.raises(ValueError, match="unknown|prefix"):
        check_names(TrainConfig(model=name))


def test_unknown_timm_name() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        get_model("timm:no_such_net")


def test_trainer_builds_a_torchvision_model_by_name() -> None:
    cfg = TrainConfig(model="torchvision:resnet18").validate()
    m = build_model(cfg, 10)
    assert m.fc.out_features == 10


def _r20(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return get_model("cifar_resnet20", num_classes=10)


@pytest.mark.parametrize("kind", ["state_dict", "ddp_state_dict", "compconv_save"])
def test_weights_from_a_file_load_exactly(tmp_path: Path, kind: str) -> None:
    src = _r20(1)
    f = tmp_path / "w.pt"
    if kind == "state_dict":
        torch.save(src.state_dict(), f)
    elif kind == "ddp_state_dict":
        torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, f)
    else:
        compconv.save(src, f, base="cifar_resnet20", base_kwargs={"num_classes": 10})
    cfg = TrainConfig(model="cifar_resnet20", weights=str(f), seed=5).validate()
    m = build_model(cfg, 10)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values(), strict=True))


def test_weights_that_do_not_fit_name_the_keys(tmp_path: Path) -> None:
    f = tmp_path / "r20.pt"
    torch.save(_r20(0).state_dict(), f)
    torch.manual_seed(0)
    r32 = get_model("cifar_resnet32", num_classes=10)  # 5 blocks per stage instead of 3
    with pytest.raises(ValueError) as e:
        load_weights(r32, f)
    msg = str(e.value)
    assert "missing keys" in msg and "layer1.3." in msg and str(f) in msg
    r20_100 = get_model("cifar_resnet20", num_classes=100)
    with pytest.raises(ValueError, match=r"fc\.weight \(10, 64\) vs \(100, 64\)"):
        load_weights(r20_100, f)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt.* is corrupt or truncated"):
        load_weights(r20_100, tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_weights(r20_100, tmp_path / "nope.pt")


def test_a_run_of_a_model_object_cannot_be_rebuilt_without_it() -> None:
    cfg = TrainConfig(model_object="mypkg.MyNet").validate()
    with pytest.raises(ValueError, match=r"model object of class mypkg\.MyNet.*train\(resume=RUN, model=\.\.\.\)"):
        build_model(cfg, 10)
    with pytest.raises(ValueError, match="trained on a mypkg.MyNet"):
        build_model(cfg, 10, model=nn.Linear(2, 2))


def test_init_file_gives_architecture_and_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    comp, report = compconv.convert(get_model("cifar_resnet20", num_classes=10), "ghost", return_report=True)
    f = compconv.save(comp, tmp_path / "c.pt", base="cifar_resnet20", base_kwargs={"num_classes": 10},
                      conversion=report)
    m = build_model(TrainConfig(init=str(f)).validate(), 10)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), comp.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="init .* drop method"):
        TrainConfig(init=str(f), method="ghost").validate()


def test_teacher_by_name_needs_weights_and_has_no_gradients(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="teacher_weights"):
        build_teacher("cifar_resnet20", None, 10)
    f = tmp_path / "t.pt"
    torch.save(_r20(3).state_dict(), f)
    t = build_teacher("cifar_resnet20", str(f), 10)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    with pytest.raises(ValueError, match="teacher_weights given without a teacher"):
        TrainConfig(teacher_weights=str(f)).validate()


@pytest.mark.parametrize(("key", "value"), [("distill_alpha", 1.5), ("distill_temperature", 0.0)])
def test_distill_settings_out_of_range_are_refused(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=key):
        TrainConfig(**{key: value}).validate()


def test_distill_loss_equals_the_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.tensor([0, 2, 1, 1])
    alpha, temp = 0.7, 3.0
    hand_kl = 0.0
    hand_ce = 0.0
    for i in range(4):
        ps = [math.exp(v / temp) for v in s[i].tolist()]
        pt = [math.exp(v / temp) for v in t[i].tolist()]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        hand_kl += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True)) / 4  # KL(teacher || student)
        e = [math.exp(v) for v in s[i].tolist()]
        hand_ce += -math.log(e[int(y[i])] / sum(e)) / 4
    want = alpha * temp**2 * hand_kl + (1 - alpha) * hand_ce
    assert distill_loss(s, t, y, alpha, temp).item() == pytest.approx(want, rel=1e-5)
    # alpha 0: plain cross-entropy; identical logits: no KL
    assert distill_loss(s, s, y, 1.0, temp).item() == pytest.approx(0.0, abs=1e-6)


def test_default_run_names_of_named_init_and_object_models() -> None:
    from compconv.train.engine import default_run_name

    assert default_run_name(TrainConfig(model="torchvision:resnet18")) == "torchvision_resnet18-vanilla-cifar10-s0"
    assert default_run_name(TrainConfig(init="/x/r20_half.pt", teacher="t")) == "r20_half-init-distill-cifar10-s0"
    assert default_run_name(TrainConfig(model_object="a.b.MyNet", seed=2)) == "MyNet-vanilla-cifar10-s2"


def test_missing_files_and_unknown_teachers_fail_before_any_data_is_read(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weights file .*nope.pt"):
        check_names(TrainConfig(weights=str(tmp_path / "nope.pt")))
    with pytest.raises(FileNotFoundError, match="init file"):
        check_names(TrainConfig(init=str(tmp_path / "nope.pt")))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    # a run directory is not "missing": the error says it is a directory and names the file to pass
    with pytest.raises(IsADirectoryError, match=r"init file '.*run' is a directory, not a file; the checkpoints in "
                                                r"it: .*run/checkpoints/last.pt$"):
        check_names(TrainConfig(init=str(tmp_path / "run")))
    with pytest.raises(IsADirectoryError, match=r"init file '.*checkpoints' is a directory, not a file; the "
                                                r"checkpoints in it: .*run/checkpoints/last.pt$"):
        check_names(TrainConfig(init=str(tmp_path / "run" / "checkpoints")))
    (tmp_path / "empty").mkdir()  # a teacher directory without a checkpoint: refused before the run dir exists
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at '.*empty/checkpoints/last.pt'"):
        check_names(TrainConfig(teacher=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="unknown model 'no_such_teacher'"):
        check_names(TrainConfig(teacher="no_such_teacher", teacher_weights=__file__))
