"""Training config (presets, files, overrides, validation) and the in-memory batch loader (no data needed)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from compconv.train.config import PRESETS, TrainConfig, parse_set, resolve_config
from compconv.train.data import ArrayLoader, epoch_generator
from compconv.train.engine import invocation, lr_factor

# ------------------------------------------------------------------------------------------------- config


def test_paper_presets_are_the_papers_recipes() -> None:
    c = resolve_config("cifar_paper")
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.milestones) == (150, 128, 0.1, 0.9, [60, 120])
    assert c.scheduler == "multistep" and c.gamma == pytest.approx(1 / 20) and c.augment == "standard"
    i = resolve_config("imagenet_paper")
    assert (i.epochs, i.batch_size, i.lr, i.milestones, i.gamma) == (100, 256, 0.1, [30, 60, 90], 0.1)
    cpu = resolve_config("cifar_cpu30")
    assert (cpu.epochs, cpu.nesterov, cpu.weight_decay, cpu.scheduler) == (30, True, 5e-4, "cosine")
    assert cpu.preset == "cifar_cpu30"


def test_paper_schedule_divides_by_20_at_epochs_60_and_120() -> None:
    c = resolve_config("cifar_paper")
    f = lr_factor(c, steps_per_epoch=10)
    assert f(0) == 1.0 and f(599) == 1.0  # epoch 59
    assert f(600) == pytest.approx(1 / 20) and f(1199) == pytest.approx(1 / 20)
    assert f(1200) == pytest.approx(1 / 400)


def test_cosine_with_warmup_reaches_zero_at_the_end() -> None:
    c = resolve_config("cifar_cpu30", overrides={"warmup_epochs": 1})
    f = lr_factor(c, steps_per_epoch=4)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup over the first epoch
    assert f(4) == 1.0 and f(30 * 4) == pytest.approx(0.0)
    mid = 4 + (30 * 4 - 4) // 2
    assert f(mid) == pytest.approx(0.5 * (1 + math.cos(math.pi * (mid - 4) / (30 * 4 - 4))))


def test_resolution_order_preset_then_file_then_overrides(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 0.05\nmethod: compconv\nmethod_options: {c0: 64}\n")
    c = resolve_config("cifar_cpu30", str(f), {"lr": 0.02})
    assert (c.epochs, c.lr, c.method, c.method_options, c.nesterov) == (7, 0.02, "compconv", {"c0": 64}, True)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"batch_size": 32}))
    assert resolve_config(None, str(j)).batch_size == 32


def test_set_values_are_parsed_and_coerced() -> None:
    ov = parse_set(
        ["epochs=3", "lr=1e-2", "milestones=[5,8]", "nesterov=true", "name=none", "method_options.c0=16"]
    )
    c = TrainConfig()
    from compconv.train.config import apply_overrides

    apply_overrides(c, ov)
    assert (c.epochs, c.lr, c.milestones, c.nesterov, c.name, c.method_options) == (
        3,
        0.01,
        [5, 8],
        True,
        None,
        {"c0": 16},
    )
    assert isinstance(c.epochs, int) and isinstance(c.lr, float)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"epochs": -1}, "epochs must be a positive integer"),
        ({"dataset": "mnist"}, "dataset must be one of cifar10, cifar100, folder"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of sgd, adamw"),
        ({"scheduler": "multistep"}, "needs milestones"),
        ({"dataset": "folder"}, "needs data_dir"),
        ({"lr": 0}, "lr must be > 0"),
        ({"method_options": {"c0": 16}}, "without a method"),
        ({"bach_size": 3}, "unknown config key 'bach_size'. Did you mean batch_size"),
        ({"epochs": "ten"}, "config key 'epochs' expects int"),
    ],
)
def test_bad_config_values_name_the_key_and_the_allowed_values(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_config(None, None, overrides)


def test_unknown_preset_and_missing_file() -> None:
    with pytest.raises(ValueError, match="preset must be one of .*cifar_cpu30"):
        resolve_config("cifar_fast")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_config(None, "/nonexistent/config.yaml")


def test_every_preset_validates() -> None:
    for name in PRESETS:
        resolve_config(name)


# ------------------------------------------------------------------------------------------ array loader


def _toy(n: int = 37, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.arange(n)


def test_crop_and_flip_match_pad_then_slice() -> None:
    x, y = _toy()
    loader = ArrayLoader(x, y, 10, train=True, mean=(0, 0, 0), std=(1, 1, 1), padding=2, seed=3)
    loader.set_epoch(5)
    # The same draws the loader makes: permutation, then offsets, then flips, from the epoch generator.
    g = epoch_generator(3, 5)
    perm = torch.randperm(len(x), generator=g)
    off = torch.randint(0, 5, (len(x), 2), generator=g)
    flip = torch.rand(len(x), generator=g) < 0.5
    got = torch.cat([b for b, _ in loader])
    labels = torch.cat([lab for _, lab in loader])
    assert torch.equal(labels, y[perm])
    xp = F.pad(x, (2, 2, 2, 2))
    for j, i in enumerate(perm.tolist()):
        want = xp[i, :, off[i, 0] : off[i, 0] + 8, off[i, 1] : off[i, 1] + 8]
        if flip[i]:
            want = want.flip(2)
        assert torch.allclose(got[j], want.float() / 255.0, atol=1e-6)  # x * (1/255) vs x / 255
    assert 0 < int(flip.sum()) < len(x)


def test_epochs_are_reproducible_and_differ_from_each_other() -> None:
    x, y = _toy()
    a = ArrayLoader(x, y, 8, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, seed=0)
    b = ArrayLoader(x, y, 8, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, seed=0)
    a.set_epoch(2)
    b.set_epoch(2)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
    b.set_epoch(3)
    assert not torch.equal(next(iter(a))[1], next(iter(b))[1])


def test_ranks_split_an_epoch_like_distributed_sampler() -> None:
    x, y = _toy(n=37)
    one = ArrayLoader(x, y, 37, train=True, mean=(0,) * 3, std=(1,) * 3, seed=0, augment=False)
    ranks = [
        ArrayLoader(x, y, 5, train=True, mean=(0,) * 3, std=(1,) * 3, seed=0, augment=False, rank=r, world=2)
        for r in range(2)
    ]
    seen = [torch.cat([lab for _, lab in r]) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 19  # ceil(37 / 2): one sample repeated to even out the ranks
    full = next(iter(one))[1]
    assert set(torch.cat(seen).tolist()) == set(full.tolist())
    padded = torch.cat([full, full[:1]])
    assert torch.equal(seen[0], padded[0::2]) and torch.equal(seen[1], padded[1::2])


def test_eval_split_covers_each_image_exactly_once_across_ranks() -> None:
    x, y = _toy(n=11)
    parts = [
        torch.cat(
            [
                lab
                for _, lab in ArrayLoader(x, y, 4, train=False, mean=(0,) * 3, std=(1,) * 3, rank=r, world=3)
            ]
        )
        for r in range(3)
    ]
    assert sorted(torch.cat(parts).tolist()) == list(range(11))


def test_normalisation() -> None:
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    xb, _ = next(
        iter(
            ArrayLoader(
                x,
                torch.zeros(2, dtype=torch.long),
                2,
                train=False,
                mean=(0.5, 0.5, 0.5),
                std=(0.25, 0.5, 1.0),
            )
        )
    )
    assert torch.allclose(xb[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


@pytest.mark.parametrize(("argv", "recorded"), [
    (["/venv/bin/compconv", "train", "--epochs", "2"], "compconv train --epochs 2"),
    (["/src/compconv/__main__.py", "train", "--name", "a b"], "compconv train --name 'a b'"),
    (["/src/compconv/train/__main__.py", "eval", "runs/x"], "compconv eval runs/x"),
    (["benchmarks/compress_evidence.py", "--rows", "thin"], "python benchmarks/compress_evidence.py --rows thin"),
])
def test_the_recorded_command_is_the_one_that_ran(argv: list[str], recorded: str) -> None:
    # A script calling train() is recorded as itself, never as a compconv subcommand that does not exist.
    assert invocation(argv) == recorded


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", ".", "", "a\\b"])
def test_a_run_name_is_a_folder_under_out_dir(name: str) -> None:
    """--name ../../etc would write the run outside --out-dir."""
    from compconv.train.config import TrainConfig

    with pytest.raises(ValueError, match="name must be a folder name under out_dir"):
        TrainConfig(name=name).validate()
    TrainConfig(name="r20-vanilla-cpu30-s0").validate()


def test_fine_tune_notes_follow_the_measured_recipes() -> None:
    """compconv train --init of a compress file: from-scratch lr, short runs with BN training, frozen BN + big lr."""
    from compconv.train.config import TrainConfig
    from compconv.train.engine import fine_tune_notes

    def notes(**kw):  # noqa: ANN202
        return " | ".join(fine_tune_notes(TrainConfig(init="f.pt", **kw), 391, has_bn=True))

    assert "lr 0.1 is a from-scratch rate" in notes(lr=0.1, epochs=10) and "BatchNorm" not in notes(lr=0.1, epochs=10)
    assert notes(lr=0.01, epochs=10) == ""  # the fine-tune recipe: nothing to say
    assert notes(lr=0.01, epochs=1, max_steps=8).startswith("8 steps with BatchNorm in training mode")
    assert notes(lr=5e-4, epochs=1, max_steps=8, freeze_bn_stats=True) == ""
    frozen = notes(lr=0.01, epochs=1, max_steps=8, freeze_bn_stats=True)
    assert frozen.startswith("lr 0.01 with frozen BN statistics") and frozen.endswith("pass --lr 5e-4")
    assert "from-scratch" not in notes(lr=0.1, epochs=1, max_steps=8, freeze_bn_stats=True)
    assert fine_tune_notes(TrainConfig(init="f.pt", lr=0.01, max_steps=8), 391, has_bn=False) == []
