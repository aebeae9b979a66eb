"""Which dense output channel each CompConv output channel should reproduce (the "matched" assignment).

A CompConv's outputs are not all free: identity channels are copies of input channels, and each tail
channel ``A_0[j]`` is a depthwise ``k x k`` filter of ``B_0[j]``. When the layer's output channels may
be permuted (the consumers are permuted to match, see :mod:`compconv.compress.permute`), the dense
channels can be dealt out to suit these constraints, greedily on the least-squares cost of each choice:

1. each identity channel takes the dense channel it is closest to (``||y_c - x_i||^2``, no scaling:
   the copy is exact);
2. of the rest, pairs ``(b, a)`` with the smallest depthwise residual ``min_w ||y_a - w * y_b||^2`` make
   ``B_0[j] -> y_b`` (fitted by ``W_d``) and ``A_0[j] -> y_a`` (its depthwise tail);
3. every other conv output (``W_1 .. W_{d-1}``, ``B_0`` channels without a tail) takes the rest in order.

Costs are computed on the dense targets (the fitted ``B_0`` is then close to ``y_b``), on at most
``max_rows`` sampled pixels. The plain assignment is output ``j`` -> dense channel ``j``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compconv.compress.lstsq import depthwise_patches, flat_channels
from compconv.layers.compconv import CompConv2d
from compconv.layers.ops import align_identity

__all__ = ["matched_targets", "plain_targets"]


def plain_targets(module: CompConv2d) -> list[int]:
    """``tgt[u]``: the dense channel that position ``u`` of the unshuffled output reproduces (plain)."""
    perm = module.output_permutation()  # y[:, j] = u[:, perm[j]]
    tgt = [0] * len(perm)
    for j, p in enumerate(perm):
        tgt[p] = j
    return tgt


def _greedy(cost: Tensor, rows: list[int], cols: list[int], n: int, disjoint: bool = False) -> list[tuple[int, int]]:
    """Up to ``n`` (row, col) pairs by increasing cost, each row and col used once (and, if ``disjoint``,
    no index used both as a row and as a col)."""
    sub = cost[rows][:, cols]
    order = torch.argsort(sub.flatten(), stable=True).tolist()
    used_r: set[int] = set()
    used_c: set[int] = set()
    out: list[tuple[int, int]] = []
    w = len(cols)
    for flat in order:
        r, c = rows[flat // w], cols[flat % w]
        if r in used_r or c in used_c or (disjoint and (r == c or r in used_c or c in used_r)):
            continue
        out.append((r, c))
        used_r.add(r)
        used_c.add(c)
        if disjoint:
            used_r.add(c)
            used_c.add(r)
        if len(out) == n:
            break
    return out


def _sample_rows(rows: Tensor, max_rows: int, gen: torch.Generator) -> Tensor:
    if rows.shape[0] <= max_rows:
        return rows
    return rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]]


def matched_targets(
    module: CompConv2d, xs: list[Tensor], ys: list[Tensor], *, ridge: float = 1e-4, max_rows: int = 4096,
    seed: int = 0,
) -> list[int]:
    """``tgt[u]`` for every unshuffled output position ``u`` (a permutation of ``range(C_out)``).

    ``xs``: the layer's inputs ``(N, C_in, H, W)``; ``ys``: the dense conv's outputs ``(N, C_out, H', W')``.
    """
    plan = module.plan
    if plan is None:
        return list(range(module.out_channels))
    gen = torch.Generator().manual_seed(seed)
    c_out = module.out_channels
    pos = {s: i for i, s in enumerate(plan.sources)}
    tgt: list[int | None] = [None] * c_out
    free = list(range(c_out))

    # 1. identity positions (copies of input channels): nearest dense channel, unscaled.
    id_pos = [i for i, s in enumerate(plan.sources) if s[0] == "identity"]
    if id_pos and module.identity_convs is None:
        idx = module.identity_index.tolist()
        starts = [sum(plan.identity_widths[:k]) for k in range(len(plan.identity_widths))]
        chans = [idx[starts[plan.sources[i][1] - 1] + plan.sources[i][2]] for i in id_pos]
        yx = []
        for x, y in zip(xs, ys, strict=True):
            xi = align_identity(x, module.kernel_size, module.stride, module.padding, module.dilation,
                                (y.shape[-2], y.shape[-1]))
            yx.append(torch.cat([flat_channels(y), flat_channels(xi)[:, chans]], 1))
        rows = _sample_rows(torch.cat(yx), max_rows, gen).double()
        yy, xx = rows[:, :c_out], rows[:, c_out:]
        cost = yy.pow(2).sum(0)[None, :] + xx.pow(2).sum(0)[:, None] - 2 * xx.T @ yy  # (n_id, C_out)
        for r, c in _greedy(cost, list(range(len(id_pos))), free, len(id_pos)):
            tgt[id_pos[r]] = c
        free = [c for c in free if c not in set(t for t in tgt if t is not None)]

    # 2. (B_0[j], A_0[j]) pairs by the depthwise residual of predicting y_a from y_b.
    t = plan.tail_channels
    if t and module.tail is not None:
        n = sum(y.shape[0] for y in ys)
        keep = max(1, min(n, max_rows // max(1, ys[0].shape[-1] * ys[0].shape[-2])))
        y_all = torch.cat(ys)[torch.randperm(n, generator=gen)[:keep]]
        p = depthwise_patches(y_all, module.tail).double()  # (C, P, kk)
        yf = flat_channels(y_all).double()  # (P, C)
        g = p.transpose(1, 2) @ p  # (C, kk, kk)
        cross = torch.einsum("cpk,pa->cka", p, yf)  # (C_b, kk, C_a)
        scale = torch.diagonal(g, dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        eye = torch.eye(g.shape[-1], dtype=g.dtype)
        sol = torch.linalg.solve(g + (ridge * scale)[:, None, None] * eye, cross)
        cost = yf.pow(2).sum(0)[None, :] - (cross * sol).sum(1)  # (C_b, C_a) residual
        pairs = _greedy(cost, free, free, t, disjoint=True)
        for j, (b, a) in enumerate(pairs):
            tgt[pos[("conv", plan.depth, j)]] = b
            tgt[pos[("tail", plan.depth, j)]] = a
    # 3. everything else, in order.
    rest = iter(sorted(set(range(c_out)) - {v for v in tgt if v is not None}))
    return [v if v is not None else next(rest) for v in tgt]
