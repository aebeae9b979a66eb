"""A 1x1 CompConv as two dense GEMMs: the low-rank linear map it is, without concatenation or copies.

With k = 1 a deployed CompConv is, at every output pixel, ``y = A x + b`` with ``A`` of low rank: every
output channel is an identity copy of an input channel, an output of ``W_1`` (``C_prim`` channels, or
the identity 1x1 convs' for ``identity="conv"``), or a linear combination of those (the later ``W_i``
read the previous ``T``, whose channels are again identity copies and earlier conv outputs; the 1x1
depthwise tail is a per-channel scale). So, exactly (weights composed in float64)::

    z = M1 x                      GEMM 1: C_in -> r (the channels actually computed from x)
    y = M2z z + M2x x[lo:hi] + b  GEMM 2: every output row at once (identity, conv, tail rows),
                                  the folded BN, bias and output shuffle being rows of M2 and b

``M2x`` reads the input's identity channels directly (the contiguous channel range ``[lo, hi)`` that
holds them; a second GEMM accumulating into the same output, no gather, no concatenation). Where that
range is wide (``identity="group"``/``"random"`` spread over the input), the identity channels are
instead selected by extra rows of ``M1`` (``M2x`` empty); of the two, the form with fewer MACs is built.
MACs per output pixel: ``r C_in + C_out (r + hi - lo)``, far below the dense ``C_in C_out`` for d >= 2
(for d = 1, ``r = C_prim ~ C_out / 2``: about the dense count when ``C_in ~ C_out``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compconv.layers.ops import is_channels_last, is_tracing

__all__ = ["LowRankPointwise", "pointwise_parts"]


class _Select(nn.Module):
    """A stand-in for an inner 1x1 conv: returns channels ``[start, start + n)`` of its (augmented) input."""

    def __init__(self, start: int, n: int) -> None:
        super().__init__()
        self.start, self.n = start, n

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.start : self.start + self.n]


def _is_pointwise(mod: nn.Module) -> bool:
    return (
        getattr(mod, "kernel_size", None) == (1, 1)
        and getattr(mod, "padding", None) == (0, 0)
        and getattr(mod, "dilation", None) == (1, 1)
    )


@torch.no_grad()
def pointwise_parts(mod: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """``(M1, M2z, M2x, b)`` of a 1x1 ``DeployedCompConv2d`` in float64 (None if it is not 1x1, pad 0).

    ``M1`` ``(r, C_in)``: the computed channels (``W_1``, then the identity convs' rows for
    ``identity="conv"``); ``M2z`` ``(C_out, r)``, ``M2x`` ``(C_out, C_in)`` (nonzero only in the identity
    channels' columns), ``b`` ``(C_out,)``: the module equals ``y = M2z M1 x + M2x x + b`` per pixel.
    Found by evaluating the module once per unit vector of ``[x, z]`` with each computed conv replaced by
    a channel selection of ``z`` (the rest of the module, BN, bias, shuffle included, as it is).
    """
    from compconv.deploy.compconv import DeployedCompConv2d

    if not isinstance(mod, DeployedCompConv2d) or not _is_pointwise(mod):
        return None
    ref = copy.deepcopy(mod).double()
    c_in = mod.in_channels
    rows = [mod.convs[0].weight.detach().double().flatten(1)]
    ref.convs[0] = _Select(c_in, rows[0].shape[0])
    if ref.identity_convs is not None:
        start = c_in + rows[0].shape[0]
        for i, conv in enumerate(mod.identity_convs):  # type: ignore[arg-type]
            w = conv.weight.detach().double().flatten(1)
            ref.identity_convs[i] = _Select(start, w.shape[0])
            rows.append(w)
            start += w.shape[0]
    m1 = torch.cat(rows, 0)
    n = c_in + m1.shape[0]
    # The unit vectors along the height of one image (every part is per pixel: one GEMM per conv, not
    # n tiny images); W_1's stride left out, as W_1 itself is (a 1x1 conv's stride only subsamples pixels).
    ref.stride = (1, 1)
    eye = torch.eye(n, dtype=torch.float64, device=m1.device).view(1, n, n, 1)
    b = ref._functional_output(ref._parts(torch.zeros_like(eye[:, :, :1]))).reshape(-1)
    a = ref._functional_output(ref._parts(eye)).reshape(-1, n) - b[:, None]  # (C_out, C_in + r)
    return m1, a[:, c_in:].contiguous(), a[:, :c_in].contiguous(), b


class LowRankPointwise(nn.Module):
    """Eval-only 1x1 CompConv as two dense GEMMs (see the module docstring); build with :meth:`from_deployed`.

    Input ``(N, C_in, H, W)`` -> output ``(N, C_out, ceil(H/s), ceil(W/s))``, equal to the module it
    was built from. Buffers: ``w1`` ``(r, C_in, 1, 1)``, ``w2`` ``(C_out, r, 1, 1)``, ``bias``
    ``(C_out,)``, ``w2x`` ``(C_out, hi - lo)`` (empty when the identity channels come through ``w1``).
    NCHW and channels_last inputs alike; the output takes the input's memory format.
    """

    def __init__(self) -> None:  # use from_deployed
        super().__init__()

    @classmethod
    @torch.no_grad()
    def from_deployed(cls, mod: nn.Module) -> LowRankPointwise | None:
        """The two-GEMM form of a 1x1 ``DeployedCompConv2d`` (None: not 1x1 with padding 0, dilation 1)."""
        parts = pointwise_parts(mod)
        if parts is None:
            return None
        m1, m2z, m2x, b = parts
        c_in, c_out, r = mod.in_channels, mod.out_channels, m1.shape[0]
        used = (m2x != 0).any(0).nonzero().flatten().tolist()
        lo, hi = (used[0], used[-1] + 1) if used else (0, 0)
        # (a) identity read straight from x[lo:hi] by GEMM 2; (b) identity rows selected by GEMM 1.
        direct = r * c_in + c_out * (r + hi - lo)
        folded = (r + len(used)) * (c_in + c_out)
        if used and folded < direct:
            sel = torch.zeros(len(used), c_in, dtype=m1.dtype, device=m1.device)
            sel[range(len(used)), used] = 1.0
            m1 = torch.cat([m1, sel], 0)
            m2z = torch.cat([m2z, m2x[:, used]], 1)
            lo = hi = 0
        self = cls()
        w = mod.convs[0].weight
        kw = {"dtype": w.dtype, "device": w.device}
        self.in_channels, self.out_channels, self.rank = c_in, c_out, m1.shape[0]
        self.kernel_size, self.padding, self.dilation = (1, 1), (0, 0), (1, 1)
        self.stride = tuple(mod.stride)
        self.lo, self.hi = lo, hi
        self.register_buffer("w1", m1.to(**kw).view(-1, c_in, 1, 1).contiguous())
        self.register_buffer("w2", m2z.to(**kw).view(c_out, -1, 1, 1).contiguous())
        self.register_buffer("w2x", m2x[:, lo:hi].to(**kw).contiguous())
        self.register_buffer("bias", b.to(**kw).contiguous())
        return self

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H_out, W_out)``; unbatched ``(C_in, H, W)`` as in ``nn.Conv2d``."""
        if not isinstance(x, torch.fx.Proxy) and x.dim() == 3:  # the module it replaces accepts it too
            return self.forward(x.unsqueeze(0)).squeeze(0)
        z = F.conv2d(x, self.w1, None, self.stride)
        y = F.conv2d(z, self.w2, self.bias)
        if self.hi == self.lo:
            return y
        xs = x[:, self.lo : self.hi]
        if self.stride != (1, 1):
            xs = xs[:, :, :: self.stride[0], :: self.stride[1]]
        if is_tracing() or torch.is_grad_enabled() and x.requires_grad:
            return y + F.conv2d(xs, self.w2x[:, :, None, None])
        n, c, h, w = y.shape
        if is_channels_last(y):  # (N H W, C) rows: accumulate GEMM 2's identity columns in place
            yv = y.permute(0, 2, 3, 1).reshape(n * h * w, c)
            if yv.data_ptr() == y.data_ptr():
                # out= rather than addmm_: the in-place overload is invisible to FlopCounterMode
                torch.addmm(yv, xs.permute(0, 2, 3, 1).reshape(n * h * w, -1), self.w2x.t(), out=yv)
                return y
        elif y.is_contiguous():
            yv = y.view(n, c, h * w)
            torch.baddbmm(yv, self.w2x.expand(n, -1, -1), xs.reshape(n, -1, h * w), out=yv)
            return y
        return y + F.conv2d(xs, self.w2x[:, :, None, None])

    def count_macs(self, inputs: tuple[Any, ...], output: Tensor) -> int:
        """MACs of one call: ``N H_out W_out (r C_in + C_out (r + hi - lo))`` (what it executes)."""
        pixels = output.numel() // self.out_channels
        return pixels * (self.rank * self.in_channels + self.out_channels * (self.rank + self.hi - self.lo))

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, rank={self.rank}, stride={self.stride}"
        return s + (f", identity_channels=[{self.lo}:{self.hi}]" if self.hi > self.lo else "")
