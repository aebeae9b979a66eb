"""What ``--resume`` may continue, where a run's recorded data is, and a ``best.pt`` that matches its record.

* ``resume_target``: ``--resume RUN`` or ``--resume RUN/checkpoints/last.pt`` continues that run in place.
  Any other checkpoint (``best.pt``, a copied ``.pt``) would roll its run back or turn a foreign folder into
  a run directory, so it only *branches* a new run (``--name NEW``, optionally ``--out-dir``), in a new
  directory; without ``--name`` it is refused with the exact commands to use.
* ``recorded_data_dir``: checkpoints written before absolute paths were recorded hold the ``data_dir`` as
  typed (``../shared/data/cifar10``); it is resolved against the directory the run was started from
  (found from the run directory and its recorded ``out_dir``) or the run's repository root, never the
  current directory; when neither holds it, ``--data-dir`` is asked for.
* ``best_record`` / ``check_best``: ``best.pt`` must hold the epoch the history records as best. The
  engine writes ``last.pt`` first, then ``best.pt``: a kill or a failed write in between leaves a ``last.pt``
  that is itself the best epoch, from which ``best.pt`` is rebuilt on resume; any other mismatch is named.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from compconv.train import checkpoint as ckpt_mod

__all__ = ["best_record", "check_best", "recorded_data_dir", "resume_target", "run_dir_of"]


def run_dir_of(path: Path) -> Path | None:
    """``RUN`` for a checkpoint ``RUN/checkpoints/<file>`` of a run directory (it has a config.yaml), else None."""
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent
    return None


def resume_target(resume: str | os.PathLike[str], name: str | None, out_dir: str | None) -> tuple[Path, Path, bool]:
    """``(checkpoint, run directory, branch)`` for ``--resume``; ``branch``: a new run directory.

    Raises FileNotFoundError for a missing run/checkpoint (a run stopped before its first checkpoint is
    told how to start again), ValueError for a checkpoint other than a run's ``last.pt`` without ``--name``.
    """
    p = Path(resume)
    if p.is_dir():
        last = p / "checkpoints" / "last.pt"
        if last.is_file():
            return last, p, False
        if (p / "config.yaml").is_file() and not (p / "metrics.csv").exists():
            raise FileNotFoundError(
                f"run {str(p)!r} has no checkpoint: it was stopped before its first one was written, so there is "
                "nothing to resume; start it again with its original command (commands.txt): a directory "
                "holding no checkpoint and no metrics is started over"
            )
        raise FileNotFoundError(f"no checkpoint at {str(last)!r}; pass a run directory (with checkpoints/last.pt)")
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(p)!r}; pass a run directory (with checkpoints/last.pt)")
    run = run_dir_of(p)
    if run is not None and p.name == "last.pt":
        return p, run, False
    if not name:
        cont = f"`compconv train --resume {run}`" if run is not None else None
        raise ValueError(
            f"{str(p)!r} is not a run's checkpoints/last.pt: resuming in place from it would overwrite "
            + (f"the later history of its run {str(run)!r}" if run is not None else f"files in {str(p.parent)!r}")
            + ". "
            + (f"To continue that run: {cont}. " if cont else "")
            + f"To start a new run from this checkpoint: `compconv train --resume {p} --name NEW_NAME` "
            "(optionally --out-dir DIR; a new directory, the recipe stays the checkpoint's)"
        )
    return p, Path(out_dir or "runs") / name, True


def _repo_root(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / ".git").exists():
            return d
    return None


def recorded_data_dir(data_dir: str | None, run_dir: Path, out_dir: str | None) -> str | None:
    """A recorded ``data_dir`` as an absolute path; a relative one (older versions) found from the run.

    Tried in order: the directory the run was started from (``run_dir`` minus its recorded relative
    ``out_dir``), then the repository holding the run directory. Raises FileNotFoundError asking for
    ``--data-dir`` when neither holds it (the current directory is never used: a data folder found there
    would be scored as if it were the run's).
    """
    if not data_dir or Path(data_dir).expanduser().is_absolute():
        return data_dir
    run_dir = run_dir.resolve()
    bases: list[Path] = []
    if out_dir and not Path(out_dir).is_absolute():
        parts = Path(out_dir).parts
        if run_dir.parent.parts[-len(parts) :] == parts:
            bases.append(Path(*run_dir.parent.parts[: -len(parts)]))
    root = _repo_root(run_dir)
    if root is not None and root not in bases:
        bases.append(root)
    for b in bases:
        cand = (b / data_dir).resolve()
        if cand.is_dir():
            return str(cand)
    tried = ", ".join(repr(str((b / data_dir).resolve())) for b in bases) or "no start directory or repository found"
    raise FileNotFoundError(
        f"the checkpoint records the relative data_dir {data_dir!r} (written by an older compconv) and it is not "
        f"found from the run directory {str(run_dir)!r} (tried: {tried}); pass --data-dir with the location of "
        "the run's data"
    )


def best_record(history: list[dict[str, Any]]) -> tuple[int, float] | None:
    """``(epoch, top1)`` of the history's best evaluation: the first epoch reaching the maximum."""
    best: tuple[int, float] | None = None
    for r in history:
        t = r.get("test_top1")
        if t is not None and (best is None or t > best[1]):
            best = (int(r["epoch"]), float(t))
    return best


def check_best(ckpt_dir: Path, state: dict[str, Any]) -> int | None:
    """Make ``best.pt`` match the history's best epoch when possible; returns the epoch it holds, else None.

    ``state`` is the loaded ``last.pt``. Matching ``best.pt``: nothing to do. Missing or another epoch, and
    ``last.pt`` is itself the best epoch (a kill or failed write between the two saves): ``best.pt`` is
    rebuilt from it. Otherwise a warning names the mismatch and None is returned (``results.json`` then
    records no best checkpoint until a better epoch writes one).
    """
    want = best_record(list(state.get("history") or []))
    path = ckpt_dir / "best.pt"
    if want is None:
        return None
    held: tuple[int, float | None] | None = None
    if path.is_file():
        try:
            b = ckpt_mod.load_checkpoint(path)
            held = (int(b["epoch"]), (b.get("metrics") or {}).get("top1"))
            if b.get("partial") is None and held == want:
                return want[0]
        except ckpt_mod.CheckpointError as e:
            print(f"compconv train: warning: {e}", file=sys.stderr)
    last_top1 = (state.get("metrics") or {}).get("top1")
    if state.get("partial") is None and (int(state["epoch"]), last_top1) == want:
        ckpt_mod.save_checkpoint(state, path)
        print(
            f"compconv train: rebuilt {path} from the resumed checkpoint (epoch {want[0]}, the recorded best, "
            f"top1 {want[1]:.2f}%; {'it held epoch ' + str(held[0]) if held else 'it was missing'})",
            file=sys.stderr,
        )
        return want[0]
    what = f"holds epoch {held[0]} (top1 {held[1]})" if held else "is missing or unreadable"
    print(
        f"compconv train: warning: {path} {what}, but the run's history records its best at epoch {want[0]} "
        f"(top1 {want[1]:.2f}%); it cannot be rebuilt from last.pt (epoch {state['epoch']}), so results.json "
        "records no best checkpoint until a better epoch writes one",
        file=sys.stderr,
    )
    return None
