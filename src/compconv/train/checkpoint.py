"""Checkpoints: atomic writes, full training state, and a refusal to trust a damaged file.

A checkpoint is a ``torch.save`` dict (``torch.load(path)["model"]`` is a plain state dict) holding the
model (unwrapped from DDP), optimizer, LR scheduler, the RNG states of python / numpy / torch (and CUDA),
the number of completed epochs, the metric history, the best accuracy and the resolved config. It is
written to ``<name>.tmp``, flushed, fsynced and moved over the old file with ``os.replace``: a crash or a
failed write leaves the previous checkpoint untouched; a write that fails for lack of space or permission
raises ``RunWriteError`` (one line naming the path and the cause). Reading first verifies the zip archive's
own CRC-32 of every entry (``torch.save`` writes one per tensor, so a changed byte anywhere is caught, in
checkpoints written by any compconv version), then that the file loads, has every key of this format and a
matching format version, that the model (weights and buffers) and the optimizer state are finite and that
the recorded normalisation is finite with a positive std; anything else raises ``CheckpointError`` naming
the file, with advice that fits it (never "resume from best.pt" for best.pt itself).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "NotPlainDataError",
    "RunWriteError",
    "check_finite",
    "capture_rng",
    "find_checkpoint",
    "load_checkpoint",
    "load_model_state",
    "not_a_file",
    "read_verified",
    "restore_rng",
    "save_checkpoint",
]

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "optimizer", "scheduler", "epoch", "config", "history", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted (truncated, corrupt, or not one of ours)."""


class NotPlainDataError(CheckpointError):
    """An intact file that ``torch.load(weights_only=True)`` refuses: it holds pickled Python objects (e.g. a
    training checkpoint, which stores RNG states), so a reader of plain-data files cannot take it."""


class RunWriteError(OSError):
    """A run file could not be written (disk full, read-only folder, ...); the message names path and cause."""

    def __str__(self) -> str:  # the one-line message, not OSError's "[Errno N] strerror: filename"
        return str(self.args[0]) if self.args else super().__str__()


def write_error(path: str | os.PathLike[str], err: BaseException) -> RunWriteError:
    """A one-line ``RunWriteError`` for a failed write of ``path``, with the cause in words.

    ``torch.save`` reports a full disk as a ``RuntimeError`` ("unexpected pos ..."), so for anything that
    is not an ``OSError`` with an errno the free space of the folder is looked up to name the cause.
    """
    path = Path(path)
    code = getattr(err, "errno", None)
    if code is None:
        try:
            st = os.statvfs(path.parent)
            if st.f_bavail * st.f_frsize < 1 << 20:  # under 1 MiB left: the write ran out of space
                code = errno.ENOSPC
        except OSError:
            pass
    if code is not None:
        cause = f"{os.strerror(code)} (errno {code})"
    else:
        cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    out = RunWriteError(f"cannot write {str(path)!r}: {cause}; the files already there were left as they were")
    out.errno, out.filename = code or errno.EIO, str(path)
    return out


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # ENOSPC, EROFS, EACCES; torch.save's RuntimeError on a full disk
        if isinstance(e, RunWriteError):
            raise
        raise write_error(path, e) from e
    finally:
        if tmp.exists():  # the write failed: drop the partial file, keep the old checkpoint
            with contextlib.suppress(OSError):
                tmp.unlink()
    return path


def _advice(path: Path) -> str:
    """What to do instead: only point to a best.pt that exists and is not the damaged file itself."""
    best = path.parent / "best.pt"
    if path.name != "best.pt" and path.parent.name == "checkpoints" and best.is_file():
        return (
            f"It was left untouched. Evaluate {best}, or start a new run from it: "
            f"`compconv train --resume {best} --name NEW_NAME`; or restore the file from a copy."
        )
    return "It was left untouched; restore it from a copy or start a new run."


def _verify_archive(path: Path, what: str = "checkpoint") -> None:
    """Check the CRC-32 of every entry of the zip archive ``torch.save`` wrote (detects changed bytes)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{what} {str(path)!r} is corrupt or truncated and was not loaded ({type(e).__name__}: {e}). "
            + _advice(path)
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"{what} {str(path)!r} is corrupt: entry {bad!r} fails its CRC-32 check (bytes changed on "
            "disk or in transfer). " + _advice(path)
        )


def _first_non_finite(obj: Any) -> str | None:
    for name, t in _tensors(obj, ""):
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def not_a_file(path: str | os.PathLike[str], what: str) -> OSError:
    """The error for a file argument that is not a file: IsADirectoryError naming the checkpoints in a directory
    (a run directory is the usual slip), else FileNotFoundError. ``what`` names the argument."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(str(f) for f in (path / "checkpoints").glob("*.pt")) or sorted(map(str, path.glob("*.pt")))
        hint = f"; the checkpoints in it: {', '.join(inside[:3])}" if inside else ""
        return IsADirectoryError(f"{what} {str(path)!r} is a directory, not a file{hint}")
    if path.exists():  # a device, a FIFO: nothing torch.load could read
        return FileNotFoundError(f"{what} {str(path)!r} is not a regular file")
    return FileNotFoundError(f"{what} {str(path)!r} does not exist")


def read_verified(
    path: str | os.PathLike[str],
    what: str = "checkpoint",
    *,
    weights_only: bool = False,
    map_location: str | torch.device = "cpu",
) -> Any:
    """The one loader of every file compconv takes weights from (resume, eval, ``--weights``, ``--init``,
    ``--teacher``, ``compconv compress --weights``, ``compconv.load``).

    Verifies the zip CRC-32 of every entry, loads the file with ``torch.load`` and refuses any non-finite
    floating tensor anywhere in it. ``what`` names the argument in messages ("weights file", "teacher", ...).
    Raises FileNotFoundError for a missing file, IsADirectoryError for a directory (naming the checkpoints in
    it) and CheckpointError (a ValueError) naming the file otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise not_a_file(path, what)
    _verify_archive(path, what)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - zip errors, unpickling errors, EOF: all mean "damaged"
        if weights_only and isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            # intact, but holds more than plain data (e.g. a training checkpoint's RNG states)
            raise NotPlainDataError(
                f"{what} {str(path)!r} holds pickled Python objects beyond tensors and plain data, so it was not "
                "loaded (torch.load(weights_only=True))"
            ) from None
        raise CheckpointError(
            f"{what} {str(path)!r} is corrupt or truncated and was not loaded ({type(e).__name__}: {e}). "
            + _advice(path)
        ) from None
    bad = _first_non_finite(obj)
    if bad is not None:
        raise CheckpointError(
            f"{what} {str(path)!r} holds non-finite values in {bad!r}; it was not loaded (training from "
            "it would only spread NaN). " + _advice(path)
        )
    return obj


def _tensors(obj: Any, prefix: str) -> Any:
    """(name, tensor) for every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def check_finite(state: dict[str, Any]) -> str | None:
    """The name of the first non-finite floating tensor of the model or optimizer state, else None."""
    for part in ("model", "optimizer"):
        for name, t in _tensors(state.get(part) or {}, part):
            if t.is_floating_point() and not torch.isfinite(t).all():
                return name
    return None


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a training checkpoint; raises CheckpointError (never returns a partial state)."""
    # weights_only=False: the state holds python/numpy RNG states and the config (our own files only).
    state = read_verified(path, "checkpoint", map_location=map_location)
    path = Path(path)
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
    bad = check_finite(state)
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds non-finite values in {bad!r}; it was not loaded (training from "
            "it would only spread NaN). " + _advice(path)
        )
    d = state.get("data") or {}
    for key in ("mean", "std"):
        vals = d.get(key)
        if vals is not None and not all(
            isinstance(v, (int, float)) and math.isfinite(v) and (key == "mean" or v > 0) for v in vals
        ):
            raise CheckpointError(
                f"checkpoint {str(path)!r} records the normalisation {key} {list(vals)}: it must be finite"
                + (" and > 0" if key == "std" else "")
                + " (images normalised with it would be NaN or inf). " + _advice(path)
            )
    return state


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``model.load_state_dict(state["model"])``; missing/unexpected keys or shapes raise CheckpointError."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the model its config builds: "
            f"{' '.join(line.strip() for line in first[:3])}. " + _advice(Path(path))
        ) from None


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
