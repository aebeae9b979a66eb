"""Small pieces the compact convolutions share."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DepthwiseConv2d",
    "PadAnyConv2d",
    "align_identity",
    "channel_shuffle",
    "is_tracing",
    "pad_any",
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
    return _shuffle(x, groups)


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
    fx_proxy = isinstance(x, torch.fx.Proxy)  # symbolic sizes: always crop (a no-op when they match)
    if not fx_proxy and offs == [0, 0] and (sh, sw) == (1, 1) and tuple(x.shape[-2:]) == tuple(out_hw):
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


def _shuffle(x: Tensor, groups: int) -> Tensor:
    # Splitting one dim is a view for any layout (expanded or strided gradients too); no size unpacking,
    # so torch.fx can trace it.
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def _functional_shuffled_cat(parts: list[Tensor] | tuple[Tensor, ...], groups: int, front_drop: int) -> Tensor:
    u = torch.cat(list(parts), 1) if len(parts) > 1 else parts[0]
    u = u[:, front_drop:] if front_drop else u
    return _shuffle(u, groups) if groups > 1 else u


def _functional_unshuffled_split(
    gy: Tensor, widths: list[int], dtypes: list[torch.dtype], groups: int, front_drop: int
) -> list[Tensor]:
    """The adjoint of :func:`_functional_shuffled_cat` in differentiable ops (for double backward)."""
    c = gy.shape[1]
    u = _shuffle(gy, c // groups) if groups > 1 else gy  # shuffling by C/g undoes the shuffle by g
    if front_drop:
        u = torch.cat([u.new_zeros((u.shape[0], front_drop, u.shape[2], u.shape[3])), u], 1)
    return [gi.to(dt) for gi, dt in zip(torch.split(u, widths, 1), dtypes, strict=True)]


class _ShuffledCat(torch.autograd.Function):
    """``channel_shuffle(cat(parts, 1)[:, front_drop:], groups)`` with one write per element each way.

    The functional form writes the output twice (``cat``, then the shuffle's copy) and hands each part
    a strided view of the gradient, which the producing conv then copies again; here every part is
    written once into its final (strided) channels, and each part's gradient is gathered once into a
    contiguous tensor (zeros for dropped channels).

    Higher-order autograd still works: with ``create_graph=True`` (gradient penalties, MAML) the backward
    runs in grad mode and takes the functional adjoint, which is differentiable; forward-mode AD uses the
    functional form on the tangents (``jvp``). ``torch.func`` transforms never reach this Function:
    :func:`shuffled_cat` takes the functional form under them (so it keeps the ``forward(ctx, ...)`` form:
    a ``setup_context`` makes every eager ``apply`` bind its arguments with ``inspect.signature``, measured
    +40% on a small CompConv's forward).
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
        ctx.pieces, ctx.groups, ctx.front_drop, ctx.device = pieces, groups, front_drop, y.device
        ctx.part_meta = [(p.shape, p.dtype, is_channels_last(p)) for p in parts]
        return y

    @staticmethod
    def jvp(ctx: Any, _groups_t: Any, _front_drop_t: Any, *tangents: Tensor | None) -> Tensor:
        ts = [
            torch.zeros(shape, dtype=dtype, device=ctx.device) if t is None else t
            for t, (shape, dtype, _) in zip(tangents, ctx.part_meta, strict=True)
        ]
        return _functional_shuffled_cat(ts, ctx.groups, ctx.front_drop)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        g = ctx.groups
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            widths = [shape[1] for shape, _, _ in ctx.part_meta]
            dtypes = [dtype for _, dtype, _ in ctx.part_meta]
            return (None, None, *_functional_unshuffled_split(gy, widths, dtypes, g, ctx.front_drop))
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
    tracer (:func:`is_tracing`) or a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) it is the
    functional form, which compilers fuse on their own and which every transform supports.
    """
    if is_tracing():  # symbolic sizes: the eager run has checked them
        return _functional_shuffled_cat(parts, groups, front_drop)
    total = sum(p.shape[1] for p in parts)
    if not 0 <= front_drop < total or (total - front_drop) % groups:
        raise ValueError(
            f"front_drop must be in [0, {total}) and leave a multiple of groups={groups} channels, got {front_drop}"
        )
    if torch._C._are_functorch_transforms_active() or len(parts) == 1 and groups == 1:
        return _functional_shuffled_cat(parts, groups, front_drop)
    return _ShuffledCat.apply(groups, front_drop, *parts)


_F_PAD_MODES = {"zeros": "constant", "constant": "constant", "reflect": "reflect", "replicate": "replicate",
                "circular": "circular"}


def _pad_fits(size: int, before: int, after: int, mode: str) -> bool:
    """Whether ``F.pad`` accepts this pad on a dim of ``size`` (reflect: pad < size; circular: pad <= size)."""
    if mode == "reflect":
        return max(before, after) < size
    if mode == "circular":
        return max(before, after) <= size
    return True


def _pad_index(size: int, before: int, after: int, mode: str) -> list[int]:
    """Source index of each padded position: the mode's extension of the signal, periodic beyond one pad."""
    idx = range(-before, size + after)
    if mode == "circular":
        return [i % size for i in idx]
    if mode == "replicate" or size == 1:  # a 1-pixel map reflects onto itself
        return [min(max(i, 0), size - 1) for i in idx]
    period = 2 * (size - 1)  # reflect (no edge repeat) extended periodically: ... 2 1 [0 1 2] 1 0 1 2 ...
    return [period - i % period if i % period >= size else i % period for i in idx]


def pad_any(x: Tensor, pad: tuple[int, int, int, int] | list[int], mode: str = "zeros") -> Tensor:
    """``F.pad(x, pad, mode)`` for ``(N, C, H, W)`` (``pad`` = left, right, top, bottom) on maps of any size.

    ``F.pad`` refuses a reflect pad of at least the map's size (and a circular one larger than it), which
    a compact conv's inner layers meet on maps smaller than the host conv's input (a host ``3x3``,
    ``padding=0``, reflect on a ``3x3`` map gives ``1x1``; the next inner ``3x3`` would pad that ``1x1``).
    Where ``F.pad`` works this is ``F.pad``; beyond, the mode's extension continues periodically (reflect
    mirrors back and forth, circular tiles, a 1-pixel map repeats itself), gathered with two index_selects.
    ``mode``: ``"zeros"``/``"constant"``, ``"reflect"``, ``"replicate"``, ``"circular"``.
    """
    fmode = _F_PAD_MODES[mode]
    if fmode == "constant":
        return F.pad(x, tuple(pad))
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing: no concrete size to compare
        return F.pad(x, tuple(pad), mode=fmode)
    left, right, top, bottom = pad
    h, w = x.shape[-2], x.shape[-1]
    if _pad_fits(h, top, bottom, fmode) and _pad_fits(w, left, right, fmode):
        return F.pad(x, tuple(pad), mode=fmode)
    ih = torch.tensor(_pad_index(h, top, bottom, fmode), dtype=torch.long, device=x.device)
    iw = torch.tensor(_pad_index(w, left, right, fmode), dtype=torch.long, device=x.device)
    return x.index_select(-2, ih).index_select(-1, iw)


class PadAnyConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose reflect / replicate / circular padding works on maps of any size (:func:`pad_any`).

    The inner layers of a compact conv (CompConv's ``W_2..W_d`` and tail, XSepConv's ``1xk``/``kx1``) use
    the host's padding mode on maps that can be smaller than their pad where the host conv itself runs.
    Same parameters, state_dict and output as ``nn.Conv2d`` wherever ``nn.Conv2d`` runs.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode == "zeros":
            return super()._conv_forward(input, weight, bias)
        x = pad_any(input, self._reversed_padding_repeated_twice, self.padding_mode)
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)


class DepthwiseConv2d(PadAnyConv2d):
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
