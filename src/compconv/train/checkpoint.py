"""Checkpoints: atomic writes, full training state, and a refusal to trust a damaged file.

A checkpoint is a ``torch.save`` dict (``torch.load(path)["model"]`` is a plain state dict) holding the
model (unwrapped from DDP), optimizer, LR scheduler, the RNG states of python / numpy / torch (and CUDA),
the number of completed epochs, the metric history, the best accuracy and the resolved config. It is
written to ``<name>.tmp``, flushed, fsynced and moved over the old file with ``os.replace``: a crash or a
failed write leaves the previous checkpoint untouched. Reading checks that the file loads, has every key
of this format and a matching format version; anything else raises ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "capture_rng",
    "find_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "optimizer", "scheduler", "epoch", "config", "history", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted (truncated, corrupt, or not one of ours)."""


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` atomically to ``path`` (tmp file + fsync + ``os.replace``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # the write failed: drop the partial file, keep the old checkpoint
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a training checkpoint; raises CheckpointError (never returns a partial state)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        # weights_only=False: the state holds python/numpy RNG states and the config (our own files only).
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - zip errors, unpickling errors, EOF: all mean "damaged"
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated and was not loaded ({type(e).__name__}: {e}). "
            "It was left untouched; resume from another checkpoint (e.g. best.pt) or start a new run."
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a compconv training checkpoint (not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a compconv training checkpoint: missing {missing}")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format_version {state['format_version']}, this compconv reads "
            f"{FORMAT_VERSION}"
        )
    for k, v in state["model"].items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite values in {k!r}")
    return state


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A run directory -> its ``last.pt``; a file -> itself."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    if not p.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(p)!r}; pass a run directory (with checkpoints/last.pt) or a .pt file"
        )
    return p
