"""Shared bits of the training tests: where the real data is, and a tiny-run config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from compconv.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("COMPCONV_DATA") or REPO.parent / "shared" / "data")
CIFAR = DATA / "cifar10"

needs_cifar = pytest.mark.skipif(
    not (CIFAR / "train").is_dir(),
    reason=f"real CIFAR-10 folder not found at {CIFAR} (set COMPCONV_DATA to the shared data directory)",
)


def tiny_config(out_dir: Path, **kw: object) -> TrainConfig:
    """ResNet-20 on a seeded slice of the real CIFAR-10 folder; one thread, so runs are deterministic."""
    base: dict[str, object] = dict(
        model="cifar_resnet20",
        dataset="cifar10",
        data_dir=str(CIFAR),
        train_subset=320,
        eval_subset=200,
        epochs=2,
        batch_size=64,
        lr=0.05,
        nesterov=True,
        weight_decay=5e-4,
        scheduler="cosine",
        threads=1,
        out_dir=str(out_dir),
        name="run",
        progress=False,
        tensorboard=False,
        plots=False,
        seed=0,
    )
    base.update(kw)
    cfg = TrainConfig()
    for k, v in base.items():
        setattr(cfg, k, v)
    return cfg.validate()


def tiny_tree(
    root: Path,
    classes: tuple[str, ...] = ("airplane", "cat"),
    n_train: int = 8,
    n_eval: int = 4,
    eval_split: str = "val",
) -> Path:
    """``root/train/<class>/*.jpg`` and ``root/<eval_split>/<class>/*.jpg``: copies of real CIFAR-10 images
    (32x32 JPEG) when the shared folder is present, else seeded random 32x32 PNG-in-JPEG images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n, src in (("train", n_train, "train"), (eval_split, n_eval, "test")):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                real = CIFAR / src / c / f"{i:04d}.jpg"
                if real.is_file():
                    (d / real.name).write_bytes(real.read_bytes())
                else:
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:04d}.jpg")
    return root


def tiny_folder_config(data: Path, out_dir: Path, **kw: object) -> TrainConfig:
    """A run of a few seconds on a ``tiny_tree``: ResNet-20, batch 8, one thread, nothing but the run files."""
    base: dict[str, object] = dict(
        dataset="folder",
        data_dir=str(data),
        train_subset=None,
        eval_subset=None,
        batch_size=8,
        cache_dir=str(out_dir / "cache"),
        workers=0,
    )
    base.update(kw)
    return tiny_config(out_dir, **base)
