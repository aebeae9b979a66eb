"""Small pieces the compact convolutions share."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["channel_shuffle", "shuffle_groups", "shuffle_permutation", "align_identity"]


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

