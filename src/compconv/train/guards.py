"""What keeps a run from losing work: the run-directory checks, stale temporaries, divergence.

* A new run never starts in a directory that already holds a run's files (``RunExistsError``): only
  ``--resume`` continues one, so no ``best.pt``, ``metrics.csv`` or ``results.json`` is replaced silently.
* Every file is written as ``.<name>.<pid>.tmp`` and moved into place; a process killed during a write
  leaves that temporary behind. ``clean_stale_temporaries`` deletes those of *dead* processes only (a
  live process may be writing its own right now).
* ``TrainingDiverged`` is raised as soon as a step produces a non-finite loss, weight or buffer; the
  engine then keeps the last finite checkpoint and marks ``results.json`` as diverged.
* ``run_lock`` keeps a second process out of a run directory in use (``.compconv.lock`` holds the pid and
  host; the lock of a dead process on this host is taken over).
* A directory left by a start killed before its first checkpoint (only ``config.yaml``, ``commands.txt``,
  ``tb/``) holds no work: a new run may start there again.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "LOCK_NAME",
    "RunExistsError",
    "RunLockedError",
    "TrainingDiverged",
    "check_new_run_dir",
    "clean_stale_temporaries",
    "pid_alive",
    "run_lock",
]

LOCK_NAME = ".compconv.lock"
# what a start writes before its first checkpoint: a directory holding only these lost no work
_START_FILES = {"config.yaml", "commands.txt", "tb", "checkpoints"}

# ".last.pt.1234.tmp", ".results.json.1234.tmp", ".curves.1234.tmp.png": what this package writes.
_TMP = re.compile(r"^\..+\.(\d+)\.tmp(\.png)?$")


class RunExistsError(ValueError):
    """A new run was asked for in a directory that already holds a run's files."""


class RunLockedError(RuntimeError):
    """The run directory is in use by another live process."""


class TrainingDiverged(RuntimeError):
    """A step produced a non-finite loss, weight or buffer (or a state about to be saved holds one)."""

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


def _read_lock(path: Path) -> tuple[int, str] | None:
    try:
        pid, host = path.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _lock_is_stale(path: Path) -> bool:
    """A lock of a dead process on this host (or an unreadable one) is stale."""
    got = _read_lock(path)
    return got is None or (got[1] == socket.gethostname() and not pid_alive(got[0]))


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``RUN/.compconv.lock`` (pid and host) while a process works in the run directory.

    A stale lock (its process is dead) is taken over; a live one raises ``RunLockedError`` naming the pid,
    so two ``--resume`` of the same run never interleave their writes. The lock is removed on exit.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_is_stale(path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            pid, host = _read_lock(path) or (0, "?")
            raise RunLockedError(
                f"run directory {str(run_dir)!r} is in use by process {pid} on {host} (lock file {str(path)!r}); "
                "wait for it to end, or delete the lock file if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise RunLockedError(f"could not take the lock {str(path)!r}: another process keeps taking it")
    try:
        yield path
    finally:
        if _read_lock(path) == (os.getpid(), socket.gethostname()):
            with contextlib.suppress(OSError):
                path.unlink()


def check_new_run_dir(run_dir: str | os.PathLike[str]) -> None:
    """Refuse to start a new run in ``run_dir`` if it holds work (a checkpoint, metrics, results, ...).

    Stale temporaries and a stale lock are removed first. A directory holding only what a start writes
    before its first checkpoint (``config.yaml``, ``commands.txt``, ``tb/``, an empty ``checkpoints/``) lost
    nothing: the new run starts there (a note says so). Raises ``RunExistsError`` naming the files found and
    the ways out (``--resume`` or another name), ``RunLockedError`` when a live process holds the directory.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunExistsError(f"run directory {str(run_dir)!r} exists and is not a directory")
    if not run_dir.is_dir():
        return
    clean_stale_temporaries(run_dir)
    lock = run_dir / LOCK_NAME
    if lock.exists():
        if not _lock_is_stale(lock):
            pid, host = _read_lock(lock) or (0, "?")
            raise RunLockedError(f"run directory {str(run_dir)!r} is in use by process {pid} on {host}")
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
    found = sorted(e.name for e in os.scandir(run_dir))
    if not found:
        return
    ckpts = run_dir / "checkpoints"
    if set(found) <= _START_FILES and not (ckpts.is_dir() and any(os.scandir(ckpts))):
        print(
            f"compconv train: {run_dir} holds only the files of a start stopped before its first checkpoint "
            f"({', '.join(found)}); starting the run there again",
            file=sys.stderr,
        )
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
