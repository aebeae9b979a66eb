"""Count parameters and MACs per module, as the papers do.

Units: one MAC is one multiply-accumulate (what the papers call a FLOP). MACs are counted for every
convolution module, 1-, 2- and 3-D (``nn.Conv1d/2d/3d``: ``N x out positions x C_out x (C_in / groups) x
prod(kernel)``; ``nn.ConvTranspose1d/2d/3d``: ``N x in positions x C_in x (C_out / groups) x prod(kernel)``,
each input element is spread over a kernel-sized patch of every output channel of its group) and for
``nn.Linear`` (``in x out`` per row); biases, batch norm, activations, pooling, additions, concatenations,
slicing and shuffles count zero. ``torch.utils.flop_counter`` counts the same convs and matmuls as
``FLOPs = 2 x MACs``; ``Profile.uncounted_macs`` reports what it saw *outside* the modules we count
(e.g. a matmul in a custom module's ``forward``, ``F.conv2d`` on a bare weight), so nothing is dropped
silently. One known difference: a 1x1 depthwise conv (CompConv's depthwise tail at k=1) is counted here as
the conv it is, one MAC per output element, as the papers count it, but runs as a broadcast multiply
(``layers.ops.DepthwiseConv2d``) that ``flop_counter`` does not count, so on such models our total is the
larger by those elements.

A module may count itself: if it defines ``count_macs(inputs, output) -> int`` and/or
``count_params() -> int``, those are used and its children are not visited (used by compact convs whose
fast implementation executes dead, masked weights). What such a module executes is attributed to it, so
it never hides an uncounted op elsewhere in the model.

All counts are per forward pass at ``input_size`` (include the batch in it; MACs are per that batch).

Binary networks (``compconv.binarize``): a module may also define ``count_bops(inputs, output) -> int``,
``count_binary_params() -> int`` and ``count_scales() -> int`` (``BinaryConv2d`` does). Its binary operations
(BOPs: one per multiply-accumulate of +-1 values, an XNOR + popcount) are reported apart from the real MACs,
which then exclude them, per layer and in total (``total_bops``); its binarized weights apart from the real
parameters (``binary_params``, ``real_params``), and the storage in bits (``storage_bits``: 1 per binary
weight, 32 per real parameter and per stored scale). ``combined_macs()`` is the binary-network papers'
"FLOPs" = ``BOPs / 64 + real FLOPs`` (Bi-Real Net, Liu et al. ECCV 2018; ReActNet, Liu et al. ECCV
2020: a 64-bit CPU does 64 binary operations in one instruction), with FLOPs = MACs as everywhere here.
For a model without binary modules none of this appears: its table, JSON and repr are as before.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["LayerProfile", "Profile", "conv_macs", "profile"]


def conv_macs(conv: _ConvNd, output: Tensor, input: Tensor | None = None) -> int:
    """MACs of one call of ``conv`` (any ``nn.ConvNd`` or ``nn.ConvTranspose{1,2,3}d``).

    Convolution: ``output.numel() x (C_in / groups) x prod(kernel)``, i.e. ``N H W C_out C_in/g k_h k_w`` in
    2-D. Transposed convolution (needs ``input``): ``input.numel() x (C_out / groups) x prod(kernel)``.

    Raises:
        ValueError: a transposed conv without ``input``.
    """
    k = math.prod(conv.kernel_size)
    if conv.transposed:
        if input is None:
            raise ValueError(f"conv_macs of a transposed conv ({type(conv).__name__}) needs its input")
        return int(input.numel() * (conv.out_channels // conv.groups) * k)
    return int(output.numel() * (conv.in_channels // conv.groups) * k)


def _linear_macs(lin: nn.Linear, output: Tensor) -> int:
    return int(output.numel() * lin.in_features)


def _conv_rank(m: nn.Module) -> int | None:
    """Input rank ``2 + spatial dims`` a conv module expects (None: not a conv we know)."""
    if isinstance(m, _ConvNd):
        return 2 + len(m.kernel_size)
    from compconv.binary.conv import BinaryConv2d
    from compconv.layers.base import CompactConv2d  # local: layers import this module's neighbours

    return 4 if isinstance(m, CompactConv2d | BinaryConv2d) else None


@dataclass
class LayerProfile:
    """One module's own counts (``params`` directly owned; ``macs`` of its own op) and output shape."""

    name: str
    type: str
    params: int
    macs: int
    output_shape: tuple[int, ...] | None
    bops: int = 0  # binary operations (binarized convs only; not in ``macs``)
    binary_params: int = 0  # of ``params``: the weights stored as 1 bit each
    scales: int = 0  # real values stored besides the parameters (a binary conv's per-filter alpha)


_BINARY_FIELDS = ("bops", "binary_params", "scales")


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
        """Real multiply-accumulates (a binarized conv's binary ones are in ``total_bops``)."""
        return sum(r.macs for r in self.rows)

    @property
    def total_bops(self) -> int:
        """Binary operations (one per +-1 multiply-accumulate of a binarized conv); 0 without binary modules."""
        return sum(r.bops for r in self.rows)

    @property
    def binary_params(self) -> int:
        """Parameters stored as 1 bit each (a binarized conv's weights); included in ``total_params``."""
        return sum(r.binary_params for r in self.rows)

    @property
    def real_params(self) -> int:
        """Parameters stored as 32-bit floats: ``total_params - binary_params``."""
        return self.total_params - self.binary_params

    @property
    def scales(self) -> int:
        """Real values stored at inference besides the parameters (each binary conv's per-filter alpha)."""
        return sum(r.scales for r in self.rows)

    @property
    def has_binary(self) -> bool:
        """True when the model holds binary modules (then BOPs and storage are reported)."""
        return any(r.bops or r.binary_params for r in self.rows)

    @property
    def storage_bits(self) -> int:
        """Bits to store the model: 1 per binary weight, 32 per real parameter and per stored scale."""
        return self.binary_params + 32 * (self.real_params + self.scales)

    @property
    def storage_mb(self) -> float:
        """``storage_bits`` in megabytes (``bits / 8 / 1e6``)."""
        return self.storage_bits / 8 / 1e6

    def combined_macs(self, bops_per_mac: int = 64) -> float:
        """The binary-network papers' "FLOPs": ``total_bops / bops_per_mac + total_macs``.

        ``bops_per_mac=64`` is Bi-Real Net's and ReActNet's convention (64 binary operations per 64-bit
        instruction); real FLOPs are MACs here, as in those papers. Equals ``total_macs`` without binary modules.
        """
        if not isinstance(bops_per_mac, int) or isinstance(bops_per_mac, bool) or bops_per_mac < 1:
            raise ValueError(f"bops_per_mac must be a positive int (Bi-Real Net / ReActNet: 64), but got "
                             f"{bops_per_mac!r}")
        return self.total_bops / bops_per_mac + self.total_macs

    def by_module(self, depth: int = 1) -> dict[str, dict[str, int]]:
        """Params and MACs summed per dotted-name prefix of ``depth`` parts (``""`` = module-level)."""
        out: dict[str, dict[str, int]] = {}
        extra = {"bops": 0} if self.has_binary else {}  # a binarized model's sums also hold its BOPs
        for r in self.rows:
            key = ".".join(r.name.split(".")[:depth]) if r.name else ""
            d = out.setdefault(key, {"params": 0, "macs": 0, **extra})
            d["params"] += r.params
            d["macs"] += r.macs
            if "bops" in d:
                d["bops"] += r.bops
        return out

    def subtree(self, name: str) -> tuple[int, int]:
        """``(params, MACs)`` of module ``name`` and everything under it (``""``: the whole model)."""
        rows = [r for r in self.rows if not name or r.name == name or r.name.startswith(name + ".")]
        return sum(r.params for r in rows), sum(r.macs for r in rows)

    def to_dict(self) -> dict[str, Any]:
        binary = self.has_binary
        rows = [asdict(r) for r in self.rows]
        if not binary:  # the output of a model without binary modules is as before
            rows = [{k: v for k, v in r.items() if k not in _BINARY_FIELDS} for r in rows]
        d = {
            "input_size": list(self.input_size),
            "units": "MACs = multiply-accumulates of conv and linear layers; params = all parameters",
            "total_params": self.total_params,
            "total_macs": self.total_macs,
            "uncounted_macs": self.uncounted_macs,
            "rows": rows,
        }
        if binary:
            d["units"] += ("; MACs are real, BOPs binary (one per +-1 multiply-accumulate); combined_macs_bops64 "
                           "= BOPs / 64 + MACs (Bi-Real Net, ReActNet); storage: 1 bit per binary weight, 32 per "
                           "real parameter and scale")
            d.update(total_bops=self.total_bops, binary_params=self.binary_params, real_params=self.real_params,
                     scales=self.scales, storage_bits=self.storage_bits, storage_mb=self.storage_mb,
                     combined_macs_bops64=self.combined_macs())
        return d

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, min_macs: int = 0, only_leaves: bool = True) -> str:
        """A readable per-module table, then the totals.

        Args:
            min_macs: hide rows with fewer MACs than this (a binarized conv's row, 0 real MACs, is shown
                when its BOPs reach it: a row is shown when its MACs or its BOPs do).
            only_leaves: True (default): each module's *own* params and MACs (a container shows only the
                parameters it holds directly), rows with neither are hidden; the rows sum to the totals.
                False: every module, each with the params and MACs of its whole subtree (``(model)`` first
                holds the totals), indented by depth; rows overlap, so they do not sum to the totals.
        """
        if only_leaves:
            shown = [(r.name or "(model)", r, r.params, r.macs) for r in self.rows]
        else:
            shown = []
            for r in self.rows:
                params, macs = self.subtree(r.name)
                depth = r.name.count(".") + 1 if r.name else 0
                shown.append(("  " * depth + (r.name or "(model)"), r, params, macs))
        binary = self.has_binary
        head: tuple[str, ...] = ("module", "type", "params", "MACs", "output")
        if binary:
            head = ("module", "type", "params", "binary params", "MACs", "BOPs", "output")
            bin_of = {r.name: self._subtree_binary(r.name) if not only_leaves else (r.binary_params, r.bops)
                      for r in self.rows}
        body = []
        for label, r, params, macs in shown:
            bops_here = bin_of[r.name][1] if binary else 0
            if not (params or macs or bops_here) or max(macs, bops_here) < min_macs:  # a binary conv: 0 MACs
                continue
            shape = "x".join(map(str, r.output_shape)) if r.output_shape else "-"
            if binary:
                bp, bops = bin_of[r.name]
                body.append((label, r.type, f"{params:,}", f"{bp:,}", f"{macs:,}", f"{bops:,}", shape))
            else:
                body.append((label, r.type, f"{params:,}", f"{macs:,}", shape))
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body]
        lines.append(f"total: {self.total_params:,} params ({self.total_params / 1e6:.2f}M), "
                     f"{self.total_macs:,} MACs ({self.total_macs / 1e6:.1f}M) at input {self.input_size}")
        if binary:
            lines.append(f"binary: {self.total_bops:,} BOPs ({self.total_bops / 1e6:.1f}M; not in MACs), "
                         f"{self.binary_params:,} binary params (1 bit) + {self.real_params:,} real (32 bit) + "
                         f"{self.scales:,} scales (32 bit) = {self.storage_mb:.3f} MB; FLOPs = BOPs/64 + MACs = "
                         f"{self.combined_macs() / 1e6:.2f}M (Bi-Real Net / ReActNet convention)")
        if self.uncounted_macs:
            lines.append(f"warning: torch.utils.flop_counter saw {self.uncounted_macs:,} MACs in ops outside the "
                         "modules counted per module (custom matmuls? F.conv2d on a bare weight?)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _subtree_binary(self, name: str) -> tuple[int, int]:
        """``(binary params, BOPs)`` of module ``name`` and everything under it."""
        rows = [r for r in self.rows if not name or r.name == name or r.name.startswith(name + ".")]
        return sum(r.binary_params for r in rows), sum(r.bops for r in rows)

    def __repr__(self) -> str:
        bops = f", bops={self.total_bops:,}, binary_params={self.binary_params:,}" if self.has_binary else ""
        return (f"Profile(params={self.total_params:,}, macs={self.total_macs:,}{bops}, "
                f"input_size={self.input_size})")


def _shape_of(input_size: Any, model: nn.Module) -> tuple[int, ...]:
    """``input_size`` as a tuple of positive ints, checked against the rank of the model's convs."""
    example = "(1, 3, 224, 224)"
    if isinstance(input_size, str | bytes) or not isinstance(input_size, Sequence):
        raise TypeError(f"input_size must be a shape (a tuple, list or torch.Size of positive ints, e.g. "
                        f"{example}) or an input tensor, but got {type(input_size).__name__} {input_size!r}")
    size = []
    for i, v in enumerate(input_size):
        try:
            if isinstance(v, bool):
                raise TypeError
            size.append(operator.index(v))
        except TypeError:
            raise TypeError(f"input_size must hold ints (e.g. {example}), but entry {i} of {input_size!r} is "
                            f"{type(v).__name__} {v!r}") from None
    if not size or min(size) < 1:
        raise ValueError(f"input_size must be a shape of positive ints like {example}, but got {input_size!r}")
    ranks = {r for r in map(_conv_rank, model.modules()) if r is not None}
    if len(ranks) == 1 and len(size) != (rank := ranks.pop()):
        axes = {3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}.get(rank, f"{rank} entries")
        hint = f"; add the batch: (1, {', '.join(map(str, size))})" if len(size) == rank - 1 else ""
        raise ValueError(f"input_size must have {rank} entries {axes} for this model (its convs take "
                         f"{rank}-D input, batch included), but got {tuple(size)}{hint}")
    return tuple(size)


def profile(model: nn.Module, input_size: Sequence[int] | Tensor = (1, 3, 224, 224)) -> Profile:
    """Params and MACs of ``model`` per module and in total, for one forward pass.

    Args:
        model: any module; it is run once in eval mode under ``torch.no_grad`` and restored.
        input_size: the input shape with the batch, ``(N, C, H, W)`` for a 2-D model (``(N, C, L)`` for
            1-D, ``(N, C, D, H, W)`` for 3-D convs), as a tuple, list or ``torch.Size`` of positive ints
            (zeros of the model's dtype/device are used); or an input tensor. MACs are for that whole batch.

    Returns:
        A ``Profile``: rows per module, ``total_params``, ``total_macs``, ``uncounted_macs``; for a binarized
        model also ``total_bops``, ``binary_params``, ``real_params``, ``storage_bits`` and ``combined_macs()``.

    Raises:
        TypeError: ``input_size`` is not a shape of ints (a string, floats, ...) nor a tensor.
        ValueError: non-positive entries; a rank that does not fit the model's convs; or a channel count
            that differs from the ``in_channels`` of the first conv the forward reaches (named).
    """
    if isinstance(input_size, Tensor):
        x = input_size
    else:
        size = _shape_of(input_size, model)
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

    counter = FlopCounterMode(display=False)
    # FLOPs the counter sees while a module we count is running (outermost one only): the rest is uncounted.
    inside = {"depth": 0, "start": 0, "flops": 0}
    first_conv: dict[str, bool] = {"seen": False}
    rows: dict[str, LayerProfile] = {}
    order: list[str] = []
    hooks = []

    def check_first_conv(mod: nn.Module, inputs: tuple[Any, ...], name: str) -> None:
        # The first conv the forward reaches sees the input's channels (a wrong count would crash in it).
        first_conv["seen"] = True
        t = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
        rank = _conv_rank(mod)
        if t is None or rank is None:
            return
        given = f"input_size {tuple(x.shape)}" + ("" if t.shape == x.shape else f" (reaching it as {tuple(t.shape)})")
        if t.dim() != rank:
            raise ValueError(f"{given} does not fit the first conv the forward reaches, {name!r} "
                             f"({type(mod).__name__}), which takes {rank}-D input (batch included)")
        if t.shape[1] != mod.in_channels:
            raise ValueError(f"{given} has {t.shape[1]} channels, but the first conv the forward reaches, "
                             f"{name!r} ({type(mod).__name__}), expects in_channels={mod.in_channels}")

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
        if counts_self and callable(getattr(m, "count_binary_params", None)):
            rows[name].binary_params = int(m.count_binary_params())
            rows[name].scales = int(m.count_scales()) if callable(getattr(m, "count_scales", None)) else 0
        order.append(name)
        counted = counts_self or isinstance(m, _ConvNd | nn.Linear)

        def pre_hook(mod: nn.Module, inputs: tuple[Any, ...], n: str = name, counted: bool = counted) -> None:
            if not first_conv["seen"] and _conv_rank(mod) is not None:
                check_first_conv(mod, inputs, n)
            if counted:
                if inside["depth"] == 0:
                    inside["start"] = counter.get_total_flops()
                inside["depth"] += 1

        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any, n: str = name, own: bool = counts_self,
                 counted: bool = counted) -> None:
            r = rows[n]
            out = output if isinstance(output, Tensor) else None
            if r.output_shape is None and out is not None:
                r.output_shape = tuple(out.shape)
            if own:
                r.macs += int(mod.count_macs(inputs, output))
                if out is not None and callable(getattr(mod, "count_bops", None)):
                    r.bops += int(mod.count_bops(inputs, output))
            elif isinstance(mod, _ConvNd) and out is not None:
                r.macs += conv_macs(mod, out, inputs[0] if inputs and isinstance(inputs[0], Tensor) else None)
            elif isinstance(mod, nn.Linear) and out is not None:
                r.macs += _linear_macs(mod, out)
            if counted:
                inside["depth"] -= 1
                if inside["depth"] == 0:
                    inside["flops"] += counter.get_total_flops() - inside["start"]

        hooks.append(m.register_forward_pre_hook(pre_hook))
        hooks.append(m.register_forward_hook(hook))

    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    result_rows = [rows[n] for n in order]
    uncounted = (counter.get_total_flops() - inside["flops"]) // 2
    return Profile(result_rows, tuple(x.shape), int(uncounted))
