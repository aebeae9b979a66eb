"""The findings of a fresh-eyes review of the trainer: each one tried to lose work or mislabel data.

Runs are a few steps of ResNet-20 on a tiny folder of real CIFAR-10 images (``tiny_tree``), so each test
takes seconds; a committed run is only ever copied to a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compconv.train import checkpoint as ckpt_mod
from compconv.train import engine
from compconv.train.checkpoint import CheckpointError, load_checkpoint
from compconv.train.config import TrainConfig
from compconv.train.data import build_data
from compconv.train.engine import build_model, evaluate_checkpoint, train
from compconv.train.guards import LOCK_NAME, RunExistsError, RunLockedError, TrainingDiverged, run_lock
from compconv.train.images import BadImageError, ImageSizeError
from compconv.train.resume import recorded_data_dir
from train_helpers import CIFAR, REPO, tiny_folder_config, tiny_tree

pytestmark = pytest.mark.slow  # end-to-end: a few seconds of training in all (about 30 s for the module)

# 2 classes x 8 train images, batch 8: 2 steps per epoch
TWO_EPOCHS = dict(epochs=2, save_every_s=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tree(tmp_path_factory.mktemp("tree") / "d")


@pytest.fixture(scope="module")
def done(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run on ``data`` (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("done")
    return Path(train(tiny_folder_config(data, out, name="r", **TWO_EPOCHS), command="pytest")["run_dir"])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _files(d: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _resave(path: Path, size: int) -> None:
    with Image.open(path) as im:
        im.convert("RGB").resize((size, size)).save(path)


# ------------------------------------------------------------------------ 1. image size from the record


@pytest.mark.parametrize("size", [64, 100])  # 64: the small path resized it; 100: the ImageNet pipeline
def test_one_odd_eval_image_is_refused_by_name_never_resizes_the_others(done: Path, data: Path, tmp_path, size) -> None:
    d = _copy(data, tmp_path / "d")
    odd = sorted((d / "val" / "airplane").iterdir())[0]  # the first file in sort order
    _resave(odd, size)
    with pytest.raises(ImageSizeError, match=r"1 of 8 image\(s\) .* are not 32x32 \(the size the model was trained"):
        evaluate_checkpoint(done, data_dir=str(d), progress=False)
    # the pipeline and size come from the checkpoint, not from the first file
    assert load_checkpoint(done / "checkpoints" / "last.pt")["data"]["kind"] == "array"


def test_a_new_run_refuses_mixed_sizes_and_an_explicit_image_size_resizes_all(data: Path, tmp_path: Path) -> None:
    d = _copy(data, tmp_path / "d")
    first = sorted((d / "train" / "airplane").iterdir())[0]
    _resave(first, 40)  # small, but not 32x32: refused by name
    with pytest.raises(ImageSizeError, match=rf"1 of 16 image\(s\) .*\n  {first}: 40x40"):
        build_data(tiny_folder_config(d, tmp_path))
    _resave(first, 100)  # large: the split mixes small and large images
    with pytest.raises(ImageSizeError, match=r"mix small and large sizes .*--image-size N"):
        build_data(tiny_folder_config(d, tmp_path))
    b = build_data(tiny_folder_config(d, tmp_path, image_size=32))  # an explicit size resizes every image
    assert (b.kind, b.image_size, b.n_train, b.n_eval) == ("array", 32, 16, 8)


# ------------------------------------------------------------------ 2. best.pt and last.pt always agree


def test_a_failed_best_write_is_rebuilt_from_last_on_resume(data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    real = ckpt_mod.save_checkpoint

    def fail_best(state, path):  # disk full (or kill -9) between last.pt and best.pt
        if Path(path).name == "best.pt":
            raise ckpt_mod.write_error(path, OSError(28, "No space left on device"))
        return real(state, path)

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", fail_best)
    with pytest.raises(ckpt_mod.RunWriteError):
        train(tiny_folder_config(data, tmp_path, name="b", **TWO_EPOCHS))
    monkeypatch.undo()
    ck = tmp_path / "b" / "checkpoints"
    assert not (ck / "best.pt").exists() and load_checkpoint(ck / "last.pt")["epoch"] == 1
    res = train(resume=tmp_path / "b")
    assert "rebuilt" in capsys.readouterr().err
    best = load_checkpoint(ck / "best.pt")
    assert (best["epoch"], best["metrics"]["top1"]) == (res["best_epoch"], res["best_top1"])
    assert res["best_checkpoint"] == {"path": "checkpoints/best.pt", "epoch": res["best_epoch"]}


# --------------------------------------------------------------- 3/4. resume never rewrites other history


def test_resume_from_best_pt_is_refused_and_branches_only_into_a_new_directory(done: Path, tmp_path: Path) -> None:
    run = _copy(done, tmp_path / "r")
    before = _files(run)
    best = run / "checkpoints" / "best.pt"
    with pytest.raises(ValueError, match=rf"not a run's checkpoints/last.pt.*later history.*--resume {run}`.*--name"):
        train(resume=best)
    with pytest.raises(RunExistsError):  # a branch never writes into an existing run
        train(resume=best, resume_overrides={"name": "r", "out_dir": str(tmp_path)})
    res = train(resume=best, resume_overrides={"name": "fork", "out_dir": str(tmp_path)})
    assert res["run_dir"] == str(tmp_path / "fork") and _files(run) == before  # the source run is untouched


def test_resume_from_a_loose_checkpoint_never_makes_its_folder_a_run(done: Path, tmp_path: Path) -> None:
    loose = tmp_path / "elsewhere"
    loose.mkdir()
    shutil.copy(done / "checkpoints" / "last.pt", loose / "a.pt")
    (loose / "metrics.csv").write_text("another run's metrics\n")
    with pytest.raises(ValueError, match=r"overwrite files in .*elsewhere.*--name NEW_NAME"):
        train(resume=loose / "a.pt")
    assert sorted(p.name for p in loose.iterdir()) == ["a.pt", "metrics.csv"]


# -------------------------------------------------------------------- 5. buffers are guarded like weights


def test_an_inf_batchnorm_buffer_stops_the_run_and_nothing_unloadable_is_saved(data, tmp_path, monkeypatch) -> None:
    real = engine.build_optimizer
    calls = {"n": 0}

    def poisoned(model, cfg):  # after the 3rd step (epoch 2, step 1) BN's running_var is inf, the loss finite
        opt = real(model, cfg)

        def hook(*_: object) -> None:
            calls["n"] += 1
            if calls["n"] == 3:
                model.bn1.running_var.fill_(float("inf"))

        opt.register_step_post_hook(hook)
        return opt

    monkeypatch.setattr(engine, "build_optimizer", poisoned)
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: {"loss": 1.0, "top1": 50.0, "top5": 100.0})
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 1/2: the weights or buffers"):
        train(tiny_folder_config(data, tmp_path, name="bn", **TWO_EPOCHS))
    for f in (tmp_path / "bn" / "checkpoints").iterdir():  # everything saved loads (epoch 1)
        assert load_checkpoint(f)["epoch"] == 1


def test_damaged_checkpoint_advice_never_points_to_the_damaged_file(done: Path, tmp_path: Path) -> None:
    run = _copy(done, tmp_path / "r")
    for name in ("best.pt", "last.pt"):
        p = run / "checkpoints" / name
        p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(run / "checkpoints" / "best.pt")
    assert "best.pt --name" not in str(e.value) and "restore it from a copy" in str(e.value)
    with pytest.raises(CheckpointError, match=r"--resume .*best.pt --name NEW_NAME"):
        load_checkpoint(run / "checkpoints" / "last.pt")


# -------------------------------------------------------------------------------- 6. data that changed


def test_eval_reads_the_recorded_folder_and_resume_refuses_changed_data(data, tmp_path, capsys) -> None:
    d = _copy(data, tmp_path / "d")
    os.rename(d / "val", d / "test")  # the run evaluates on test/
    train(tiny_folder_config(d, tmp_path, name="s", stop_after=1, **TWO_EPOCHS))
    shutil.copytree(d / "test", d / "val")  # a new val/ folder (auto would now pick it)
    for p in sorted((d / "val" / "cat").iterdir())[:2]:
        p.unlink()
    r = evaluate_checkpoint(tmp_path / "s", progress=False)
    assert (r["split"], r["n"]) == ("test", 8)  # the folder the run used, named
    (sorted((d / "train" / "cat").iterdir())[0]).unlink()
    with pytest.raises(ValueError, match=r"changed since the run started \(n_train was 16, now 15\)"):
        train(resume=tmp_path / "s")
    assert len(load_checkpoint(tmp_path / "s" / "checkpoints" / "last.pt")["history"]) == 1


# ------------------------------------------------------------ 7. an older run's relative data directory


COMMITTED = REPO / "docs" / "results" / "train_runs" / "r20-vanilla-cpu30-s0"


@pytest.mark.skipif(not COMMITTED.is_dir(), reason="committed run not present")
def test_an_old_relative_data_dir_is_found_from_the_run_never_the_cwd(tmp_path: Path, monkeypatch) -> None:
    rel = load_checkpoint(COMMITTED / "checkpoints" / "last.pt")["config"]["data_dir"]
    assert rel == "../shared/data/cifar10"  # as typed when the run started (older version)
    # a small copy where the relative path points from the current directory: never scored
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    classes = tuple(load_checkpoint(COMMITTED / "checkpoints" / "last.pt")["data"]["classes"])
    decoy = tiny_tree(tmp_path / "shared" / "data" / "cifar10", classes, n_train=1, n_eval=2, eval_split="test")
    outside = _copy(COMMITTED, tmp_path / "copy")  # no repository around it
    with pytest.raises(FileNotFoundError, match=r"relative data_dir '../shared/data/cifar10'.*pass --data-dir"):
        evaluate_checkpoint(outside, progress=False)
    # inside a repository: resolved against its root (as the run was started from there)
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    run = _copy(COMMITTED, repo / "docs" / "runs" / "x")
    assert recorded_data_dir(rel, run, "runs") == str(decoy.resolve())
    # that copy has 20 eval images, the checkpoint records 10,000: refused unless asked for explicitly
    with pytest.raises(ValueError, match=r"evaluated on 10000 images, but .* gives 20 in 'test'"):
        evaluate_checkpoint(run, progress=False)


# ------------------------------------------------------------------------------- 8. nothing compressed


def test_a_method_whose_layers_stay_plain_convs_is_refused() -> None:
    cfg = TrainConfig(method="compconv", method_options={"depth": 0})
    # ResNet-20: 19 convs; CompConv leaves the stem (3 input channels) alone: 18 converted, all plain
    with pytest.raises(ValueError, match=r"converted 18 convolutions .* keeps the plain conv's parameter count"):
        build_model(cfg, 10)


# ----------------------------------------------------------------------------------- 9. the messages


def test_bad_images_of_both_splits_are_listed_at_once_and_eval_can_skip(done: Path, data: Path, tmp_path) -> None:
    d = _copy(data, tmp_path / "d")
    tb, vb = d / "train" / "cat" / "0000.jpg", d / "val" / "cat" / "0000.jpg"
    for p in (tb, vb):
        p.write_bytes(p.read_bytes()[:100])  # real truncated JPEGs
    with pytest.raises(BadImageError) as e:
        build_data(tiny_folder_config(d, tmp_path))
    assert sorted(p for p, _ in e.value.bad) == [str(tb), str(vb)] and "results.json" in str(e.value)
    r = evaluate_checkpoint(done, data_dir=str(d), bad_images="skip", progress=False)
    assert (r["n"], r["bad_images"]) == (7, [str(vb)])


def test_eval_on_an_empty_class_folder_asks_for_its_images(done: Path, data: Path, tmp_path: Path) -> None:
    d = _copy(data, tmp_path / "d")
    for p in (d / "val" / "cat").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=r"val/cat.*add its images \(the checkpoint's model has this class"):
        evaluate_checkpoint(done, data_dir=str(d), progress=False)


def test_a_checkpoint_that_does_not_fit_its_model_or_normalises_with_nan_is_refused(done: Path, tmp_path) -> None:
    run = _copy(done, tmp_path / "r")
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["model"].pop("fc.bias")
    torch.save(state, last)
    with pytest.raises(CheckpointError, match=rf"{last}.* does not fit the model.*fc.bias"):
        evaluate_checkpoint(last, progress=False)
    for std in ([0.2, float("nan"), 0.2], [0.2, 0.0, 0.2]):
        state = load_checkpoint(done / "checkpoints" / "last.pt")
        state["data"]["std"] = std
        torch.save(state, last)
        with pytest.raises(CheckpointError, match=r"normalisation std .* must be finite and > 0"):
            evaluate_checkpoint(last, progress=False)


def test_a_finished_run_resumes_to_nothing_and_a_step_budget_row_is_marked(data, done, tmp_path, capsys) -> None:
    run = _copy(done, tmp_path / "r")
    before = _files(run)
    train(resume=run)
    assert "is finished (2/2 epochs); nothing to do" in capsys.readouterr().err and _files(run) == before
    res = train(tiny_folder_config(data, tmp_path, name="m", max_steps=3, **TWO_EPOCHS))
    assert [r.get("partial_steps") for r in res["history"]] == [None, "1/2"]  # epoch 2 stopped after 1 of 2
    assert (tmp_path / "m" / "metrics.csv").read_text().splitlines()[0].endswith(",partial_steps")


# ------------------------------------------------------------------------------ 10. the run directory


def test_a_start_killed_before_its_first_checkpoint_can_start_again(data: Path, tmp_path: Path) -> None:
    d = tmp_path / "k"
    (d / "tb").mkdir(parents=True)
    (d / "checkpoints").mkdir()
    (d / "config.yaml").write_text("model: x\n")
    (d / "commands.txt").write_text("compconv train ...\n")
    with pytest.raises(FileNotFoundError, match="stopped before its first one.*start it again"):
        train(resume=d)
    res = train(tiny_folder_config(data, tmp_path, name="k", max_steps=1, **TWO_EPOCHS))
    assert res["finished"] and (d / "checkpoints" / "last.pt").is_file()


def test_a_run_directory_in_use_is_locked_and_a_dead_processs_lock_is_taken_over(done: Path, tmp_path) -> None:
    run = _copy(done, tmp_path / "r")
    with run_lock(run):
        with pytest.raises(RunLockedError, match=rf"in use by process {os.getpid()}"):
            train(resume=run)
    assert not (run / LOCK_NAME).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (run / LOCK_NAME).write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")
    train(resume=run)  # the stale lock of a dead process does not block
    assert not (run / LOCK_NAME).exists()


def test_a_split_folder_given_as_data_dir_is_never_a_download_target(data: Path, tmp_path: Path) -> None:
    d = _copy(data, tmp_path / "d")
    before = sorted(p.name for p in (d / "train").iterdir())
    with pytest.raises(FileNotFoundError, match=rf"holds folders \(airplane, cat\).*--data-dir {d}\).*Nothing was"):
        build_data(TrainConfig(dataset="cifar10", data_dir=str(d / "train")))
    assert sorted(p.name for p in (d / "train").iterdir()) == before


def test_results_json_names_the_best_checkpoint(done: Path) -> None:
    res = json.loads((done / "results.json").read_text())
    best = load_checkpoint(done / "checkpoints" / "best.pt")
    assert res["best_checkpoint"]["epoch"] == best["epoch"] == res["best_epoch"]
    assert np.isclose(best["metrics"]["top1"], res["best_top1"])
    assert CIFAR.name == "cifar10"
