"""The trainer never loses work: divergence, damaged checkpoints, run directories, failed writes, old runs.

Each test works on real files: a short run on a slice of the real CIFAR-10 folder, bytes flipped inside
its checkpoint, a committed run copied to a temporary directory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from compconv.train import checkpoint as ckpt_mod
from compconv.train.checkpoint import CheckpointError, load_checkpoint
from compconv.train.engine import build_model, evaluate_checkpoint, train
from compconv.train.guards import TrainingDiverged, clean_stale_temporaries
from train_helpers import CIFAR, REPO, needs_cifar, tiny_config

pytestmark = [needs_cifar, pytest.mark.slow]

SMALL = dict(train_subset=128, eval_subset=64, epochs=2, batch_size=64)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guards")
    res = train(tiny_config(out, name="ok", **SMALL), command="pytest guards")
    return Path(res["run_dir"])


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / run.name
    shutil.copytree(run, dst)
    return dst


def _main(argv: list[str]) -> int:
    from compconv.train.__main__ import main

    return main(argv)


# ------------------------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_at_once_keeps_nothing_nan_and_exits_non_zero(tmp_path: Path, capsys) -> None:
    argv = ["train", "--data-dir", str(CIFAR), "--train-subset", "128", "--eval-subset", "64", "--batch-size", "64"]
    argv += ["--epochs", "2", "--lr", "1e38", "--threads", "1", "--out-dir", str(tmp_path), "--name", "d"]
    assert _main([*argv, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # step 1 moves the weights by lr * grad (finite); step 2's loss is inf - inf = nan
    assert err.startswith("compconv train: training diverged at epoch 1, step 2/2: the loss is nan")
    res = json.loads((tmp_path / "d" / "results.json").read_text())
    assert res["finished"] is False and (res["diverged"]["epoch"], res["diverged"]["step"]) == (1, 2)
    assert not (tmp_path / "d" / "checkpoints" / "last.pt").exists()  # no NaN model was saved


def test_divergence_inside_epoch_2_keeps_the_last_finite_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from compconv.train.data import ArrayLoader

    real_iter = ArrayLoader.iter_from

    def nan_at_epoch2_step3(self: ArrayLoader, start: int):  # a NaN pixel reaches the model
        for i, (x, y) in enumerate(real_iter(self, start), start=start):
            if self.train and self.epoch == 1 and i == 2:
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            yield x, y

    monkeypatch.setattr(ArrayLoader, "iter_from", nan_at_epoch2_step3)
    cfg = tiny_config(tmp_path, name="d", save_every_s=1e-9, train_subset=256, eval_subset=64, epochs=2)
    with pytest.raises(TrainingDiverged, match="epoch 2, step 3/4: the loss is nan.*last finite checkpoint"):
        train(cfg)
    state = load_checkpoint(tmp_path / "d" / "checkpoints" / "last.pt")  # loads: finite, intact
    assert (state["epoch"], state["partial"]["step"]) == (1, 2)  # the save after step 2 of epoch 2
    monkeypatch.undo()
    assert json.loads((tmp_path / "d" / "results.json").read_text())["diverged"]["step"] == 3


# ------------------------------------------------------------------------------------ damaged checkpoints


def _flip_inside_a_tensor(path: Path) -> None:
    """Write a finite float32 (0.5) over 4 bytes in the middle of the largest tensor's data."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    blob = bytearray(path.read_bytes())
    # local header: 30 bytes + name + extra; stored (uncompressed) data follows
    n, m = struct.unpack("<HH", blob[info.header_offset + 26 : info.header_offset + 30])
    at = info.header_offset + 30 + n + m + (info.file_size // 8) * 4
    blob[at : at + 4] = struct.pack("<f", 0.5)
    path.write_bytes(bytes(blob))


def test_bytes_changed_inside_a_weight_are_refused_by_crc(run: Path, tmp_path: Path) -> None:
    d = _copy(run, tmp_path)
    last = d / "checkpoints" / "last.pt"
    _flip_inside_a_tensor(last)
    state = torch.load(last, weights_only=False)  # torch itself loads it: the values are finite
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    before = last.read_bytes()
    for attempt in (lambda: load_checkpoint(last), lambda: train(resume=d), lambda: evaluate_checkpoint(last)):
        with pytest.raises(CheckpointError, match=f"{last}.* fails its CRC-32 check"):
            attempt()
    assert last.read_bytes() == before


def test_nan_in_the_optimizer_state_is_refused(run: Path, tmp_path: Path) -> None:
    d = _copy(run, tmp_path)
    last = d / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    buf = state["optimizer"]["state"][0]["momentum_buffer"]
    buf.view(-1)[0] = float("nan")
    torch.save(state, last)
    with pytest.raises(CheckpointError, match=r"non-finite values in 'optimizer\.state\.0\.momentum_buffer'"):
        train(resume=d)


# ------------------------------------------------------------------------------------------ run directory


def test_a_new_run_never_replaces_an_earlier_runs_files(run: Path, tmp_path: Path) -> None:
    d = _copy(run, tmp_path)
    (d / "checkpoints" / "last.pt").unlink()
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="already holds a checkpoint or other run files.*best.pt|checkpoints"):
        train(tiny_config(tmp_path, name=d.name, **SMALL))
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


def test_stale_temporaries_of_dead_processes_are_cleaned_live_ones_kept(run: Path, tmp_path: Path) -> None:
    d = _copy(run, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = d / "checkpoints" / f".last.pt.{dead_pid}.tmp"
    live = d / "checkpoints" / f".last.pt.{os.getpid()}.tmp"
    stale_json = d / f".results.json.{dead_pid}.tmp"
    for p in (stale, live, stale_json):
        p.write_bytes(b"partial write")
    (d / "notes.tmp").write_text("not ours")
    assert sorted(p.name for p in clean_stale_temporaries(d)) == sorted([stale.name, stale_json.name])
    assert live.exists() and (d / "notes.tmp").exists() and not stale.exists()
    stale.write_bytes(b"again")
    train(resume=d)  # the next start cleans them too (the run is finished: nothing else happens)
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize(
    ("exc", "cause"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device (errno 28)"),
        (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"), "unexpected pos"),
    ],
)
def test_disk_full_ends_in_one_line_naming_the_path(tmp_path: Path, monkeypatch, capsys, exc, cause) -> None:
    def full(*a: object, **k: object) -> None:
        raise exc

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    argv = ["train", "--data-dir", str(CIFAR), "--train-subset", "64", "--eval-subset", "32", "--batch-size", "64"]
    argv += ["--max-steps", "1", "--threads", "1", "--out-dir", str(tmp_path), "--name", "f", "--no-progress"]
    assert _main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"compconv train: error: cannot write '{tmp_path / 'f' / 'checkpoints' / 'last.pt'}': ")
    assert cause in last
    assert sorted(p.name for p in (tmp_path / "f" / "checkpoints").iterdir()) == []  # no partial file


def test_a_read_only_output_folder_ends_in_one_line(tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    locked = False
    if os.access(ro, os.W_OK):  # root ignores permission bits: make it immutable instead
        locked = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
        if not locked:
            pytest.skip("cannot make a read-only folder here (root without chattr)")
    try:
        argv = ["train", "--data-dir", str(CIFAR), "--train-subset", "64", "--eval-subset", "32"]
        argv += ["--max-steps", "1", "--threads", "1", "--out-dir", str(ro), "--name", "r", "--no-progress"]
        assert _main(argv) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"compconv train: error: cannot write '{ro / 'r'}")
        assert "Permission denied" in last or "Operation not permitted" in last
    finally:
        if locked:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        ro.chmod(0o755)


# -------------------------------------------------------------------------------- data and conversions


def test_eval_refuses_a_folder_whose_classes_differ_from_the_checkpoints(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "cifar"
    shutil.copytree(CIFAR / "test", copy / "test", copy_function=os.link)  # hard links: fast, no data copied
    os.rename(copy / "test" / "automobile", copy / "test" / "car")
    last = run / "checkpoints" / "last.pt"
    with pytest.raises(ValueError, match=r"not in the model: \['car'\]; missing from the data: \['automobile'\]"):
        evaluate_checkpoint(last, data_dir=str(copy), progress=False)
    os.rename(copy / "test" / "car", copy / "test" / "automobile")  # the same classes: the same result
    r = evaluate_checkpoint(last, data_dir=str(copy), progress=False)
    assert (r["top1"], r["n"]) == (r["recorded"]["top1"], 64)


def test_the_checkpoint_records_the_absolute_data_path(run: Path, tmp_path: Path, monkeypatch) -> None:
    rel = os.path.relpath(CIFAR, REPO)
    monkeypatch.chdir(REPO)
    res = train(tiny_config(tmp_path, name="rel", data_dir=rel, max_steps=1, **SMALL))
    cfg = load_checkpoint(tmp_path / "rel" / "checkpoints" / "last.pt")["config"]
    assert cfg["data_dir"] == str(CIFAR.resolve()) and res["config"]["max_steps"] == 1
    monkeypatch.chdir(tmp_path)  # eval from elsewhere finds the data (before: a download into ./../shared)
    r = evaluate_checkpoint(tmp_path / "rel", progress=False)
    assert r["n"] == 64 and not (tmp_path.parent / "shared").exists()


def test_max_steps_is_a_step_budget(tmp_path: Path) -> None:
    # 128 images / batch 64 = 2 steps per epoch: 3 steps = epoch 1 and one step of epoch 2
    res = train(tiny_config(tmp_path, name="m", max_steps=3, **SMALL))
    assert res["finished"] is True and res["epochs_done"] == 2 and res["config"]["max_steps"] == 3
    state = load_checkpoint(tmp_path / "m" / "checkpoints" / "last.pt")
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 3


def test_a_method_that_converts_no_layer_is_refused() -> None:
    from compconv.train.config import TrainConfig

    cfg = TrainConfig(method="compconv", method_options={"exclude": "*"})
    # ResNet-20: the stem + 3 stages x 3 blocks x 2 convs = 19 convolutions, all kept
    with pytest.raises(ValueError, match="converted 0 of the 19 convolutions of 'cifar_resnet20'.*vanilla model"):
        build_model(cfg, 10)


# -------------------------------------------------------------------------------- committed (old) runs


COMMITTED = REPO / "docs" / "results" / "train_runs" / "r20-vanilla-cpu30-s0"


@pytest.mark.skipif(not COMMITTED.is_dir(), reason="committed run not present")
def test_a_run_written_by_an_older_version_still_loads_evaluates_and_resumes(tmp_path: Path) -> None:
    d = _copy(COMMITTED, tmp_path)
    state = load_checkpoint(d / "checkpoints" / "last.pt")  # CRCs of a file written before this change
    assert "max_steps" not in state["config"] and "bad_images" not in state["config"]
    from compconv.train.engine import _resolve_resume, build_optimizer

    cfg, state, _, run_dir, branch = _resolve_resume(str(d), {"data_dir": str(CIFAR)})
    assert (cfg.max_steps, cfg.bad_images, run_dir, branch) == (None, "error", d, False)  # new keys: defaults
    model = build_model(cfg, 10)
    model.load_state_dict(state["model"])
    build_optimizer(model, cfg).load_state_dict(state["optimizer"])
    r = evaluate_checkpoint(d, data_dir=str(CIFAR), eval_subset=200, progress=False)
    assert r["n"] == 200 and r["top1"] > 70.0  # an 87% model on 200 test images
