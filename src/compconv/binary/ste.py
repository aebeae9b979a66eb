"""The sign function of binary networks, with the clipped straight-through gradient.

``binary_sign(x)`` is ``+1`` where ``x >= 0`` and ``-1`` where ``x < 0`` (so ``sign(0) = +1``: a binary value
has no zero; ``torch.sign`` would give 0 there). Its gradient is the clipped straight-through estimator
of Hubara et al. (Binarized Neural Networks, NeurIPS 2016), which XNOR-Net uses (Rastegari et al., ECCV
2016, Sec. 3.1: ``d sign(r) / d r = 1_{|r| <= 1}``): the incoming gradient passes unchanged where
``|x| <= 1`` (both ends included) and is zero elsewhere.

It is written with ordinary autograd ops, ``s + (t - t.detach())`` with ``t = where(|x| > 1, 0, x)``: the
forward value is exactly ``s`` (``t - t.detach()`` is exactly 0 wherever ``x`` is not NaN: ``+-inf`` lie
outside the mask, so ``t`` is 0 there and ``sign(+-inf) = +-1``, never ``inf * 0 = NaN``; a NaN stays NaN), the
gradient is ``1_{|x| <= 1}``. (``clamp``/``hardtanh`` would not do: PyTorch zeroes their gradient at
``x = +-1`` exactly.) So ``torch.func``, double backward, ``torch.compile`` and ``torch.export`` see plain ops,
with no custom ``autograd.Function``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["binary_sign"]


def binary_sign(x: Tensor) -> Tensor:
    """``+1`` where ``x >= 0``, ``-1`` elsewhere (same shape and dtype); gradient ``1_{|x| <= 1}`` (clipped STE).

    Shapes: any; the output has ``x``'s shape, dtype and device. Values are exactly ``+1.0`` / ``-1.0``.
    """
    s = (x >= 0).to(x.dtype) * 2 - 1
    t = torch.where(x.abs() > 1, torch.zeros_like(x), x)  # not x * mask: inf * 0 would be NaN; NaN stays
    return s + (t - t.detach())
