"""``BinaryConv2d``: an XNOR-Net binary convolution around an existing ``nn.Conv2d``.

XNOR-Net (Rastegari, Ordonez, Redmon, Farhadi, ECCV 2016) approximates a convolution ``I * W`` by
``(sign(I) (*) sign(W)) alpha``: the weights of each filter (output channel) ``W_c`` become ``alpha_c B_c``
with ``B_c = sign(W_c)`` and ``alpha_c = ||W_c||_1 / n``, ``n = C_in/groups x k_h x k_w`` (Sec. 3.1: the
minimiser of ``||W - alpha B||^2``), and the input becomes ``sign(I)`` (Sec. 3.2), so that every
multiply-accumulate of the convolution is one XNOR + popcount of +-1 values. Its block order is
``BN -> BinActiv -> BinConv -> (Pool)`` (Sec. 3.2, Fig. 3): the activations are normalised *before* the sign.

What this module computes, for an input ``x (N, C_in, H, W)`` (or unbatched ``(C_in, H, W)``)::

    x_hat = BN(x)                                   its own BatchNorm2d(C_in) (``input_bn=True``)
    y     = conv(sign(x_hat), sign(W)) * alpha      the wrapped conv's geometry; alpha (C_out,) per filter
    y     = y * K                                   only with ``input_scale=True`` (XNOR-Net Eq. 11's K)
    y     = y + bias                                the wrapped conv's bias, if any

``sign`` is :func:`compconv.binary.ste.binary_sign` (``sign(0) = +1``, clipped straight-through gradient,
``1_{|r| <= 1}``, for the input *and* the latent weights, as XNOR-Net trains them). ``alpha`` is recomputed
from the real-valued latent weights ``W`` (``conv.weight``, what the optimiser updates) at every forward
and the gradient flows through it too: ``dL/dW_i = g_i alpha 1_{|W_i| <= 1} + sign(W_i) / n sum_j g_j B_j``
(``g = dL/d(alpha B)``). XNOR-Net writes the second term as ``1/n`` (Sec. 3.1, "Training"); the exact
derivative above is what its reference PyTorch port computes (without that port's extra ``n (1 - 1/C)``
gradient rescaling, a learning-rate choice).

Why the module owns a BatchNorm on its input: ordinary models run ``conv -> BN -> ReLU``, so a binary conv's
input is a ReLU output, ``>= 0`` everywhere; ``sign`` of it would be ``+1`` everywhere (``sign(0) = +1``) and
the layer would carry no information. XNOR-Net's order ``BN -> sign -> conv`` needs a BN right before the
sign. Putting that BN inside the binary conv (rather than moving the host's BN/ReLU) keeps the rewrite local
to one conv, so it applies unchanged to every compact conv's inner convs (CompConv's ``W_i`` and tail, a
Ghost module's primary and cheap convs, ...), whose inputs are sums, concatenations or slices no host BN
reaches. The host's own ``BN -> ReLU`` after the conv stay as they were (the BN re-centres the scaled
output). ``sign(BN(x)) = sign(x - t_c)`` per channel for a positive BN scale: the BN is a learned per-channel
threshold (plus a sign flip where its scale is negative), centred on the batch statistics from the start.
``input_bn=False`` leaves it out (e.g. for a host that already normalises right before the conv).

Padding: the wrapped conv's padding mode is used on the binarized input, so zero padding contributes 0, a
value a pure +-1 XNOR kernel cannot represent (it needs a mask, as most binary-network code simulating
binary convs in floating point does implicitly).

What stays real-valued and why: ``alpha`` (one float per filter; a per-channel scale, not a multiply-accumulate),
the bias, the input BN (per-channel affine map), and the output (real: ``alpha`` times an integer popcount
sum). The latent weights are real during training only; at inference the layer stores ``sign(W)`` (1 bit each)
and ``alpha``. The computation is simulated in floating point: it is exactly the binary network's function
(integer sums of +-1 products are exact in float32 up to 2^24 terms), not its speed. The conv always runs in
float32 (or float64 for a float64 model), with autocast disabled around it: under bf16 / fp16 autocast (``compconv
train``'s default on CUDA) or for a half-precision model, a half-precision conv would round the sums (bf16 has 8
significant bits: a sum of 2302 becomes 2304); the output is then cast to the input / weight dtype (float32 under
autocast, whose float32 weights it keeps).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compconv.binary.ste import binary_sign

__all__ = ["BinaryConv2d"]


def check_flag(name: str, value: Any) -> None:
    """``value`` must be a bool (not 0 / 1, not a string): ``ValueError`` naming ``name`` otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, but got {value!r}")


class BinaryConv2d(nn.Module):
    """XNOR-Net binary convolution wrapping ``conv`` (whose weight becomes the real-valued latent weight).

    Args:
        conv: an ``nn.Conv2d`` (or compconv's ``PadAnyConv2d`` / ``DepthwiseConv2d``); it is kept as ``.conv``
            with its weights, bias, geometry and padding mode (not copied).
        input_bn: own a ``BatchNorm2d(C_in)`` applied before the sign (default True; see the module
            docstring for why).
        input_scale: also multiply by XNOR-Net's input scale ``K`` (Eq. 11): the mean of ``|BN(x)|`` over the
            input channels of each group, averaged over each ``k_h x k_w`` window (a box filter with the
            conv's stride, padding and dilation). Default False: the activations are the plain sign, as
            Bi-Real Net, ReActNet and most XNOR-Net re-implementations use them.

    Shapes: ``(N, C_in, H, W) -> (N, C_out, H_out, W_out)`` (unbatched ``(C_in, H, W)`` too), exactly the
    wrapped conv's output shape.

    Counts (for ``compconv.profile``): ``count_bops`` = the wrapped conv's MACs, ``N H_out W_out C_out
    (C_in / g) k_h k_w`` binary operations (XNOR + popcount of one +-1 pair each); ``count_macs`` = the real
    MACs (0, or ``N H_out W_out g k_h k_w`` for the ``K`` box filter); ``count_binary_params`` = the weights
    (1 bit each at inference); ``count_scales`` = ``C_out`` (the ``alpha`` kept as 32-bit floats).

    Raises:
        TypeError: ``conv`` is not an ``nn.Conv2d``. ValueError: ``input_bn`` / ``input_scale`` not a bool.
    """

    def __init__(self, conv: nn.Conv2d, *, input_bn: bool = True, input_scale: bool = False) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"BinaryConv2d wraps an nn.Conv2d, but got {type(conv).__name__}")
        check_flag("input_bn", input_bn)  # a truthy "no" would silently switch the option on
        check_flag("input_scale", input_scale)
        self.conv = conv
        w = conv.weight
        self.bn: nn.BatchNorm2d | None = (
            nn.BatchNorm2d(conv.in_channels, device=w.device, dtype=w.dtype) if input_bn else None
        )
        self.input_scale = bool(input_scale)
        self.train(conv.training)

    # geometry of the wrapped conv (what code written for nn.Conv2d reads)
    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.conv.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.conv.stride

    @property
    def padding(self) -> Any:
        return self.conv.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.conv.dilation

    @property
    def groups(self) -> int:
        return self.conv.groups

    @property
    def input_bn(self) -> bool:
        return self.bn is not None

    def options(self) -> dict[str, bool]:
        """The options that rebuild this layer (recorded by ``compconv.save``)."""
        return {"input_bn": self.input_bn, "input_scale": self.input_scale}

    def alpha(self) -> Tensor:
        """``(C_out,)``: the per-filter scale ``||W_c||_1 / n`` of the current latent weights (XNOR-Net Sec. 3.1)."""
        return self.conv.weight.abs().mean(dim=(1, 2, 3))

    def binary_weight(self) -> Tensor:
        """``sign(W)``, ``(C_out, C_in/g, k_h, k_w)`` of +-1 (``sign(0) = +1``), without the straight-through graph."""
        return binary_sign(self.conv.weight.detach())

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H_out, W_out)``; ``(C_in, H, W) -> (C_out, H_out, W_out)``."""
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        conv = self.conv
        x_hat = self.bn(x) if self.bn is not None else x
        w = conv.weight
        out_dtype = torch.promote_types(x_hat.dtype, w.dtype)
        # float32 at least, autocast off: a bf16 / fp16 conv would round the integer sums of +-1 products (a sum
        # of 2302 is 2304 in bf16); in float32 they are exact up to 2^24 terms
        dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
        dev = x_hat.device.type
        on = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)  # (no autocast on meta)
        with torch.autocast(dev, enabled=False) if on else contextlib.nullcontext():
            x_hat, wf = x_hat.to(dtype), w.to(dtype)
            y = conv._conv_forward(binary_sign(x_hat), binary_sign(wf), None)  # exact integer sums
            y = y * wf.abs().mean(dim=(1, 2, 3)).view(1, -1, 1, 1)  # one scale per filter
            if self.input_scale:
                y = y * self._input_scale(x_hat)
            if conv.bias is not None:
                y = y + conv.bias.to(dtype).view(1, -1, 1, 1)
        return y.to(out_dtype)

    def _input_scale(self, x_hat: Tensor) -> Tensor:
        """XNOR-Net's ``K`` (Eq. 11), ``(N, C_out, H_out, W_out)``: ``A = mean_c |x_hat|`` per group, box-filtered."""
        conv = self.conv
        n, c, h, w = x_hat.shape
        g = conv.groups
        a = x_hat.abs().reshape(n, g, c // g, h, w).mean(2)  # (N, g, H, W)
        box = torch.full((g, 1, *conv.kernel_size), 1.0 / math.prod(conv.kernel_size), dtype=a.dtype, device=a.device)
        if conv.padding_mode != "zeros":
            from compconv.layers.ops import pad_any

            a = pad_any(a, conv._reversed_padding_repeated_twice, conv.padding_mode)
            pad: Any = 0
        else:
            pad = conv.padding
        k = F.conv2d(a, box, None, conv.stride, pad, conv.dilation, g)  # (N, g, H_out, W_out)
        return k.repeat_interleave(conv.out_channels // g, dim=1)

    # -- counting (compconv.profile) -----------------------------------------------------------------
    def count_bops(self, inputs: tuple[Any, ...], output: Tensor) -> int:
        """Binary operations of this call: ``output.numel() x (C_in / g) x k_h k_w`` (the conv's MACs)."""
        return int(output.numel() * (self.in_channels // self.groups) * math.prod(self.kernel_size))

    def count_macs(self, inputs: tuple[Any, ...], output: Tensor) -> int:
        """Real MACs of this call: 0, or the ``K`` box filter's ``N H_out W_out g k_h k_w`` (``input_scale``).

        The per-filter ``alpha`` and ``K`` products and the input BN are elementwise (counted zero, as BN is).
        """
        if not self.input_scale:
            return 0
        per_out = output.numel() // self.out_channels  # N H_out W_out (or H_out W_out unbatched)
        return int(per_out * self.groups * math.prod(self.kernel_size))

    def count_params(self) -> int:
        """Every parameter (latent weights, bias, the input BN), as for any module."""
        return sum(p.numel() for p in self.parameters())

    def count_binary_params(self) -> int:
        """The binarized weights: ``C_out x C_in/g x k_h x k_w`` (1 bit each at inference)."""
        return self.conv.weight.numel()

    def count_scales(self) -> int:
        """Real values stored at inference besides the parameters: ``alpha``, one per filter (``C_out``)."""
        return self.out_channels

    def extra_repr(self) -> str:
        return (
            f"XNOR-Net: input_bn={self.input_bn}, input_scale={self.input_scale}, "
            f"{self.count_binary_params():,} binary weights, {self.out_channels} scales"
        )
