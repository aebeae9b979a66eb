"""compconv train / eval end to end on a small slice of the real CIFAR-10 folder (one CPU thread).

One uninterrupted run (module fixture) is checked for learning, its files, eval reproduction and
checkpoint safety; a second run, stopped after one epoch and resumed, must reproduce it exactly.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from compconv.train import checkpoint as ckpt_mod
from compconv.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from compconv.train.engine import evaluate_checkpoint, train
from train_helpers import CIFAR, needs_cifar, tiny_config

pytestmark = [needs_cifar, pytest.mark.slow]

# 512 training images, 2 epochs of batch 64 at lr 0.05: enough for a clear step above chance.
RUN = dict(train_subset=512, eval_subset=300, epochs=2)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("train")
    cfg = tiny_config(out, name="full", plots=True, tensorboard=True, **RUN)
    res = train(cfg, command="pytest full run")
    return {"res": res, "dir": Path(res["run_dir"]), "out": out}


def test_one_short_run_learns(full_run: dict) -> None:
    h = full_run["res"]["history"]
    assert h[1]["train_loss"] < h[0]["train_loss"]  # loss falls
    assert h[1]["test_loss"] < math.log(10)  # better than the uniform prediction on held-out images
    # 300 test images, 10 classes: chance is 10% with std sqrt(0.1 * 0.9 / 300) = 1.7 points;
    # 17% is 4 std above it.
    assert full_run["res"]["top1"] > 17.0
    assert full_run["res"]["n_eval"] == 300 and full_run["res"]["n_train"] == 512


def test_run_directory_has_config_metrics_checkpoints_results_plots(full_run: dict) -> None:
    d = full_run["dir"]
    for f in (
        "config.yaml",
        "metrics.csv",
        "results.json",
        "curves.png",
        "commands.txt",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (d / f).is_file(), f
    assert any((d / "tb").iterdir())
    res = json.loads((d / "results.json").read_text())
    for key in (
        "top1",
        "top5",
        "params",
        "macs",
        "train_images_per_s",
        "wall_time_s",
        "hardware",
        "versions",
        "seed",
        "command",
    ):
        assert res[key] is not None, key
    # ResNet-20: params and MACs are compconv.profile's counts of the trained model.
    from compconv.models import get_model
    from compconv.profile import profile

    p = profile(get_model("cifar_resnet20", num_classes=10).eval(), (1, 3, 32, 32))
    assert (res["params"], res["macs"]) == (p.total_params, p.total_macs)
    assert res["command"] == "pytest full run" and res["finished"] is True
    # Every epoch names its machine (a resumed run may move), and results.json groups them.
    n = res["hardware"]["torch_threads"]
    here = f"{res['hardware']['cpu']}, {n} thread{'s' if n > 1 else ''}"
    assert [r["machine"] for r in res["history"]] == [here] * len(res["history"])
    assert res["machines_by_epoch"] == [{"epochs": [1, len(res["history"])], "machine": here}]
    assert "machine" in (d / "metrics.csv").read_text().splitlines()[0].split(",")
    lines = (d / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch,lr,train_loss")


def test_resume_after_interruption_reproduces_the_uninterrupted_run(full_run: dict) -> None:
    out = full_run["out"]
    part = train(tiny_config(out, name="part", stop_after=1, **RUN), command="pytest part")
    assert part["epochs_done"] == 1 and part["finished"] is False
    res = train(resume=out / "part", command="pytest resume")
    assert res["finished"] is True
    keys = ("lr", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5")
    for a, b in zip(full_run["res"]["history"], res["history"], strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    sa = load_checkpoint(full_run["dir"] / "checkpoints" / "last.pt")
    sb = load_checkpoint(out / "part" / "checkpoints" / "last.pt")
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    # A finished run resumed again changes nothing.
    again = train(resume=out / "part", command="pytest resume again")
    assert again["history"] == res["history"]


def test_resume_inside_an_epoch_reproduces_the_uninterrupted_run(full_run: dict, monkeypatch) -> None:
    out = full_run["out"]
    real_save = ckpt_mod.save_checkpoint

    def save_then_die(state: dict, path: Path) -> Path:  # killed right after a mid-epoch save in epoch 2
        p = real_save(state, path)
        if state["partial"] is not None and state["epoch"] == 1 and state["partial"]["step"] == 5:
            raise KeyboardInterrupt
        return p

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(out, name="mid", save_every_s=1e-9, **RUN), command="pytest mid")
    monkeypatch.undo()
    state = load_checkpoint(out / "mid" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["partial"]["step"], state["partial"]["n"]) == (1, 5, 5 * 64)
    res = train(resume=out / "mid", command="pytest resume mid")
    keys = ("lr", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5")
    for a, b in zip(full_run["res"]["history"], res["history"], strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    sa = load_checkpoint(full_run["dir"] / "checkpoints" / "last.pt")
    sb = load_checkpoint(out / "mid" / "checkpoints" / "last.pt")
    assert sb["partial"] is None and all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_resume_refuses_to_change_the_recipe(full_run: dict) -> None:
    with pytest.raises(ValueError, match="cannot change 'lr' when resuming"):
        train(resume=full_run["dir"], resume_overrides={"lr": 0.3})


def test_a_new_run_does_not_overwrite_an_existing_one(full_run: dict) -> None:
    with pytest.raises(ValueError, match="already holds a checkpoint.*--resume"):
        train(tiny_config(full_run["out"], name="full", **RUN))


def test_eval_on_a_saved_checkpoint_reproduces_the_recorded_accuracy(full_run: dict, capsys) -> None:
    for name in ("best.pt", "last.pt"):
        path = full_run["dir"] / "checkpoints" / name
        r = evaluate_checkpoint(path, progress=False)
        assert r["n"] == 300
        assert (r["top1"], r["top5"]) == (r["recorded"]["top1"], r["recorded"]["top5"])
        assert r["loss"] == pytest.approx(r["recorded"]["loss"], rel=1e-9)
    assert r["top1"] == full_run["res"]["top1"]
    from compconv.train.__main__ import main

    assert main(["eval", str(full_run["dir"]), "--check", "--no-progress"]) == 0
    assert "recorded top1" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "err"), [
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, but got 0"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1, but got 0"),
    (["--eval-subset", "-1"], "argument --eval-subset: must be an integer >= 1, but got -1"),
    (["--check", "--check-tol", "nan"], "argument --check-tol: must be a finite number >= 0 (points of top-1), but "
                                         "got nan"),
    (["--check-tol", "5"], "argument --check-tol: the tolerance of --check, given without --check; add --check"),
])
def test_eval_refuses_bad_sizes_before_reading_data(full_run: dict, capsys, args: list[str], err: str) -> None:
    """--batch-size 0 was a ZeroDivisionError traceback, --eval-subset 0 "evaluated" one image, --threads 0 was
    ignored: each is now one line naming the flag, and nothing is evaluated."""
    from compconv.train.__main__ import main

    assert main(["eval", str(full_run["dir"]), "--no-progress", *args]) == 2
    assert capsys.readouterr().err.strip() == f"compconv eval: error: {err}"


def test_evaluate_checkpoint_refuses_bad_sizes(full_run: dict) -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive integer, but got 0"):
        evaluate_checkpoint(full_run["dir"], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="eval_subset must be a positive integer or null, but got 0"):
        evaluate_checkpoint(full_run["dir"], eval_subset=0, progress=False)


def test_eval_on_another_split_with_per_class_accuracy(full_run: dict, capsys) -> None:
    last = full_run["dir"] / "checkpoints" / "last.pt"
    own = evaluate_checkpoint(last, progress=False)
    tr = evaluate_checkpoint(last, split="train", progress=False)
    assert tr["split"] == "train" and own["split"] == "test"  # the folder read, not "auto"
    assert tr["n"] == 300  # the run's eval_subset, drawn from the 50,000 training images
    assert tr["classes"] == own["classes"] and len(tr["classes"]) == 10
    assert (tr["top1"], tr["loss"]) != (own["top1"], own["loss"])  # other images
    for r in (own, tr):  # the per-class figures add up to the overall top-1
        assert sum(r["per_class_n"]) == r["n"]
        hits = sum(a * n / 100.0 for a, n in zip(r["per_class_top1"], r["per_class_n"], strict=True) if n)
        assert hits / r["n"] * 100.0 == pytest.approx(r["top1"], abs=1e-9)
    from compconv.train.__main__ import main

    assert main(["eval", str(full_run["dir"]), "--split", "train", "--per-class", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "split train" in out and "recorded" not in out and "airplane" in out
    assert main(["eval", str(full_run["dir"]), "--split", "train", "--check"]) == 2
    assert "drop --split" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no 'nope' folder"):
        evaluate_checkpoint(last, split="nope", progress=False)


def test_truncated_checkpoint_is_refused_and_left_untouched(full_run: dict, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(full_run["dir"], run)
    last = run / "checkpoints" / "last.pt"
    blob = last.read_bytes()
    last.write_bytes(blob[: len(blob) // 2])
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(resume=run)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        evaluate_checkpoint(last, progress=False)
    assert last.read_bytes() == before  # refused, never rewritten
    last.write_bytes(b"\x00" * 1000)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(last)
    torch.save({"model": {}}, last)
    with pytest.raises(CheckpointError, match="not a compconv training checkpoint"):
        load_checkpoint(last)


def test_a_failed_write_keeps_the_last_good_checkpoint(full_run: dict, tmp_path: Path, monkeypatch) -> None:
    good = tmp_path / "last.pt"
    shutil.copy(full_run["dir"] / "checkpoints" / "last.pt", good)
    before = good.read_bytes()
    state = load_checkpoint(good)

    def dying_save(obj: object, f) -> None:  # a crash half way through writing
        f.write(before[:1000])
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(state, good)
    assert good.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(good)["epoch"] == 2


# ------------------------------------------------------------------------------------------ bad configs


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"model": "cifar_resnet21"}, ValueError, "unknown model 'cifar_resnet21'.*cifar_resnet20"),
        ({"method": "compcnov"}, ValueError, "method must be one of .*compconv"),
        (
            {"dataset": "folder", "data_dir": "{tmp}/missing"},
            FileNotFoundError,
            "data_dir '.*/missing' does not exist; pass --data-dir ROOT",
        ),
    ],
)
def test_bad_configs_give_clear_errors(tmp_path: Path, kw: dict, exc: type, match: str) -> None:
    kw = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(exc, match=match):
        train(tiny_config(tmp_path, **kw))
    assert not (tmp_path / "run").exists()


def test_folder_without_images_is_a_clear_error(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
    (tmp_path / "data" / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images found under .*train"):
        train(tiny_config(tmp_path, dataset="folder", data_dir=str(tmp_path / "data")))


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    from compconv.train.__main__ import main

    base = ["train", "--data-dir", str(CIFAR), "--out-dir", str(tmp_path), "--no-progress"]
    assert main([*base, "--batch-size", "0"]) == 2
    assert "batch_size must be a positive integer, but got 0" in capsys.readouterr().err
    assert main([*base, "--dataset", "imagenet21k"]) == 2
    assert "dataset must be one of cifar10, cifar100, folder, but got 'imagenet21k'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_offline_cifar_download_says_what_to_pass_instead(tmp_path: Path, monkeypatch) -> None:
    from torchvision import datasets

    def offline(*a: object, **k: object) -> None:
        if k.get("download"):
            raise OSError("[Errno -3] Temporary failure in name resolution")
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(datasets, "CIFAR10", offline)
    (tmp_path / "empty").mkdir()  # an existing directory without CIFAR files (a missing one is refused)
    with pytest.raises(FileNotFoundError, match="could not download cifar10.*Offline\\? Pass --data-dir"):
        train(tiny_config(tmp_path, data_dir=str(tmp_path / "empty")))


def test_readme_table_from_results_json(full_run: dict) -> None:
    from compconv.train.results import markdown_table

    res = full_run["res"]
    row = markdown_table([full_run["dir"]]).splitlines()[2]
    assert row.startswith("| full | ") and f"| {res['top1']:.2f} |" in row
    assert f"| {res['params']:,} | {res['macs']:,} |" in row and row.endswith("| 2/2 |")


def test_resume_accepts_the_original_command_line_and_refuses_a_different_recipe(full_run: dict, capsys) -> None:
    from compconv.train.__main__ import main

    d = full_run["dir"]
    assert main(["train", "--resume", str(d), "--config", str(d / "config.yaml"), "--no-progress"]) == 0
    assert "epochs 2/2" in capsys.readouterr().out  # already finished: nothing to do, results rewritten
    assert main(["train", "--resume", str(d), "--preset", "cifar_cpu30", "--no-progress"]) == 2
    assert "cannot change '" in capsys.readouterr().err


def test_compiled_training_matches_eager_and_saves_a_plain_checkpoint(full_run: dict) -> None:
    # --compile: the step runs under torch.compile; the first epoch equals the eager one up to float
    # rounding, and the checkpoint holds the plain model's keys (no "_orig_mod." prefix), so it loads anywhere.
    out = full_run["out"]
    res = train(tiny_config(out, name="compiled", compile=True, stop_after=1, **RUN), command="pytest compiled")
    a, b = full_run["res"]["history"][0], res["history"][0]
    # Inductor reorders float sums; over 8 SGD steps from random init that moves the epoch's loss by ~0.3%.
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-2)
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=5e-2)
    state = load_checkpoint(out / "compiled" / "checkpoints" / "last.pt")
    ref = load_checkpoint(full_run["dir"] / "checkpoints" / "last.pt")
    assert state["model"].keys() == ref["model"].keys()
    assert state["config"]["compile"] is True


def test_machines_by_epoch_groups_runs_of_epochs_and_names_unrecorded_ones() -> None:
    # A run resumed on another VM: its epoch times are only comparable within one machine's epochs.
    from compconv.train.results import machines_by_epoch

    hist = [{"epoch": 1}, {"epoch": 2}] + [
        {"epoch": e, "machine": m} for e, m in ((3, "Intel Xeon, 2 threads"), (4, "AMD EPYC, 2 threads"))
    ]
    hist.append({"epoch": 5, "machine": "AMD EPYC, 2 threads"})
    assert machines_by_epoch(hist) == [
        {"epochs": [1, 2], "machine": "not recorded"},
        {"epochs": [3, 3], "machine": "Intel Xeon, 2 threads"},
        {"epochs": [4, 5], "machine": "AMD EPYC, 2 threads"},
    ]
    assert machines_by_epoch([]) == []
