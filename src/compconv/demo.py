"""``compconv demo``: the library's main job on embedded defaults, in about half a minute on a CPU.

Converts a CIFAR VGG-16 and a torchvision ResNet-50 with CompConv (C0 = 128, every conv but the stem),
prints each per-layer conversion report, checks that a forward and a backward pass run with unchanged
output shapes and gradients on every parameter, and prints the CompConv paper's tables beside our counts.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from compconv.convert import convert
from compconv.models.registry import get_model
from compconv.profile import profile

__all__ = ["add_parser", "check_forward_backward", "run_demo"]


def check_forward_backward(model: nn.Module, input_size: tuple[int, ...], expected: torch.Size) -> None:
    """One training-mode forward/backward; raises if the output shape changed or a parameter got no gradient."""
    model.train()
    x = torch.randn(*input_size)
    y = model(x)
    if y.shape != expected:
        raise RuntimeError(f"output shape changed: {tuple(expected)} -> {tuple(y.shape)}")
    y.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:5]}")


def run_demo(c0: int = 128, tables: bool = True) -> None:
    """Convert, report, check, and (optionally) print the paper-vs-ours tables."""
    for name, size, kw in (("cifar_vgg16", (2, 3, 32, 32), {}), ("resnet50", (2, 3, 224, 224), {})):
        model = get_model(name, **kw)
        before = profile(model, (1, *size[1:]))
        with torch.no_grad():
            expected = model.eval()(torch.zeros(*size)).shape
        model, report = convert(model, "compconv", c0=c0, input_size=(1, *size[1:]), return_report=True)
        after = profile(model, (1, *size[1:]))
        print(f"\n=== {name}: CompConv{c0} (every conv but the stem; d by Eq. 6) ===")
        print(report)
        print(f"whole model: {before.total_params / 1e6:.2f}M -> {after.total_params / 1e6:.2f}M params, "
              f"{before.total_macs / 1e6:.1f}M -> {after.total_macs / 1e6:.1f}M MACs per image "
              f"({before.total_macs / after.total_macs:.2f}x fewer)")
        check_forward_backward(model, size, expected)
        print(f"forward/backward OK: output {tuple(expected)}, gradients on all "
              f"{sum(1 for _ in model.parameters())} parameter tensors")
    if tables:
        from compconv.paper import all_rows, format_rows

        print("\n=== CompConv paper (CVPRW 2021) vs ours: params in M (incl. BN), MACs in M ===")
        print(format_rows(all_rows(["compconv"], progress=True)))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="convert VGG-16 and ResNet-50, print reports and the paper-vs-ours tables")
    p.add_argument("--c0", type=int, default=128, help="C0 of Eq. 6 (default 128)")
    p.add_argument("--no-tables", action="store_true", help="skip the paper tables")
    p.set_defaults(func=lambda a: run_demo(a.c0, not a.no_tables))
