"""What keeps a run from losing work: the run-directory checks, stale temporaries, divergence.

* A new run never starts in a directory that already holds a run's files (``RunExistsError``): only
  ``--resume`` continues one, so no ``best.pt``, ``metrics.csv`` or ``results.json`` is replaced silently.
* Every file is written as ``.<name>.<pid>.tmp`` and moved into place; a process killed during a write
  leaves that temporary behind. ``clean_stale_temporaries`` deletes those of *dead* processes only (a
  live process may be writing its own right now).
* ``TrainingDiverged`` is raised as soon as a step produces a non-finite loss or non-finite weights; the
  engine then keeps the last finite checkpoint and marks ``results.json`` as diverged.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

__all__ = [
    "RunExistsError",
    "TrainingDiverged",
    "check_new_run_dir",
    "clean_stale_temporaries",
    "pid_alive",
]

# ".last.pt.1234.tmp", ".results.json.1234.tmp", ".curves.1234.tmp.png": what this package writes.
_TMP = re.compile(r"^\..+\.(\d+)\.tmp(\.png)?$")


class RunExistsError(ValueError):
    """A new run was asked for in a directory that already holds a run's files."""


class TrainingDiverged(RuntimeError):
    """A step produced a non-finite loss or non-finite weights."""

    def __init__(self, message: str, epoch: int, step: int, what: str) -> None:
        super().__init__(message)
        self.epoch, self.step, self.what = epoch, step, what


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the write temporaries (``.<name>.<pid>.tmp``) of dead processes in a run directory.

    Looks in the run directory and its ``checkpoints/``; a temporary whose pid is alive is kept. Returns
    the deleted paths.
    """
    run_dir = Path(run_dir)
    removed = []
    for d in (run_dir, run_dir / "checkpoints"):
        if not d.is_dir():
            continue
        for e in os.scandir(d):
            m = _TMP.match(e.name)
            if m and e.is_file(follow_symlinks=False) and not pid_alive(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
                    removed.append(Path(e.path))
    return removed


def check_new_run_dir(run_dir: str | os.PathLike[str]) -> None:
    """Refuse to start a new run in ``run_dir`` if it holds anything but stale temporaries.

    Raises ``RunExistsError`` naming the files found and the two ways out (``--resume`` or another name).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunExistsError(f"run directory {str(run_dir)!r} exists and is not a directory")
    if not run_dir.is_dir():
        return
    clean_stale_temporaries(run_dir)
    found = sorted(e.name for e in os.scandir(run_dir))
    if not found:
        return
    has_ckpt = (run_dir / "checkpoints" / "last.pt").is_file()
    way = (
        f"continue it with `compconv train --resume {run_dir}`"
        if has_ckpt
        else "it has no checkpoints/last.pt to resume from; delete the directory to start over"
    )
    raise RunExistsError(
        f"run directory {str(run_dir)!r} already holds a checkpoint or other run files ({', '.join(found[:6])}"
        f"{', ...' if len(found) > 6 else ''}); {way}, or choose another --name / --out-dir"
    )
