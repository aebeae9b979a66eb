"""torchrun / DistributedDataParallel support: process group setup, metric reduction, rank-0 gating.

Launch with ``torchrun --nproc_per_node N -m compconv train ...``: torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``MASTER_ADDR/PORT``; ``init_distributed`` then joins the group with NCCL when the
run uses CUDA and gloo on CPU. Without those variables everything here is a no-op (world size 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "init_distributed",
    "sync_buffers",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun; returns (DistInfo, the device of this rank).

    ``device`` is the config's ``auto | cpu | cuda | cuda:N``; under torchrun CUDA ranks use
    ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for CUDA, but torch.cuda.is_available() is False")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, but got {device!r}")
    if world > 1:
        if use_cuda:
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return DistInfo(rank, world, local), dev
    if use_cuda:
        dev = torch.device(device if device.startswith("cuda:") else "cuda")
    else:
        dev = torch.device("cpu")
    return DistInfo(), dev


def all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sum a list of numbers over ranks (float64, so counts stay exact)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank (e.g. the run directory name)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def sync_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP keeps parameters identical through averaged gradients, but each rank updates its BN running
    stats on its own shard in the last forward pass; this makes evaluation and checkpoints rank-independent.
    """
    if not info.enabled:
        return
    for b in model.buffers():
        dist.broadcast(b, src=0)
