"""Count parameters and MACs per module, as the papers do.

Units: one MAC is one multiply-accumulate (what the papers call a FLOP). MACs are counted for
``nn.Conv2d`` (``H_out W_out C_out (C_in / groups) k_h k_w`` per image) and ``nn.Linear``
(``in x out`` per row); biases, batch norm, activations, pooling, additions, concatenations, slicing
and shuffles count zero. ``torch.utils.flop_counter`` counts the same convs and matmuls as
``FLOPs = 2 x MACs``; ``Profile.uncounted_macs`` reports whatever it saw that our per-module count did not
(e.g. a matmul in a custom module), so nothing is dropped silently.

A module may count itself: if it defines ``count_macs(inputs, output) -> int`` and/or
``count_params() -> int``, those are used and its children are not visited (used by compact convs whose
fast implementation executes dead, masked weights).

All counts are per forward pass at ``input_size`` (include the batch in it; MACs are per that batch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["LayerProfile", "Profile", "conv_macs", "profile"]


def conv_macs(conv: nn.Conv2d, output: Tensor) -> int:
    """MACs of ``conv`` producing ``output`` ``(N, C_out, H_out, W_out)``: ``N H W C_out C_in/g k_h k_w``."""
    kh, kw = conv.kernel_size
    return int(output.numel() * (conv.in_channels // conv.groups) * kh * kw)


def _linear_macs(lin: nn.Linear, output: Tensor) -> int:
    return int(output.numel() * lin.in_features)


@dataclass
class LayerProfile:
    """One module's own counts (``params`` directly owned; ``macs`` of its own op) and output shape."""

    name: str
    type: str
    params: int
    macs: int
    output_shape: tuple[int, ...] | None


class Profile:
    """The result of ``profile``: rows per module (in registration order) and totals.

    ``by_module(prefix_depth)`` sums rows under dotted-name prefixes, like fvcore's ``by_module``.
    """

    def __init__(self, rows: list[LayerProfile], input_size: tuple[int, ...], uncounted_macs: int) -> None:
        self.rows = rows
        self.input_size = input_size
        self.uncounted_macs = uncounted_macs

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def total_macs(self) -> int:
        return sum(r.macs for r in self.rows)

    def by_module(self, depth: int = 1) -> dict[str, dict[str, int]]:
        """Params and MACs summed per dotted-name prefix of ``depth`` parts (``""`` = module-level)."""
        out: dict[str, dict[str, int]] = {}
        for r in self.rows:
            key = ".".join(r.name.split(".")[:depth]) if r.name else ""
            d = out.setdefault(key, {"params": 0, "macs": 0})
            d["params"] += r.params
            d["macs"] += r.macs
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "units": "MACs = multiply-accumulates of conv and linear layers; params = all parameters",
            "total_params": self.total_params,
            "total_macs": self.total_macs,
            "uncounted_macs": self.uncounted_macs,
            "rows": [asdict(r) for r in self.rows],
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, min_macs: int = 0, only_leaves: bool = True) -> str:
        """A readable per-layer table (rows with params or MACs), then the totals."""
        rows = [r for r in self.rows if (r.params or r.macs) and r.macs >= min_macs]
        head = ("module", "type", "params", "MACs", "output")
        body = [(r.name or "(model)", r.type, f"{r.params:,}", f"{r.macs:,}",
                 "x".join(map(str, r.output_shape)) if r.output_shape else "-") for r in rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body]
        lines.append(f"total: {self.total_params:,} params ({self.total_params / 1e6:.2f}M), "
                     f"{self.total_macs:,} MACs ({self.total_macs / 1e6:.1f}M) at input {self.input_size}")
        if self.uncounted_macs:
            lines.append(f"warning: torch.utils.flop_counter saw {self.uncounted_macs:,} MACs in ops not counted "
                         "per module (custom matmuls?)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"Profile(params={self.total_params:,}, macs={self.total_macs:,}, "
                f"input_size={self.input_size})")


def profile(model: nn.Module, input_size: Sequence[int] | Tensor = (1, 3, 224, 224)) -> Profile:
    """Params and MACs of ``model`` per module and in total, for one forward pass.

    Args:
        model: any module; it is run once in eval mode under ``torch.no_grad`` and restored.
        input_size: the input shape ``(N, C, H, W)`` (zeros of the model's dtype/device are used) or an
            input tensor. MACs are for that whole batch.
    """
    if isinstance(input_size, Tensor):
        x = input_size
    else:
        size = tuple(int(v) for v in input_size)
        if not size or min(size) < 1:
            raise ValueError(f"input_size must be a shape of positive ints like (1, 3, 224, 224), but got {input_size}")
        p = next(model.parameters(), None)
        x = torch.zeros(size, device=p.device if p is not None else None,
                        dtype=p.dtype if p is not None and p.is_floating_point() else None)

    # Modules that count themselves own their whole subtree.
    self_counting: set[str] = set()
    skip: set[str] = set()
    for name, m in model.named_modules():
        if any(name.startswith(s + ".") or s == "" and name for s in self_counting):
            skip.add(name)
            continue
        if callable(getattr(m, "count_params", None)) and not callable(getattr(m, "count_macs", None)):
            raise TypeError(f"{type(m).__name__} ({name!r}) defines count_params() but not count_macs(); "
                            "a self-counting module must define both (or only count_macs)")
        if callable(getattr(m, "count_macs", None)):
            self_counting.add(name)

    rows: dict[str, LayerProfile] = {}
    order: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if name in skip:
            continue
        counts_self = name in self_counting
        if counts_self and callable(getattr(m, "count_params", None)):
            params = int(m.count_params())
        elif counts_self:
            params = sum(p.numel() for p in m.parameters())
        else:
            params = sum(p.numel() for p in m.parameters(recurse=False))
        rows[name] = LayerProfile(name, type(m).__name__, params, 0, None)
        order.append(name)

        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any, n: str = name, own: bool = counts_self) -> None:
            r = rows[n]
            out = output if isinstance(output, Tensor) else None
            if r.output_shape is None and out is not None:
                r.output_shape = tuple(out.shape)
            if own and callable(getattr(mod, "count_macs", None)):
                r.macs += int(mod.count_macs(inputs, output))
            elif isinstance(mod, nn.Conv2d) and out is not None:
                r.macs += conv_macs(mod, out)
            elif isinstance(mod, nn.Linear) and out is not None:
                r.macs += _linear_macs(mod, out)

        hooks.append(m.register_forward_hook(hook))

    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    result_rows = [rows[n] for n in order]
    ours = sum(r.macs for r in result_rows)
    seen = counter.get_total_flops() // 2
    # Self-counting modules may legitimately report fewer MACs than they execute (dead masked weights).
    uncounted = max(0, seen - ours) if not self_counting else 0
    return Profile(result_rows, tuple(x.shape), int(uncounted))

