"""Small pieces the compact convolutions share."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "DepthwiseConv2d",
    "align_identity",
    "channel_shuffle",
    "is_tracing",
    "shuffle_groups",
    "shuffle_permutation",
    "shuffled_cat",
]


def is_tracing() -> bool:
    """True under torch.compile / torch.export / ONNX export / TorchScript tracing / torch.fx tracing.

    The eager fast paths (preallocated outputs written slice by slice) are hidden from tracers, which get
    the plain functional form and fuse it themselves.
    """
    return bool(
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
    )


def shuffle_groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is <= ``groups`` (ShuffleNet needs an exact split)."""
    if groups < 1:
        raise ValueError(f"shuffle groups must be >= 1, but got {groups}")
    for g in range(min(groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def shuffle_permutation(channels: int, groups: int) -> list[int]:
    """``perm`` such that ``channel_shuffle(x, groups)[:, j] == x[:, perm[j]]``."""
    per = channels // groups
    return [g * per + i for i in range(per) for g in range(groups)]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle: ``(N, g*c, H, W) -> view (N, g, c) -> transpose -> (N, c*g, H, W)``."""
    if groups == 1:
        return x
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def align_identity(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
) -> Tensor:
    """The input pixels at the centres of a conv's receptive fields: ``(N, C, H, W) -> (N, C, *out_hw)``.

    For "same" padding and stride s this is ``x[:, :, ::s, ::s]``. In general the centre of output
    pixel ``j`` is input pixel ``j*s - p + d*(k-1)//2``; where that falls outside the input (more padding
    than "same"), zeros are read, as the conv's zero padding would.
    """
    if padding == "same":
        return x
    if padding == "valid":
        padding = (0, 0)
    offs = [d * (k - 1) // 2 - p for k, p, d in zip(kernel_size, padding, dilation, strict=False)]
    if min(offs) < 0:
        ph, pw = max(0, -offs[0]), max(0, -offs[1])
        x = F.pad(x, (pw, pw, ph, ph))
        offs = [offs[0] + ph, offs[1] + pw]
    sh, sw = stride
    if offs == [0, 0] and (sh, sw) == (1, 1) and tuple(x.shape[-2:]) == tuple(out_hw):
        return x
    return x[:, :, offs[0] :: sh, offs[1] :: sw][:, :, : out_hw[0], : out_hw[1]]



def _cat_pieces(widths: list[int], groups: int, front_drop: int) -> list[tuple[int, int, int, int]]:
    """``(part, src, n, dst)``: ``out[:, dst : dst + groups*n : groups] = parts[part][:, src : src + n]``.

    ``u`` (the concatenation without its first ``front_drop`` channels) has ``C = groups * m`` channels and
    ``channel_shuffle`` sends ``u[:, a*m + b]`` to ``out[:, b*groups + a]``; a run of ``u``'s channels inside
    one group ``a`` is therefore one strided slice of the output.
    """
    m = (sum(widths) - front_drop) // groups
    pieces = []
    off = -front_drop  # u-index of the current part's first channel
    for i, w in enumerate(widths):
        c = max(off, 0)
        while c < off + w:
            a = c // m
            stop = min(off + w, (a + 1) * m)
            pieces.append((i, c - off, stop - c, (c - a * m) * groups + a))
            c = stop
        off += w
    return pieces


class _ShuffledCat(torch.autograd.Function):
    """``channel_shuffle(cat(parts, 1)[:, front_drop:], groups)`` with one write per element each way.

    The functional form writes the output twice (``cat``, then the shuffle's copy) and hands each part
    a strided view of the gradient, which the producing conv then copies again; here every part is
    written once into its final (strided) channels, and each part's gradient is gathered once into a
    contiguous tensor (zeros for dropped channels).
    """

    @staticmethod
    def forward(ctx: Any, groups: int, front_drop: int, *parts: Tensor) -> Tensor:  # type: ignore[override]
        pieces = _cat_pieces([p.shape[1] for p in parts], groups, front_drop)
        ref = parts[-1]
        fmt = torch.channels_last if is_channels_last(ref) else torch.contiguous_format
        n, _, h, w = ref.shape
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in parts])  # as torch.cat (autocast mixes)
        c = sum(p.shape[1] for p in parts) - front_drop
        y = torch.empty((n, c, h, w), dtype=dtype, device=ref.device, memory_format=fmt)
        for i, src, k, dst in pieces:
            y[:, dst : dst + groups * (k - 1) + 1 : groups].copy_(parts[i][:, src : src + k])
        ctx.pieces, ctx.groups, ctx.front_drop = pieces, groups, front_drop
        ctx.part_meta = [(p.shape, p.dtype, is_channels_last(p)) for p in parts]
        return y

    @staticmethod
    @once_differentiable  # double backward would need a differentiable gather: refuse it loudly
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        g = ctx.groups
        grads = []
        covered = [0] * len(ctx.part_meta)
        for i, _, k, _ in ctx.pieces:
            covered[i] += k
        for (shape, dtype, cl), n in zip(ctx.part_meta, covered, strict=True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            gr = torch.empty(shape, dtype=dtype, device=gy.device, memory_format=fmt)
            grads.append(gr if n == shape[1] else gr.zero_())  # dropped channels get zero gradient
        for i, src, k, dst in ctx.pieces:
            grads[i][:, src : src + k].copy_(gy[:, dst : dst + g * (k - 1) + 1 : g])
        return (None, None, *grads)


def is_channels_last(x: Tensor) -> bool:
    """A 4-d tensor laid out as channels_last (and not also plain contiguous, as 1x1 images are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def shuffled_cat(parts: list[Tensor], groups: int = 1, front_drop: int = 0) -> Tensor:
    """``channel_shuffle(torch.cat(parts, 1)[:, front_drop:], groups)``: parts ``(N, C_i, H, W)``.

    In eager mode this writes each element once (forward and backward, see ``_ShuffledCat``); under a
    tracer (:func:`is_tracing`) it is the functional form, which compilers fuse on their own.
    """
    total = sum(p.shape[1] for p in parts)
    if not 0 <= front_drop < total or (total - front_drop) % groups:
        raise ValueError(
            f"front_drop must be in [0, {total}) and leave a multiple of groups={groups} channels, got {front_drop}"
        )
    if is_tracing() or len(parts) == 1 and groups == 1:
        u = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        return channel_shuffle(u[:, front_drop:] if front_drop else u, groups)
    return _ShuffledCat.apply(groups, front_drop, *parts)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``groups == in_channels == out_channels``; ``(N, C, H, W) -> (N, C, H', W')``.

    A 1x1 one (stride 1, no padding) is a per-channel scale and runs as a broadcast multiply: the same
    values (bit for bit without bias, as in CompConv's tail), but PyTorch's CPU convolution sends a 1x1
    grouped conv at one thread and batch < 16 to a per-group loop of its reference kernel (measured 25x
    slower than the multiply at batch 1, 6x at batch 32). It stays an ``nn.Conv2d`` (same parameters,
    state_dict and MAC count in :func:`compconv.profile`); ``torch.utils.flop_counter`` does not count
    the multiply.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding in ((0, 0), "valid", "same"):
            y = x * self.weight.view(1, -1, 1, 1)
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        return super().forward(x)
