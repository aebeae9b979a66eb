"""Speed benchmark (issue 8): the same code as ``compconv bench``; see ``--help``.

python benchmarks/bench_speed.py --quick                      # -> runs/bench/<date-time>/bench_speed.*
nohup python benchmarks/bench_speed.py --suite models --repeats 5 --out-dir runs/bench/models > bench.log 2>&1 &
"""

from __future__ import annotations

import sys

from compconv.bench.cli import build_arg_parser, run_bench

if __name__ == "__main__":
    sys.exit(run_bench(build_arg_parser().parse_args()))
