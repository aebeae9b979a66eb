"""Training and evaluation: ``compconv train`` / ``compconv eval`` and their Python API.

``train(TrainConfig(...))`` or ``train(resume="runs/NAME")``; ``evaluate_checkpoint(path)``;
``resolve_config(preset, file, overrides)``; presets in ``PRESETS``. See ``docs/training.md``.
"""

from compconv.train.config import PRESETS, TrainConfig, resolve_config
from compconv.train.engine import build_model, evaluate, evaluate_checkpoint, train

__all__ = [
    "PRESETS",
    "TrainConfig",
    "build_model",
    "evaluate",
    "evaluate_checkpoint",
    "resolve_config",
    "train",
]
