"""Where the time goes: ``torch.profiler`` op self-time shares of a zoo model in several deploy settings.

    python benchmarks/profile_ops.py --model comp128_resnet50 --size 224 --batch 8 \
        --modes eager deploy deploy_cl --out docs/results/profile_comp128_resnet50.json

Prints one table per mode (top ops by self CPU time, share of the total) and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from compconv.bench.suites import prepare_model


def profile_ops(model: torch.nn.Module, x: torch.Tensor, iters: int = 3, top: int = 12) -> dict:
    """Self CPU time per op name over ``iters`` forward passes (after one warm-up)."""
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                model(x)
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
    for mode in a.modes:
        model, fmt = prepare_model(a.model, mode, num_classes=10 if "cifar" in a.model else 1000)
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
