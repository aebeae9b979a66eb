"""A careful timer for comparing configurations on a shared machine.

``interleaved_median`` warms every candidate up (compiling, allocating, calibrating how many calls make
one measurement of at least ``min_time`` seconds), then measures them round-robin ``repeats`` times, so a
burst of background load hits every candidate alike, and reports the median per-call time of each.
``torch.utils.benchmark`` would pin one thread by default; this timer uses whatever
``torch.get_num_threads()`` is (all cores), as a user's inference would.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Measurement", "gemm_ceiling", "hardware_info", "interleaved_median", "loadavg", "sync"]


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA is asynchronous; the CPU is not)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages (``/proc/loadavg``), None where unavailable."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def hardware_info(device: str = "cpu") -> dict[str, Any]:
    """Name the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@dataclass
class Measurement:
    """Median seconds per call (and the spread) of one candidate."""

    name: str
    median: float
    times: list[float] = field(default_factory=list)
    inner: int = 1
    error: str | None = None

    @property
    def iqr(self) -> float:
        if len(self.times) < 4:
            return 0.0
        q = statistics.quantiles(self.times, n=4)
        return q[2] - q[0]


def interleaved_median(
    candidates: dict[str, Callable[[], Any]],
    *,
    repeats: int = 5,
    warmup: int = 2,
    min_time: float = 0.05,
    device: str = "cpu",
    max_inner: int = 1000,
) -> dict[str, Measurement]:
    """Median per-call seconds of each zero-argument callable, measured round-robin.

    A candidate that raises during warm-up is reported with ``error`` set and ``median = nan``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, but got repeats={repeats}, warmup={warmup}")
    inner: dict[str, int] = {}
    out: dict[str, Measurement] = {}
    for name, fn in candidates.items():
        try:
            for _ in range(max(1, warmup)):
                fn()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            once = max(time.perf_counter() - t0, 1e-7)
            inner[name] = int(min(max_inner, max(1, round(min_time / once))))
        except Exception as e:  # noqa: BLE001 - one failing candidate must not sink the whole suite
            out[name] = Measurement(name, float("nan"), error=f"{type(e).__name__}: {e}")
    times: dict[str, list[float]] = {n: [] for n in inner}
    for _ in range(repeats):
        for name, k in inner.items():
            fn = candidates[name]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / k)
    for name, ts in times.items():
        out[name] = Measurement(name, statistics.median(ts), ts, inner[name])
    return out


def gemm_ceiling(
    device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5
) -> float:
    """Achieved GMAC/s of a large square matrix product (``n x n @ n x n``) on this machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    m = interleaved_median(
        {"gemm": lambda: torch.mm(a, b)}, repeats=repeats, warmup=1, min_time=0.2, device=device
    )["gemm"]
    return n**3 / m.median / 1e9
