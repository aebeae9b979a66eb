"""Distillation and model objects through the trainer, on a tiny slice of the real CIFAR-10 folder.

The teacher is the project's trained ResNet-20 (``docs/results/train_runs/r20-vanilla-cpu60-s0``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compconv.models import get_model
from compconv.train.checkpoint import load_checkpoint
from compconv.train.data import build_data
from compconv.train.engine import build_model, evaluate_checkpoint, train
from compconv.train.sources import build_teacher
from train_helpers import REPO, needs_cifar, tiny_config

TEACHER = REPO / "docs" / "results" / "train_runs" / "r20-vanilla-cpu60-s0"
needs_teacher = pytest.mark.skipif(not (TEACHER / "checkpoints" / "last.pt").is_file(),
                                   reason=f"trained teacher not found at {TEACHER}")
pytestmark = [needs_cifar, needs_teacher]

RUN = dict(train_subset=128, eval_subset=64, epochs=2, batch_size=32, teacher=str(TEACHER), distill_alpha=0.7,
           distill_temperature=3.0)


def test_the_first_step_loss_is_the_hand_computed_distillation_loss(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, name="one", max_steps=1, **RUN)
    res = train(cfg, command="pytest")
    assert res["distill"]["alpha"] == 0.7 and res["distill"]["temperature"] == 3.0
    assert json.loads((tmp_path / "one" / "results.json").read_text())["config"]["teacher"] == str(TEACHER)
    # the same first batch, the same initial student, the teacher from its run directory
    data = build_data(cfg)
    data.train.set_epoch(0)
    x, y = next(iter(data.train.iter_from(0)))
    student = build_model(cfg, 10).train()
    teacher = build_teacher(str(TEACHER), None, 10)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    temp = 3.0
    log_ps, log_pt = torch.log_softmax(s / temp, 1), torch.log_softmax(t / temp, 1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()  # KL(teacher || student), batch mean
    ce = -torch.log_softmax(s, 1)[torch.arange(len(y)), y].mean()
    hand = 0.7 * temp**2 * kl + 0.3 * ce
    assert res["history"][0]["train_loss"] == pytest.approx(hand.item(), rel=1e-5)


@pytest.mark.slow
def test_a_distillation_run_resumes_bit_exactly(tmp_path: Path) -> None:
    full = train(tiny_config(tmp_path, name="full", **RUN), command="pytest full")
    part = train(tiny_config(tmp_path, name="part", stop_after=1, **RUN), command="pytest part")
    assert part["finished"] is False
    res = train(resume=tmp_path / "part", command="pytest resume")
    keys = ("lr", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5")
    for a, b in zip(full["history"], res["history"], strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    sa = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    sb = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert sb["teacher_fingerprint"] == sa["teacher_fingerprint"]


def test_a_model_object_trains_and_resume_needs_it_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = get_model("cifar_resnet20", num_classes=10)
    cfg = tiny_config(tmp_path, name="obj", train_subset=64, eval_subset=32, batch_size=32, epochs=2, stop_after=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = train(cfg, model=net, command="pytest obj")
    assert res["config"]["model_object"] == "compconv.models.cifar_resnet.CifarResNet"
    assert res["model"] == res["config"]["model_object"]  # the object trained, not the config's default name
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())  # trained in place
    with pytest.raises(ValueError, match="model object of class"):
        train(resume=tmp_path / "obj")
    with pytest.raises(ValueError, match="model object of class"):
        evaluate_checkpoint(tmp_path / "obj", progress=False)
    out = evaluate_checkpoint(tmp_path / "obj", progress=False, model=get_model("cifar_resnet20", num_classes=10))
    assert out["top1"] == pytest.approx(res["top1"])
    done = train(resume=tmp_path / "obj", model=get_model("cifar_resnet20", num_classes=10), command="pytest r")
    assert done["finished"] is True and done["epochs_done"] == 2


def test_freeze_bn_stats_keeps_the_running_statistics(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = get_model("cifar_resnet20", num_classes=10)
    w = tmp_path / "w.pt"
    torch.save(net.state_dict(), w)
    cfg = tiny_config(tmp_path, name="frozen", train_subset=64, eval_subset=32, batch_size=32, epochs=1,
                      weights=str(w), freeze_bn_stats=True, lr=0.001)
    train(cfg, command="pytest frozen")
    after = load_checkpoint(tmp_path / "frozen" / "checkpoints" / "last.pt")["model"]
    stats = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(after[k], net.state_dict()[k]) for k in stats)
    assert not torch.equal(after["fc.weight"], net.state_dict()["fc.weight"])  # the weights did train


def test_resume_refuses_a_teacher_whose_weights_changed(tmp_path: Path) -> None:
    w = tmp_path / "teacher.pt"
    torch.manual_seed(4)
    torch.save(get_model("cifar_resnet20", num_classes=10).state_dict(), w)
    cfg = tiny_config(tmp_path, name="kd", train_subset=64, eval_subset=32, batch_size=32, epochs=2, stop_after=1,
                      teacher="cifar_resnet20", teacher_weights=str(w))
    train(cfg, command="pytest kd")
    torch.manual_seed(5)
    torch.save(get_model("cifar_resnet20", num_classes=10).state_dict(), w)  # another model in the same file
    with pytest.raises(ValueError, match="teacher 'cifar_resnet20' has other weights than when the run started"):
        train(resume=tmp_path / "kd")


def test_cli_trains_a_torchvision_model_from_a_weights_file(tmp_path: Path, capsys) -> None:
    from compconv.cli import main
    from train_helpers import CIFAR

    torch.manual_seed(0)
    w = tmp_path / "tv.pt"
    torch.save(get_model("torchvision:resnet18", num_classes=10).state_dict(), w)
    common = ["--data-dir", str(CIFAR), "--out-dir", str(tmp_path), "--max-steps", "1", "--epochs", "1",
              "--batch-size", "16", "--train-subset", "16", "--eval-subset", "16", "--threads", "1", "--no-progress",
              "--set", "tensorboard=false", "--set", "plots=false"]
    assert main(["train", "--model", "torchvision:resnet18", "--weights", str(w), "--name", "tv", *common]) == 0
    res = json.loads((tmp_path / "tv" / "results.json").read_text())
    assert res["config"]["model"] == "torchvision:resnet18" and res["config"]["weights"] == str(w)
    capsys.readouterr()
    # the same file for another model: exit 2, one line naming the keys that do not fit
    assert main(["train", "--model", "cifar_resnet20", "--weights", str(w), "--name", "bad", *common]) == 2
    err = capsys.readouterr().err
    assert "do not fit the model" in err and "missing keys" in err and "unexpected keys" in err


def test_an_init_run_resumes_and_evaluates_without_its_init_file(tmp_path: Path) -> None:
    import compconv

    torch.manual_seed(0)
    comp, report = compconv.convert(get_model("cifar_resnet20", num_classes=10), "ghost", return_report=True)
    f = compconv.save(comp, tmp_path / "g.pt", base="cifar_resnet20", base_kwargs={"num_classes": 10},
                      conversion=report)
    cfg = tiny_config(tmp_path, name="init", train_subset=64, eval_subset=32, batch_size=32, epochs=2, stop_after=1,
                      init=str(f))
    part = train(cfg, command="pytest init")
    f.unlink()  # the architecture is in the checkpoint ("arch"): the file is not needed any more
    ev = evaluate_checkpoint(tmp_path / "init", progress=False)
    assert ev["top1"] == pytest.approx(part["top1"])
    done = train(resume=tmp_path / "init", command="pytest init resume")
    assert done["finished"] is True and done["params"] == part["params"] < 269_722  # the ghost model's
