"""The sign function of binary networks, with the clipped straight-through gradient.

``binary_sign(x)`` is ``+1`` where ``x >= 0`` and ``-1`` where ``x < 0`` (so ``sign(0) = +1``: a binary value
has no zero; ``torch.sign`` would give 0 there). Its gradient is the clipped straight-through estimator
of Hubara et al. (Binarized Neural Networks, NeurIPS 2016), which XNOR-Net uses (Rastegari et al., ECCV
2016, Sec. 3.1: ``d sign(r) / d r = 1_{|r| <= 1}``): the incoming gradient passes unchanged where
``|x| <= 1`` (both ends included) and is zero elsewhere.

It is written with ordinary autograd ops, ``s + (t - t.detach())`` with ``t = x * m`` and the constant mask
``m = 1_{|x| <= 1}``: the forward value is exactly ``s`` (``t - t.detach()`` is exactly 0 for finite ``x``; a
NaN stays NaN), the gradient is ``m``. (``clamp``/``hardtanh`` would not do: PyTorch zeroes their gradient at
``x = +-1`` exactly.) So ``torch.func``, double backward, ``torch.compile`` and ``torch.export`` see plain ops,
with no custom ``autograd.Function``.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["binary_sign"]


def binary_sign(x: Tensor) -> Tensor:
    """``+1`` where ``x >= 0``, ``-1`` elsewhere (same shape and dtype); gradient ``1_{|x| <= 1}`` (clipped STE).

    Shapes: any; the output has ``x``'s shape, dtype and device. Values are exactly ``+1.0`` / ``-1.0``.
    """
    s = (x >= 0).to(x.dtype) * 2 - 1
    t = x * (x.abs() <= 1).to(x.dtype)
    return s + (t - t.detach())
