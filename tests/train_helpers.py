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
