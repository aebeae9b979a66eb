"""torch.distributed: 2 CPU processes with gloo train on a real slice; same weights, files written once."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from compconv.train.config import TrainConfig
from train_helpers import needs_cifar, tiny_config

pytestmark = [needs_cifar, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    """One rank, as torchrun would start it (env vars), recording its checkpoint writes and final weights."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    from compconv.train import checkpoint as ckpt_mod
    from compconv.train import engine

    models = []
    build, save = engine.build_model, ckpt_mod.save_checkpoint

    def recording_build(c: TrainConfig, n: int, **kw: object) -> torch.nn.Module:
        models.append(build(c, n, **kw))  # the first build is the student (a teacher's comes after)
        return models[-1]

    def recording_save(state: dict, path: str) -> Path:
        with open(Path(out) / "writes.log", "a") as f:
            f.write(f"{rank} {Path(path).name}\n")
        return save(state, path)

    from compconv.train import sources

    teachers = []
    build_teacher = sources.build_teacher

    def recording_teacher(*a: object) -> torch.nn.Module:
        teachers.append(build_teacher(*a))  # type: ignore[arg-type]
        return teachers[-1]

    engine.build_model = recording_build
    ckpt_mod.save_checkpoint = recording_save
    sources.build_teacher = recording_teacher
    res = engine.train(TrainConfig.from_dict(cfg), command="pytest ddp")
    torch.save(models[0].state_dict(), Path(out) / f"rank{rank}.pt")
    teacher = {}
    if teachers:  # distillation: every rank has its own teacher, in eval mode, never given a gradient
        t = teachers[0]
        teacher = {"training": t.training, "requires_grad": any(p.requires_grad for p in t.parameters()),
                   "grads": any(p.grad is not None for p in t.parameters())}
    (Path(out) / f"rank{rank}.json").write_text(
        json.dumps({"top1": res["top1"], "world": res["hardware"], "teacher": teacher})
    )


def test_two_gloo_processes_keep_identical_weights_and_write_once(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "runs", name="ddp", train_subset=256, eval_subset=65, epochs=1, batch_size=64)
    mp.spawn(_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)

    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:  # parameters (averaged gradients) and BN buffers (broadcast from rank 0)
        assert torch.equal(a[k], b[k]), k
    # Only rank 0 wrote, once per file: last.pt and best.pt after the single epoch.
    assert sorted((tmp_path / "writes.log").read_text().split("\n")[:-1]) == ["0 best.pt", "0 last.pt"]
    run = tmp_path / "runs" / "ddp"
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert all(torch.equal(ckpt["model"][k], a[k]) for k in a)
    # Metrics were reduced over both ranks: each rank reports the same top-1 over all 65 eval images
    # (33 + 32: the ranks run 2 and 1 eval batches of 32, so evaluation must not be a collective).
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["top1"] == r1["top1"]
    res = json.loads((run / "results.json").read_text())
    assert res["n_eval"] == 65 and res["hardware"]["world_size"] == 2 and res["history"][0]["test_top1"] == r0["top1"]
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "commands.txt",
        "config.yaml",
        "metrics.csv",
        "results.json",
    ]


def _diverging_worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    """One rank of a run that diverges: record what each rank raised."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    from compconv.train import engine
    from compconv.train.guards import TrainingDiverged

    try:
        engine.train(TrainConfig.from_dict(cfg), command="pytest ddp diverge")
        result = {"raised": None}
    except TrainingDiverged as e:
        result = {"raised": "TrainingDiverged", "epoch": e.epoch, "step": e.step, "message": str(e)}
    (Path(out) / f"div{rank}.json").write_text(json.dumps(result))


def test_divergence_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "runs", name="div", train_subset=256, eval_subset=64, epochs=1, batch_size=64, lr=1e38)
    mp.spawn(_diverging_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"div{r}.json").read_text()) for r in range(2))
    assert r0["raised"] == r1["raised"] == "TrainingDiverged"  # no rank hangs in a collective
    assert (r0["epoch"], r0["step"]) == (r1["epoch"], r1["step"]) == (1, 2)
    res = json.loads((tmp_path / "runs" / "div" / "results.json").read_text())
    assert res["diverged"]["step"] == 2 and not (tmp_path / "runs" / "div" / "checkpoints" / "last.pt").exists()


def test_distillation_with_features_under_ddp_has_a_frozen_teacher_on_every_rank(tmp_path: Path) -> None:
    from train_helpers import REPO

    teacher = REPO / "docs" / "results" / "train_runs" / "r20-vanilla-cpu60-s0"
    if not (teacher / "checkpoints" / "last.pt").is_file():
        pytest.skip(f"trained teacher not found at {teacher}")
    cfg = tiny_config(tmp_path / "runs", name="ddp-kd", train_subset=128, eval_subset=32, epochs=1, batch_size=64,
                      teacher=str(teacher), distill_features="auto")  # + feature hooks on every rank's student
    mp.spawn(_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for r in range(2):
        info = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert info["teacher"] == {"training": False, "requires_grad": False, "grads": False}, r
    res = json.loads((tmp_path / "runs" / "ddp-kd" / "results.json").read_text())
    assert res["distill"]["teacher"] == str(teacher) and res["hardware"]["world_size"] == 2
    assert res["distill"]["features"] == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
