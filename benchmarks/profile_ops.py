"""Where the time goes: ``torch.profiler`` op self-time shares of a zoo model in several settings.

    python benchmarks/profile_ops.py --model comp128_resnet50 --size 224 --batch 8 \
        --modes eager deploy deploy_cl --out docs/results/profile_comp128_resnet50.json
    # training steps (forward, backward, SGD step) of the reference model, as the bench's train_* rows
    python benchmarks/profile_ops.py --model resnet50 --batch 8 --modes train_eager train_cl

Prints one table per mode (top ops by self CPU time, share of the total) and writes them as JSON.
Inference modes are the bench's treatments (``prepare_model``); ``train_*`` modes run ``make_runner``'s
SGD step, so the profile covers exactly what the bench times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch

from compconv.bench.suites import make_runner, prepare_model


def profile_ops(model: torch.nn.Module, x: torch.Tensor, iters: int = 3, top: int = 12) -> dict:
    """Self CPU time per op name over ``iters`` forward passes (after one warm-up)."""

    def fwd() -> None:
        with torch.inference_mode():
            model(x)

    return profile_calls(fwd, iters, top)


def profile_calls(call: Callable[[], object], iters: int = 3, top: int = 12) -> dict:
    """Self CPU time per op name over ``iters`` calls of ``call`` (after one warm-up call)."""
    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            call()
    events = prof.key_averages()
    rows = [(e.key, e.self_cpu_time_total / 1e3 / iters) for e in events if e.self_cpu_time_total > 0]
    total = sum(t for _, t in rows)
    rows.sort(key=lambda r: -r[1])
    return {"total_ms": total, "ops": [{"op": k, "ms": t, "share": t / total} for k, t in rows[:top]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="comp128_resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--modes", nargs="+", default=["eager", "deploy", "deploy_cl"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 on a busy machine)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = {
        "model": a.model,
        "size": a.size,
        "batch": a.batch,
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "modes": {},
    }
    num_classes = 10 if "cifar" in a.model else 1000
    for mode in a.modes:
        if mode.startswith("train_"):
            from compconv import get_model

            x = torch.randn(a.batch, 3, a.size, a.size)
            step = make_runner(get_model(a.model, num_classes=num_classes), mode, x, num_classes=num_classes)
            r = profile_calls(step, a.iters)
        else:
            model, fmt = prepare_model(a.model, mode, num_classes=num_classes)
            x = torch.randn(a.batch, 3, a.size, a.size).contiguous(memory_format=fmt)
            r = profile_ops(model, x, a.iters)
        result["modes"][mode] = r
        print(f"\n== {a.model} {mode} batch {a.batch}: {r['total_ms']:.1f} ms/iter (self CPU, all ops)")
        for o in r["ops"]:
            print(f"  {o['op']:<40s} {o['ms']:9.2f} ms  {100 * o['share']:5.1f}%")
        sys.stdout.flush()
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
