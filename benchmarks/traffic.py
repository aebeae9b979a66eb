"""Activation memory traffic vs MACs of a deployed model: why MAC savings do not become speed-ups.

    python benchmarks/traffic.py --model comp128_resnet50 --base resnet50 --size 224

Counts, per image, the elements every convolution reads and writes (input + output), plus what a
``DeployedCompConv2d`` moves besides its convs (the ``T_i`` concatenations: written and read back; the
output write: every part read, every output element written), and the MACs (``compconv.profile``).
A rough model (weights, ReLU, adds and pooling left out, no cache reuse), enough to compare the two
models: on a machine whose convolutions are memory-bound, the speed-up tends to the traffic ratio.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import compconv
from compconv.deploy import DeployedCompConv2d


def traffic(model: nn.Module, size: int) -> dict[str, float]:
    """Elements moved per image (conv inputs + outputs, CompConv's concatenations and output writes)."""
    counts = {"conv": 0, "concat_and_write": 0}
    hooks = []

    def conv_hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        counts["conv"] += inp[0].numel() + out.numel()

    def comp_hook(m: DeployedCompConv2d, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        n, _, h, w = out.shape
        t = sum(2**i * m.c_prim for i in range(1, m.depth)) * n * h * w  # T_1..T_{d-1}
        counts["concat_and_write"] += 2 * t + 2 * out.numel()

    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, DeployedCompConv2d):
            hooks.append(mod.register_forward_hook(comp_hook))
    with torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    counts["total"] = counts["conv"] + counts["concat_and_write"]
    counts["macs"] = compconv.profile(model, (1, 3, size, size)).total_macs
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="comp128_resnet50")
    p.add_argument("--base", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args(argv)
    van = traffic(compconv.deploy(compconv.get_model(a.base)), a.size)
    com = traffic(compconv.deploy(compconv.get_model(a.model)), a.size)
    print(f"{'':26s} {'vanilla':>12s} {'converted':>12s} {'ratio':>7s}")
    for k in ("macs", "conv", "concat_and_write", "total"):
        r = van[k] / com[k] if com[k] else float("inf")
        print(f"{k:26s} {van[k] / 1e6:11.1f}M {com[k] / 1e6:11.1f}M {r:7.2f}")
    print(f"MACs per element moved: vanilla {van['macs'] / van['total']:.1f}, "
          f"converted {com['macs'] / com['total']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
