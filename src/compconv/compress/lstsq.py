"""Least-squares building blocks of the warm start: patches, normal equations, ridge solves.

Every fit here solves ``min_W ||A W - Y||^2 + lam ||W||^2`` from the normal equations accumulated batch by
batch (``G = A^T A``, ``B = A^T Y`` in float64), so the calibration set never has to be unfolded at once.
``lam = ridge * mean(diag(G))`` (relative, so the same ``ridge`` suits every layer's scale); ``ridge=0``
is a plain least-squares solve (a pseudo-inverse where ``G`` is singular, e.g. dead ReLU channels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NormalEquations", "conv_patches", "depthwise_patches", "relative_error", "solve_ridge"]


def _pad_amounts(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding of ``conv`` (``"same"`` pads as PyTorch: extra on the right)."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        out = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        (t, b), (left, r) = out
        return (left, r, t, b)
    ph, pw = conv.padding  # type: ignore[misc]
    return (pw, pw, ph, ph)


def _padded(x: Tensor, conv: nn.Conv2d) -> Tensor:
    pad = _pad_amounts(conv)
    if not any(pad):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pad, mode=mode)


def conv_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The rows ``conv`` multiplies: ``(N, C_in, H, W) -> (N * H_out * W_out, C_in * kh * kw)``.

    Column ``c * kh * kw + i * kw + j`` is input channel ``c`` at tap ``(i, j)``, the layout of
    ``conv.weight.view(C_out, -1)``; so ``conv_patches(x, conv) @ conv.weight.view(C_out, -1).T`` is the
    conv's output (without bias) with its pixels flattened ``(n, h, w)``-major. Only ``groups=1``.
    """
    cols = F.unfold(_padded(x, conv), conv.kernel_size, conv.dilation, 0, conv.stride)  # (N, C k k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def depthwise_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Per-channel patches for a depthwise ``conv``: ``(N, C, H, W) -> (C, N * H_out * W_out, kh * kw)``."""
    cols = F.unfold(_padded(x, conv), conv.kernel_size, conv.dilation, 0, conv.stride)  # (N, C k k, L)
    n, _, length = cols.shape
    c = x.shape[1]
    kk = conv.kernel_size[0] * conv.kernel_size[1]
    return cols.view(n, c, kk, length).permute(1, 0, 3, 2).reshape(c, n * length, kk)


def flat_channels(y: Tensor) -> Tensor:
    """``(N, C, H, W) -> (N * H * W, C)`` with pixels in the order of :func:`conv_patches`' rows."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


class NormalEquations:
    """Running ``G = A^T A`` and ``B = A^T Y`` (float64), batched over a leading dimension if given.

    ``add(a, y)`` takes ``a (..., P, D)`` and ``y (..., P, T)``; ``solve(ridge)`` returns ``W (..., D, T)``.
    With ``intercept``, a constant column is fitted too (not regularised) and left out of the solution.
    """

    def __init__(self, intercept: bool = False) -> None:
        self.g: Tensor | None = None
        self.b: Tensor | None = None
        self.intercept = intercept

    def add(self, a: Tensor, y: Tensor) -> None:
        a64, y64 = a.double(), y.double()
        if self.intercept:
            a64 = torch.cat([a64, torch.ones_like(a64[..., :1])], -1)
        g = a64.transpose(-1, -2) @ a64
        b = a64.transpose(-1, -2) @ y64
        self.g = g if self.g is None else self.g + g
        self.b = b if self.b is None else self.b + b

    def solve(self, ridge: float) -> Tensor:
        if self.g is None or self.b is None:
            raise ValueError("no calibration rows were added; calib must yield at least one batch")
        if not self.intercept:
            return solve_ridge(self.g, self.b, ridge)
        return solve_ridge(self.g, self.b, ridge, free_last=True)[..., :-1, :]


def solve_ridge(g: Tensor, b: Tensor, ridge: float, free_last: bool = False) -> Tensor:
    """``(G + lam I)^-1 B`` with ``lam = ridge * mean(diag G)`` (batched over leading dims); float64.

    ``free_last``: the last unknown (an intercept) is not regularised.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, but got {ridge}")
    d = g.shape[-1]
    eye = torch.eye(d, dtype=g.dtype, device=g.device)
    if free_last:
        eye[-1, -1] = 0
    scale = torch.diagonal(g, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    if ridge > 0:
        return torch.linalg.solve(g + (ridge * scale)[..., None, None] * eye, b)
    # Plain least squares: the minimum-norm solution also where G is singular (dead input channels).
    return torch.linalg.pinv(g, hermitian=True) @ b


def relative_error(pred: Sequence[Tensor], target: Sequence[Tensor], channels: Sequence[int] | None = None) -> float:
    """``sum ||pred - target||^2 / sum ||target||^2`` over batches (optionally only ``channels``)."""
    num = den = 0.0
    for p, t in zip(pred, target, strict=True):
        if channels is not None:
            idx = torch.as_tensor(list(channels), dtype=torch.long, device=t.device)
            p, t = p.index_select(1, idx), t.index_select(1, idx)
        num += float((p.double() - t.double()).pow(2).sum())
        den += float(t.double().pow(2).sum())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))
