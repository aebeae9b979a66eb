"""Training speed of finished runs, like for like: the median images/s over chosen epochs of each run.

A run's ``results.json`` reports the median over *all* its epochs, which mixes epochs run under different
loads (1 thread beside other jobs, 2 threads alone). This reads ``metrics.csv`` and takes the median of
``train_images_per_s`` over the epochs named for each run, e.g. those it had the machine to itself:

    python benchmarks/train_speed.py docs/results/train_runs/r20-vanilla-cpu30-s0:17-30 \\
        docs/results/train_runs/r20-comp128-cpu30-s0:19-30 docs/results/train_runs/r20-comp16-cpu30-s0:12-30
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path


def median_speed(run_dir: str | Path, first: int = 1, last: int | None = None) -> tuple[float, int]:
    """``(median images/s, epochs used)`` over epochs ``first..last`` (inclusive) of ``run_dir/metrics.csv``.

    Raises:
        FileNotFoundError: no ``metrics.csv`` in ``run_dir``.
        ValueError: no epoch of the run lies in the range.
    """
    path = Path(run_dir) / "metrics.csv"
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["epoch"]) >= first and (last is None or int(r["epoch"]) <= last)]
    if not rows:
        raise ValueError(f"epochs {first}-{last if last is not None else 'end'}: none in {path}")
    return statistics.median(float(r["train_images_per_s"]) for r in rows), len(rows)


def _spec(s: str) -> tuple[str, int, int | None]:
    """``RUN_DIR[:FIRST-LAST]`` -> ``(run_dir, first, last)``."""
    run, _, rng = s.rpartition(":") if ":" in s else (s, "", "")
    if not rng:
        return s, 1, None
    try:
        a, b = rng.split("-")
        first, last = int(a), int(b)
    except ValueError:
        raise ValueError(f"run spec must be RUN_DIR or RUN_DIR:FIRST-LAST (e.g. runs/x:17-30), but got {s!r}") from None
    if not 1 <= first <= last:
        raise ValueError(f"epoch range must satisfy 1 <= FIRST <= LAST, but got {rng!r}")
    return run, first, last


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR[:FIRST-LAST]", help="a run directory and its epochs")
    args = p.parse_args(argv)
    print("| run | epochs | train img/s (median) |")
    print("|---|---|---|")
    for s in args.runs:
        run, first, last = _spec(s)
        med, n = median_speed(run, first, last)
        print(f"| {Path(run).name} | {first}-{last if last is not None else 'end'} ({n}) | {med:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
