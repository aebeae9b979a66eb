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
    assert res["config"]["model_object"].endswith("CifarResNet") or "ResNet" in res["config"]["model_object"]
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
