"""Inference-time rewrites: ``deploy(model)`` returns an eval-only copy computing the same function faster.

What it does, on any model (converted or not):

1. **Batch norm folded** into the convolution it follows (``nn.Conv2d`` -> one conv with a bias; the BN
   becomes ``nn.Identity``). A BN that follows a ``CompConv2d`` is folded into the deployed module's
   single output write as a per-channel affine (see below). Peers (other compact convs) are traced
   through, so a conv -> BN pair inside them is folded too; a BN after a peer module stays (eval BN).
2. **Every CompConv2d becomes a DeployedCompConv2d**, which writes each part of the output (identity
   slices, the convs' results, the depthwise tail) once, straight into its final (shuffled) channel slots
   of a preallocated output, applying the folded BN affine and the bias in that same write. The
   reference module writes the output three times (concatenation, shuffle copy, BN).
3. **The channel shuffle is folded into its neighbours.** Tensors joined by channelwise, parameter-free
   ops (ReLU, pooling, dropout, identity) and by additions (a ResNet stage's residual stream) must share
   one channel order; when every producer of such a group can emit any order (CompConvs with the same
   shuffle; dense convs, by permuting their output channels) and every reader can accept one (dense convs
   and CompConvs, by permuting their input channels; ``flatten(1) -> nn.Linear``, by permuting its
   columns), the group takes the unshuffled order and every part is written into contiguous channels.
   In the zoo's VGG and ResNet-50 conversions no shuffle is left.
4. **Small layout fixes**: the depthwise tail reads all of ``B_0`` (zero weights beyond the kept
   channels) instead of a channel slice that convs would copy first; the affine write uses
   ``mul``/``add_`` in NCHW and ``addcmul`` in channels_last (faster in each, measured).

Why BN is not folded into the inner convs' weights: the identity channels and the intermediate results
``T_i`` feed both the output and the next step, which needs them *unscaled*; a BN shift cannot be moved
through a zero-padded conv (the border pixels would be wrong). The output write happens anyway, so the
affine costs nothing extra there.

Under ``torch.compile``, ``torch.export``, ONNX export or autograd the deployed module runs a purely
functional form (one ``cat``, one affine, one view-transpose shuffle), which the compilers fuse into a
single write themselves and exporters translate op for op.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from compconv.layers.base import CompactConv2d
from compconv.layers.compconv import CompConv2d
from compconv.layers.ops import (
    DepthwiseConv2d,
    align_identity,
    channel_shuffle,
    is_channels_last,
    is_tracing,
    shuffle_permutation,
)

__all__ = ["DeployedCompConv2d", "collapse_pointwise", "deploy", "fold_bn_into_conv", "tune_pointwise"]


# ---------------------------------------------------------------------------------------------------------
# Batch-norm arithmetic
# ---------------------------------------------------------------------------------------------------------
def _bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``y = a * x + b`` per channel: returns ``(a, b)`` of shape ``(C,)``."""
    assert bn.running_mean is not None and bn.running_var is not None
    a = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.double()
    b = -bn.running_mean.double() * a
    if bn.bias is not None:
        b = b + bn.bias.double()
    return a, b


def _foldable_bn(m: nn.Module) -> bool:
    # Without running stats a BN normalises with batch statistics even in eval mode: not an affine.
    return isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None


def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new ``nn.Conv2d`` (with a bias) equal to ``bn(conv(x))`` in eval mode. Shapes as ``conv``."""
    if not _foldable_bn(bn):
        raise ValueError("bn must be an nn.BatchNorm2d with running statistics (track_running_stats=True)")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn.num_features={bn.num_features} != conv.out_channels={conv.out_channels}")
    a, b = _bn_affine(bn)
    new = copy.deepcopy(conv)
    w = conv.weight.detach().double() * a.view(-1, 1, 1, 1)
    bias = b if conv.bias is None else conv.bias.detach().double() * a + b
    new.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
    new.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return new


# ---------------------------------------------------------------------------------------------------------
# The deployed CompConv
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Piece:
    """Output channels written by one op: ``y[:, dst : dst + step*n : step] = part[:, src : src+n]``."""

    part: int
    src: int
    n: int
    dst: int
    step: int


def _is_range(idx: list[int]) -> bool:
    return all(v == idx[0] + i for i, v in enumerate(idx))


class DeployedCompConv2d(nn.Module):
    """Eval-only CompConv2d with its following BN (and bias) folded into one output write.

    Build it with :meth:`from_compconv`. Input ``(N, C_in, H, W)`` -> output ``(N, C_out, H_out, W_out)``,
    equal (in eval mode) to ``bn(compconv(x))``, or to ``compconv(x)`` without a BN; after
    :meth:`fold_output_permutation` the output channels come in the order ``perm`` of the original
    (the consumer's input channels are permuted to match).

    Buffers: ``scale``/``shift`` (``(1, C_out, 1, 1)``, in output order, absent when the write is a plain
    copy), ``perm`` (``y[:, j] = u[:, perm[j]]`` where ``u`` is the unshuffled concatenation).
    """

    def __init__(self) -> None:  # use from_compconv
        super().__init__()

    @classmethod
    @torch.no_grad()
    def from_compconv(cls, comp: CompConv2d, bn: nn.BatchNorm2d | None = None) -> nn.Module:
        """The deployed form of ``comp`` (followed by ``bn`` if given). ``depth=0`` gives an ``nn.Conv2d``."""
        if not isinstance(comp, CompConv2d):
            raise TypeError(f"comp must be a CompConv2d, but got {type(comp).__name__}")
        if bn is not None and not _foldable_bn(bn):
            raise ValueError(
                "bn must be an nn.BatchNorm2d with running statistics (track_running_stats=True)"
            )
        if comp.plan is None:  # d = 0: a plain conv (with the module's bias)
            conv = copy.deepcopy(comp.conv)
            return fold_bn_into_conv(conv, bn) if bn is not None else conv.requires_grad_(False)
        plan = comp.plan
        self = cls()
        self.in_channels, self.out_channels = comp.in_channels, comp.out_channels
        self.kernel_size, self.stride = comp.kernel_size, comp.stride
        self.padding, self.dilation = comp.padding, comp.dilation
        self.depth, self.c_prim = plan.depth, plan.c_prim
        self.tail_channels, self.front_drop = plan.tail_channels, plan.front_drop
        self.convs = copy.deepcopy(comp.convs).requires_grad_(False)
        self.tail = copy.deepcopy(comp.tail).requires_grad_(False) if comp.tail is not None else None
        width = plan.conv_widths[-1][1]
        if self.tail is not None and plan.tail_channels < width:
            # The depthwise tail reads only B_0's first t channels: a channel slice, which every conv
            # copies to a contiguous tensor first (channels_last, or any batch > 1). A full-width
            # depthwise conv (zero weights beyond t; k^2 MACs per dropped channel) reads B_0 as it is,
            # and its first t output channels go straight into the output write.
            full = DepthwiseConv2d(
                width,
                width,
                comp.tail.kernel_size,
                1,
                comp.tail.padding,
                comp.tail.dilation,
                width,
                False,
                comp.tail.padding_mode,
                device=comp.tail.weight.device,
                dtype=comp.tail.weight.dtype,
            )
            full.weight.zero_()
            full.weight[: plan.tail_channels] = comp.tail.weight.detach()
            self.tail = full.requires_grad_(False)
        # Identity slices: ("slice", start, width) when contiguous, else a gather index; "conv" = 1x1 convs.
        self.identity_convs = (
            copy.deepcopy(comp.identity_convs).requires_grad_(False)
            if comp.identity_convs is not None
            else None
        )
        self._id_index: list[list[int]] = []
        if self.identity_convs is None:
            flat = comp.identity_index.tolist()
            start = 0
            for w in plan.identity_widths:
                self._id_index.append(flat[start : start + w])
                start += w
        self._rebuild_identity_buffers()
        # Part widths in concatenation order: T_1..T_{d-1}, A_0 (kept), B_0.
        widths = [2**i * plan.c_prim for i in range(1, plan.depth)]
        widths += ([plan.tail_channels] if plan.tail_channels else []) + [plan.conv_widths[-1][1]]
        self._part_widths = widths
        # Output affine in output (shuffled) order: BN(y + bias).
        c = comp.out_channels
        a = torch.ones(c, dtype=torch.float64)
        b = torch.zeros(c, dtype=torch.float64)
        if comp.bias is not None:
            b = comp.bias.detach().double().clone()
        if bn is not None:
            a_bn, b_bn = _bn_affine(bn)
            a, b = a_bn, a_bn * b + b_bn
        dtype = comp.convs[0].weight.dtype
        device = comp.convs[0].weight.device
        self.has_affine = not (bool((a == 1).all()) and bool((b == 0).all()))
        self.register_buffer("scale", a.to(dtype=dtype, device=device).view(1, c, 1, 1))
        self.register_buffer("shift", b.to(dtype=dtype, device=device).view(1, c, 1, 1))
        self._set_perm(comp.output_permutation())
        return self

    # -- layout ----------------------------------------------------------------------------------------
    def _rebuild_identity_buffers(self) -> None:
        self._id_slices: list[tuple[int, int] | None] = []
        for i, idx in enumerate(self._id_index):
            contiguous = _is_range(idx)
            self._id_slices.append((idx[0], len(idx)) if contiguous else None)
            name = f"id_index_{i}"
            t = torch.tensor(idx, dtype=torch.long, device=self.convs[0].weight.device)
            if name in self._buffers:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t)

    def _set_perm(self, perm: list[int]) -> None:
        """Record ``y[:, j] = u[:, perm[j]]`` and precompute the runs of the fused write."""
        c = self.out_channels
        self._perm = list(perm)
        self.register_buffer("perm", torch.tensor(perm, dtype=torch.long, device=self.scale.device))
        self._shuffle_g = 1
        if self._perm != list(range(c)):
            for g in range(2, c + 1):
                if c % g == 0 and self._perm == shuffle_permutation(c, g):
                    self._shuffle_g = g
                    break
            else:
                self._shuffle_g = 0  # a general permutation
        inv = [0] * c
        for j, m in enumerate(perm):
            inv[m] = j
        # u channel m (after the front drop) comes from global index m + front_drop of the parts.
        owner: list[tuple[int, int]] = []
        for p, w in enumerate(self._part_widths):
            owner += [(p, o) for o in range(w)]
        owner = owner[self.front_drop :]
        pieces: list[_Piece] = []
        m = 0
        while m < c:
            p, o = owner[m]
            n, step = 1, 0
            while m + n < c and owner[m + n] == (p, o + n):
                s = inv[m + n] - inv[m + n - 1]
                if s <= 0 or (step and s != step):
                    break
                step = s
                n += 1
            pieces.append(_Piece(p, o, n, inv[m], step or 1))
            m += n
        self._pieces = pieces
        # The affine in u's (unshuffled) order, for the functional path.
        inv_t = torch.tensor(inv, dtype=torch.long, device=self.scale.device)
        for name, v in (("scale_u", self.scale[:, inv_t]), ("shift_u", self.shift[:, inv_t])):
            if name in self._buffers:
                self._buffers[name] = v.contiguous()
            else:
                self.register_buffer(name, v.contiguous())

    @torch.no_grad()
    def fold_output_permutation(self) -> list[int]:
        """Stop permuting the output (write ``u`` itself); returns ``perm`` for the consumers.

        The caller must permute every consumer's input channels: what it read at channel ``j`` is now at
        channel ``perm[j]`` (see :func:`permute_input_channels`).
        """
        perm = self._perm
        inv = [0] * len(perm)
        for j, m in enumerate(perm):
            inv[m] = j
        idx = torch.tensor(inv, dtype=torch.long, device=self.scale.device)
        self.scale = self.scale[:, idx].contiguous()
        self.shift = self.shift[:, idx].contiguous()
        self._set_perm(list(range(self.out_channels)))
        return perm

    @torch.no_grad()
    def permute_input(self, perm: list[int]) -> None:
        """The input channel ``j`` of before now arrives at channel ``perm[j]``."""
        inv = [0] * len(perm)
        for j, m in enumerate(perm):
            inv[m] = j
        inv_t = torch.tensor(inv, dtype=torch.long, device=self.scale.device)
        w = self.convs[0].weight
        w.copy_(w[:, inv_t].clone())
        if self.identity_convs is not None:
            for conv in self.identity_convs:
                conv.weight.copy_(conv.weight[:, inv_t].clone())
        else:
            self._id_index = [[perm[i] for i in idx] for idx in self._id_index]
            self._rebuild_identity_buffers()

    # -- forward ---------------------------------------------------------------------------------------
    def _identity(self, xi: Tensor, step: int) -> Tensor:
        if self.identity_convs is not None:
            return self.identity_convs[step](xi)
        sl = self._id_slices[step]
        if sl is not None:
            return xi[:, sl[0] : sl[0] + sl[1]]
        return xi.index_select(1, getattr(self, f"id_index_{step}"))

    def _parts(self, x: Tensor) -> list[Tensor]:
        b = self.convs[0](x)
        parts: list[Tensor] = []
        if self.depth >= 2:
            xi = align_identity(
                x, self.kernel_size, self.stride, self.padding, self.dilation, (b.shape[-2], b.shape[-1])
            )
            t = torch.cat([self._identity(xi, 0), b], 1)  # T_1 (raw: it feeds W_2)
            parts.append(t)
            for i in range(1, self.depth - 1):
                t = torch.cat([self._identity(xi, i), self.convs[i](t)], 1)
                parts.append(t)
            b = self.convs[self.depth - 1](t)  # B_0
        if self.tail is not None:
            a0 = self.tail(b)  # full width (see from_compconv); its first tail_channels are A_0
            parts.append(a0 if a0.shape[1] == self.tail_channels else a0[:, : self.tail_channels])
        parts.append(b)
        return parts

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H_out, W_out)``."""
        parts = self._parts(x)
        if is_tracing() or (torch.is_grad_enabled() and x.requires_grad):
            return self._functional_output(parts)
        return self._fused_output(parts)

    def _functional_output(self, parts: list[Tensor]) -> Tensor:
        u = torch.cat(parts, 1)
        if self.front_drop:
            u = u[:, self.front_drop :]
        if self._shuffle_g == 1:
            return u * self.scale + self.shift if self.has_affine else u
        if self.has_affine:  # the affine in u's order, then the shuffle: compilers fuse all three
            u = u * self.scale_u + self.shift_u
        if self._shuffle_g > 1:
            return channel_shuffle(u, self._shuffle_g)
        return u.index_select(1, self.perm)

    def _fused_output(self, parts: list[Tensor]) -> Tensor:
        # One write per output element, straight into its final channel (strided slots for the shuffle).
        ref = parts[-1]
        n, _, h, w = ref.shape
        fmt = torch.channels_last if is_channels_last(ref) else torch.contiguous_format
        y = torch.empty((n, self.out_channels, h, w), dtype=ref.dtype, device=ref.device, memory_format=fmt)
        for pc in self._pieces:
            src = parts[pc.part][:, pc.src : pc.src + pc.n]
            stop = pc.dst + pc.step * (pc.n - 1) + 1
            dst = y[:, pc.dst : stop : pc.step]
            if self.has_affine:
                sl = slice(pc.dst, stop, pc.step)
                if fmt is torch.channels_last:
                    torch.addcmul(self.shift[:, sl], src, self.scale[:, sl], out=dst)
                else:  # NCHW: addcmul's per-channel broadcast is ~3x slower than mul + add_ (measured)
                    torch.mul(src, self.scale[:, sl], out=dst)
                    dst.add_(self.shift[:, sl])
            else:
                dst.copy_(src)
        return y

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, depth={self.depth}, c_prim={self.c_prim}, writes={len(self._pieces)}"
        )
        if self._shuffle_g != 1:
            s += f", shuffle={self._shuffle_g or 'perm'}"
        return s + (", affine" if self.has_affine else "")


@torch.no_grad()
def permute_input_channels(module: nn.Module, perm: list[int]) -> None:
    """Make ``module`` accept input whose channel ``perm[j]`` holds what its channel ``j`` held before."""
    if isinstance(module, DeployedCompConv2d):
        module.permute_input(perm)
    elif isinstance(module, nn.Conv2d) and module.groups == 1:
        inv = [0] * len(perm)
        for j, m in enumerate(perm):
            inv[m] = j
        idx = torch.tensor(inv, dtype=torch.long, device=module.weight.device)
        module.weight.copy_(module.weight[:, idx].clone())
    else:
        raise TypeError(f"cannot permute the input channels of {type(module).__name__}")


# ---------------------------------------------------------------------------------------------------------
# Graph analysis and the rewrite
# ---------------------------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.Graph | None:
    """FX graph with CompConvs as leaves; peers traced through when possible, else kept as leaves."""
    for leaves in ((CompConv2d, DeployedCompConv2d), (CompactConv2d, DeployedCompConv2d)):
        try:
            return _Tracer(leaves).trace(model)
        except Exception:  # noqa: BLE001 - any tracing failure means: try the next, coarser option
            continue
    return None


# Parameter-free ops that act on each channel alone: a channel permutation commutes with them.
_CHANNELWISE_MODULES: tuple[type, ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardtanh,
    nn.GELU,
    nn.ELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
)
_CHANNELWISE_FUNCTIONS: set[Any] = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.silu,
    F.hardswish,
    F.gelu,
    F.elu,
    torch.sigmoid,
    torch.tanh,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.dropout,
    torch.relu_,
    F.relu_,
}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}


def _module_calls(graph: fx.Graph) -> dict[str, int]:
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _only_first_arg(node: fx.Node, src: fx.Node) -> bool:
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
    return bool(node.args) and node.args[0] is src and not others


_ADD_FUNCTIONS: set[Any] = {operator.add, operator.iadd, torch.add}


def _channelwise_inputs(model: nn.Module, node: fx.Node) -> list[fx.Node] | None:
    """The tensor inputs whose channel order ``node``'s output shares, or None if ``node`` is not a
    channelwise op (one that treats every channel alike: activations, pooling, dropout, ``a + b``)."""
    if node.op == "call_module":
        if (
            isinstance(model.get_submodule(node.target), _CHANNELWISE_MODULES)
            and node.args
            and isinstance(node.args[0], fx.Node)
            and _only_first_arg(node, node.args[0])
        ):
            return [node.args[0]]
        return None
    unary = (node.op == "call_function" and node.target in _CHANNELWISE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _CHANNELWISE_METHODS
    )
    if unary:
        src = node.args[0] if node.args else None
        return [src] if isinstance(src, fx.Node) and _only_first_arg(node, src) else None
    add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if add and len(node.args) == 2 and not node.kwargs:
        ins = [a for a in node.args if isinstance(a, fx.Node)]
        if all(isinstance(a, fx.Node | int | float) for a in node.args) and ins:
            return ins
    return None


def _flatten_linear(model: nn.Module, node: fx.Node, calls: dict[str, int]) -> str | None:
    """``torch.flatten(x, 1)`` / ``x.flatten(1)`` read by exactly one ``nn.Linear``: that Linear's name."""
    is_flat = (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    )
    if not is_flat or list(node.args[1:]) != [1] or node.kwargs or len(node.users) != 1:
        return None
    (user,) = node.users
    if (
        user.op == "call_module"
        and calls.get(user.target) == 1
        and _only_first_arg(user, node)
        and isinstance(model.get_submodule(user.target), nn.Linear)
    ):
        return user.target
    return None


def _fold_shuffles(model: nn.Module, graph: fx.Graph, calls: dict[str, int]) -> int:
    """Fold CompConv output shuffles into the tensors' readers; returns how many were folded.

    Tensors joined by channelwise ops (including the residual adds of a ResNet stage) must share one
    channel order; such a group is rewritten when every producer can emit any order (CompConvs with the
    same shuffle, dense convs: permute their output channels) and every reader can accept it (dense
    convs, CompConvs: permute their input channels; ``flatten(1) -> Linear``: permute its columns).
    """
    parent: dict[fx.Node, fx.Node] = {}

    def find(a: fx.Node) -> fx.Node:
        while parent.setdefault(a, a) is not a:
            parent[a] = parent.setdefault(parent[a], parent[a])
            a = parent[a]
        return a

    chan: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        ins = _channelwise_inputs(model, node)
        if ins is not None:
            chan[node] = ins
            for a in ins:
                parent[find(node)] = find(a)
    comps: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        comps.setdefault(find(node), []).append(node)
    folded = 0
    for members in comps.values():
        member_set = set(members)
        producers = [n for n in members if n not in chan]
        ok = True
        shuffles: list[list[int]] = []
        for n in producers:
            mod = model.get_submodule(n.target) if n.op == "call_module" else None
            if calls.get(n.target) != 1 if n.op == "call_module" else True:
                ok = False
            elif isinstance(mod, DeployedCompConv2d):
                shuffles.append(mod._perm)
            elif not (isinstance(mod, nn.Conv2d) and mod.groups == 1):
                ok = False
        if not ok or not shuffles or shuffles[0] == list(range(len(shuffles[0]))):
            continue
        if any(p != shuffles[0] for p in shuffles):
            continue
        readers: list[tuple[str, str]] = []
        for n in members:
            for user in n.users:
                if user in member_set:
                    continue
                if user.op == "call_module" and calls.get(user.target) == 1 and _only_first_arg(user, n):
                    mod = model.get_submodule(user.target)
                    if isinstance(mod, DeployedCompConv2d) or (
                        isinstance(mod, nn.Conv2d) and mod.groups == 1
                    ):
                        readers.append(("conv", user.target))
                        continue
                lin = _flatten_linear(model, user, calls) if _only_first_arg(user, n) else None
                if lin is None:
                    ok = False
                    break
                readers.append(("linear", lin))
            if not ok:
                break
        if not ok:
            continue
        perm = shuffles[0]
        inv = [0] * len(perm)
        for j, m in enumerate(perm):
            inv[m] = j
        for n in producers:
            mod = model.get_submodule(n.target)
            if isinstance(mod, DeployedCompConv2d):
                mod.fold_output_permutation()
            else:  # a dense conv: new output channel m is the old channel inv[m]
                idx = torch.tensor(inv, dtype=torch.long, device=mod.weight.device)
                mod.weight.copy_(mod.weight[idx].clone())
                if mod.bias is not None:
                    mod.bias.copy_(mod.bias[idx].clone())
        for kind, name in readers:
            mod = model.get_submodule(name)
            if kind == "conv":
                permute_input_channels(mod, perm)
            else:  # flatten(1) -> Linear: channel c's block of H*W columns moves to block perm[c]
                hw = mod.in_features // len(perm)
                src = [inv[c] * hw + s for c in range(len(perm)) for s in range(hw)]
                idx = torch.tensor(src, dtype=torch.long, device=mod.weight.device)
                mod.weight.copy_(mod.weight[:, idx].clone())
        folded += len(shuffles)
    return folded


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Fallback without a graph: (conv, bn) names adjacent in an ``nn.Sequential``."""
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (n1, m1), (n2, m2) in zip(kids, kids[1:], strict=False):
                if isinstance(m1, nn.Conv2d | CompConv2d) and _foldable_bn(m2):
                    pre = f"{name}." if name else ""
                    pairs.append((pre + n1, pre + n2))
    return pairs


@torch.no_grad()
def collapse_pointwise(mod: DeployedCompConv2d) -> nn.Conv2d | None:
    """A 1x1 CompConv as the one dense 1x1 conv it equals (None if ``mod`` is not 1x1 without padding).

    With k = 1 every part (1x1 convs, the 1x1 depthwise tail, identity slices, the shuffle, the folded BN
    and bias) is the same linear map at every pixel, so the module is exactly ``y = W x + b`` per pixel:
    ``b`` is its output for a zero input and column ``i`` of ``W`` its output for the i-th unit vector
    minus ``b`` (evaluated in float64). The result runs at the dense layer's speed (and executes its
    MACs, ``C_in * C_out`` per pixel).
    """
    if mod.kernel_size != (1, 1) or mod.padding != (0, 0) or mod.dilation != (1, 1):
        return None
    ref = copy.deepcopy(mod).double()
    c_in, c_out = mod.in_channels, mod.out_channels
    eye = torch.eye(c_in, dtype=torch.float64, device=mod.scale.device).view(c_in, c_in, 1, 1)
    with torch.no_grad():
        bias = ref._functional_output(ref._parts(torch.zeros_like(eye[:1]))).reshape(c_out)
        cols = ref._functional_output(ref._parts(eye)).reshape(c_in, c_out) - bias
    w = mod.convs[0].weight
    conv = nn.Conv2d(c_in, c_out, 1, mod.stride, 0, bias=True, device=w.device, dtype=w.dtype)
    conv.weight.copy_(cols.t().reshape(c_out, c_in, 1, 1).to(w.dtype))
    conv.bias.copy_(bias.to(w.dtype))
    return conv.requires_grad_(False)


@torch.no_grad()
def tune_pointwise(
    model: nn.Module,
    example_input: Tensor,
    *,
    repeats: int = 5,
    min_time: float = 0.01,
) -> list[dict[str, Any]]:
    """Collapse each 1x1 ``DeployedCompConv2d`` of a deployed ``model`` where the dense conv runs faster.

    Every 1x1 CompConv's input is recorded in one forward pass of ``example_input`` (shape, dtype, device
    and memory format as in use); the split module and its collapsed dense conv (:func:`collapse_pointwise`,
    equal outputs) are then timed on that input, interleaved (median of ``repeats``), and the faster one
    is kept, in place. Timings are eager: under ``torch.compile`` the balance can differ (measure the
    whole model). Returns one row per 1x1 CompConv: ``name``, ``input_shape``, ``split_ms``, ``dense_ms``,
    ``collapsed``.
    """
    from compconv.bench.timing import interleaved_median

    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a Tensor (the model's input), but got {type(example_input).__name__}")
    cands = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, DeployedCompConv2d) and m.kernel_size == (1, 1) and m.padding == (0, 0)
    }
    seen: dict[str, Tensor] = {}

    def record(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(name, args[0].detach().clone())  # clone keeps the memory format

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in cands.items()]
    try:
        model(example_input)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    device = str(example_input.device)
    for name, mod in cands.items():
        if name not in seen:  # not reached by this input
            continue
        x = seen[name]
        dense = collapse_pointwise(mod)
        assert dense is not None
        fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        dense = dense.to(memory_format=fmt)  # type: ignore[call-overload]
        res = interleaved_median(
            {"split": lambda m=mod, x=x: m(x), "dense": lambda m=dense, x=x: m(x)},
            repeats=repeats,
            warmup=1,
            min_time=min_time,
            device=device,
        )
        split_s, dense_s = res["split"].median, res["dense"].median
        collapsed = bool(dense_s < split_s)
        if collapsed:
            _set_submodule(model, name, dense)
        rows.append(
            dict(
                name=name,
                input_shape=tuple(x.shape),
                split_ms=1e3 * split_s,
                dense_ms=1e3 * dense_s,
                collapsed=collapsed,
            )
        )
    return rows


@torch.no_grad()
def deploy(
    model: nn.Module,
    *,
    fold_bn: bool = True,
    fold_shuffle: bool = True,
    collapse_1x1: bool | str = False,
    example_input: Tensor | None = None,
    inplace: bool = False,
) -> nn.Module:
    """An eval-only copy of ``model`` with equal outputs (eval mode), rewritten for inference speed.

    Args:
        model: any ``nn.Module`` (converted by :func:`compconv.convert` or not).
        fold_bn: fold each BatchNorm2d into the conv (or CompConv2d) whose output it alone reads.
        fold_shuffle: fold CompConv's channel shuffle into the consumer convs where possible.
        collapse_1x1: ``True``: replace every 1x1 CompConv by the dense 1x1 conv it equals
            (:func:`collapse_pointwise`), executing the dense layer's MACs; ``"auto"``: only where the
            dense conv is measured faster on ``example_input`` (:func:`tune_pointwise`); ``False``: none.
        example_input: the model's input for ``collapse_1x1="auto"`` (its batch, dtype, device and
            memory format are what the layers are timed with).
        inplace: rewrite ``model`` itself instead of a deep copy.

    Returns the rewritten model in eval mode with ``requires_grad=False`` everywhere. It keeps its class and
    ``forward`` (folded BNs become ``nn.Identity``); see the module docstring for what is rewritten.
    Models that ``torch.fx`` cannot trace get BN folding only for conv/BN pairs adjacent in an
    ``nn.Sequential`` and no shuffle folding (a warning says so).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}")
    if collapse_1x1 not in (True, False, "auto"):
        raise ValueError(f"collapse_1x1 must be one of True, False, 'auto', but got {collapse_1x1!r}")
    if collapse_1x1 == "auto" and example_input is None:
        raise ValueError("collapse_1x1='auto' needs example_input (a batch like the one the model will run)")
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    if isinstance(model, CompConv2d):  # a bare module: nothing around it to fold
        dep = DeployedCompConv2d.from_compconv(model).eval().requires_grad_(False)
        if collapse_1x1 == "auto":
            holder = nn.Sequential(dep)
            tune_pointwise(holder, example_input)  # type: ignore[arg-type]
            return holder[0]
        dense = collapse_pointwise(dep) if collapse_1x1 and isinstance(dep, DeployedCompConv2d) else None
        return dense if dense is not None else dep
    graph = _trace(model)
    if graph is None:
        warnings.warn(
            "deploy: torch.fx could not trace the model; folding only conv/BN pairs adjacent in "
            "nn.Sequential containers",
            stacklevel=2,
        )
        pairs = _sequential_pairs(model) if fold_bn else []
        calls: dict[str, int] = {}
    else:
        calls = _module_calls(graph)
        pairs = []
        for node in graph.nodes if fold_bn else ():
            if node.op != "call_module" or not _foldable_bn(model.get_submodule(node.target)):
                continue
            src = node.args[0] if node.args else None
            if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
                continue
            if not _only_first_arg(node, src) or calls[node.target] != 1 or calls[src.target] != 1:
                continue
            if isinstance(model.get_submodule(src.target), nn.Conv2d | CompConv2d):
                pairs.append((src.target, node.target))
    folded_bn = {conv: bn for conv, bn in pairs}
    # 1) BN into plain convs, CompConv2d (+BN) into DeployedCompConv2d.
    for name, mod in list(model.named_modules()):
        if isinstance(mod, CompConv2d):
            bn_name = folded_bn.get(name)
            bn = model.get_submodule(bn_name) if bn_name else None
            _set_submodule(model, name, DeployedCompConv2d.from_compconv(mod, bn))
            if bn_name:
                _set_submodule(model, bn_name, nn.Identity())
        elif isinstance(mod, nn.Conv2d) and name in folded_bn:
            bn_name = folded_bn[name]
            _set_submodule(model, name, fold_bn_into_conv(mod, model.get_submodule(bn_name)))
            _set_submodule(model, bn_name, nn.Identity())
    if collapse_1x1 is True:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, DeployedCompConv2d):
                dense = collapse_pointwise(mod)
                if dense is not None:
                    _set_submodule(model, name, dense)
    # 2) The shuffle into the consumers.
    if fold_shuffle and graph is not None:
        _fold_shuffles(model, graph, calls)
    model.requires_grad_(False)
    if collapse_1x1 == "auto":  # timed last, on the layers as they will run (shuffles folded)
        tune_pointwise(model, example_input)  # type: ignore[arg-type]
    return model
