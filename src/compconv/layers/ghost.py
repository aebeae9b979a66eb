"""The Ghost module (Han, Wang, Tian, Guo, Xu, Xu. GhostNet: More Features from Cheap Operations. CVPR 2020).

For a conv ``C_in -> C_out`` with ratio ``s`` and cheap-op size ``d``::

    m     = ceil(C_out / s)                      intrinsic ("primary") channels
    Y'    = primary(X)                           k x k conv C_in -> m, with the host's stride/padding/dilation
    G     = cheap(Y')                            depthwise d x d, stride 1, "same" in the host's padding
                                                 mode: s - 1 ghosts per channel
    Y     = [Y', G][:, :C_out]                   (ghost j comes from primary channel j // (s - 1))

This is GhostNet's ``GhostModule`` (``torch.cat([x1, x2], 1)[:, :oup]``). Ghost channels cut by the
truncation are not computed at all: the cheap op is a depthwise conv over exactly the ``C_out - m`` kept
ghosts (its input channel ``j`` is primary channel ``j // (s - 1)``), so its weights and MACs are all live:

    params = m C_in k^2 + (C_out - m) d^2          MACs = Ho Wo (m C_in k^2 + (C_out - m) d^2)

In GhostNet each of the two ops is followed by BN (+ ReLU). Here both are optional and off by default
(``norm=False, act=False``): the module replaces a bare conv, and the host already applies its own BN +
ReLU to the module's output, as it did to the conv's. Off, the module stays a linear map like the conv it
replaces (foldable, no double activation); counts are the same either way (BN/ReLU carry no MACs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from compconv.layers.base import CompactConv2d, register_method
from compconv.layers.ops import PadAnyConv2d

__all__ = ["GhostConv2d", "ghost_channels"]

DEFAULT_RATIO = 2  # s: GhostNet's default (and the CompConv paper's Ghost-VGG16 / Ghost-ResNet50-s2)
DEFAULT_DW_SIZE = 3  # d: GhostNet's default


def ghost_channels(out_channels: int, ratio: int) -> tuple[int, int]:
    """``(primary, ghost)`` channel counts: ``m = ceil(C_out / s)`` and ``C_out - m`` (kept ghosts)."""
    if out_channels < 1:
        raise ValueError(f"out_channels must be >= 1, but got {out_channels}")
    if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio < 1:
        raise ValueError(f"ratio must be a positive int (GhostNet: 2; 1 = plain conv), but got {ratio!r}")
    m = -(-out_channels // ratio)
    return m, out_channels - m


@register_method("ghost")
class GhostConv2d(CompactConv2d):
    """Ghost module as a drop-in ``nn.Conv2d``: a primary conv for ``ceil(C_out/s)`` channels + cheap DW op.

    Args (besides ``nn.Conv2d``'s; ``groups`` must be 1):
        ratio: ``s``, the paper's ratio (default 2); ``1`` is a plain conv (no ghosts).
        dw_size: ``d``, kernel of the cheap depthwise op (default 3, odd).
        norm: BN after the primary conv and after the cheap op, as in GhostNet (default False: the host's BN
            after the module normalises; see the module docstring).
        act: ReLU after each op (GhostNet's ``relu=True``; default False, the host applies its activation).

    Shapes: input ``(B, C_in, H, W)`` -> output ``(B, C_out, H_out, W_out)``, exactly as ``nn.Conv2d``; the
    primary conv takes the host's kernel, stride, padding, dilation and padding mode, the cheap op keeps the
    primary output's size.
    """

    paper = "Han, Wang, Tian, Guo, Xu, Xu. GhostNet: More Features from Cheap Operations. CVPR 2020"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        ratio: int = DEFAULT_RATIO,
        dw_size: int = DEFAULT_DW_SIZE,
        norm: bool = False,
        act: bool = False,
    ) -> None:
        super().__init__()
        self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        if groups != 1:
            kind = "depthwise" if groups == in_channels else "grouped"
            raise ValueError(
                f"{kind} conv (groups={groups}): GhostConv2d replaces dense convs (groups=1); "
                "keep it as it is"
            )
        if not isinstance(dw_size, int) or isinstance(dw_size, bool) or dw_size < 1 or dw_size % 2 == 0:
            raise ValueError(f"dw_size must be a positive odd int (GhostNet: 3), but got {dw_size!r}")
        self.primary_channels, self.ghost_channels = ghost_channels(out_channels, ratio)
        self.ratio = ratio
        self.dw_size = dw_size
        self.norm = bool(norm)
        self.act = bool(act)
        factory = {"device": device, "dtype": dtype}
        m, g = self.primary_channels, self.ghost_channels

        def post(c: int) -> nn.Module:
            layers: list[nn.Module] = []
            if norm:
                layers.append(nn.BatchNorm2d(c, **factory))
            if act:
                layers.append(nn.ReLU(inplace=True))
            return nn.Sequential(*layers)

        self.primary = nn.Conv2d(
            in_channels,
            m,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            1,
            False,
            padding_mode,
            **factory,
        )
        self.primary_post = post(m)
        self.cheap: nn.Conv2d | None = None
        self.cheap_post: nn.Module | None = None
        if g:
            # the host's padding mode (a circular host stays shift-equivariant); PadAnyConv2d pads maps
            # smaller than the pad too (ops.pad_any), where the primary output is tiny
            self.cheap = PadAnyConv2d(g, g, dw_size, 1, dw_size // 2, 1, g, False, padding_mode, **factory)
            self.cheap_post = post(g)
            if ratio > 2:
                # Ghost j is made from primary channel j // (s - 1); s = 2 reads the first g channels.
                idx = torch.arange(g, device=device) // (ratio - 1)
                self.register_buffer("cheap_index", idx, persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        self._init_convs()

    def _init_convs(self) -> None:
        for c in (self.primary, self.cheap):
            if c is not None:
                nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")  # GhostNet's init

    def reset_parameters(self) -> None:
        """Re-initialise as at construction: Kaiming-normal (fan_out) convs, fresh BNs, zero bias."""
        super().reset_parameters()
        self._init_convs()

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Names and ranges of the Ghost module's options, for any layer."""
        from compconv.options import check_bool, check_int

        super().validate_options(options)
        check_int("ratio", options.get("ratio", DEFAULT_RATIO), minimum=1, hint="GhostNet: 2; 1 = plain conv")
        check_int("dw_size", options.get("dw_size", DEFAULT_DW_SIZE), minimum=1, odd=True, hint="GhostNet: 3")
        check_bool("norm", options.get("norm", False))
        check_bool("act", options.get("act", False))

    def _forward(self, x: Tensor) -> Tensor:
        # (B, C_in, H, W) -> (B, C_out, H_out, W_out); CompactConv2d.forward checks the input first
        y = self.primary_post(self.primary(x))
        if self.cheap is not None:
            assert self.cheap_post is not None
            src = y[:, : self.ghost_channels] if self.ratio == 2 else y.index_select(1, self.cheap_index)
            y = torch.cat([y, self.cheap_post(self.cheap(src))], 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, ratio={self.ratio}, dw_size={self.dw_size}, "
            f"primary={self.primary_channels}, ghost={self.ghost_channels}"
        )
        if self.norm or self.act:
            s += f", norm={self.norm}, act={self.act}"
        if self.bias is None:
            s += ", bias=False"
        return s
