"""Warm start: initialise a compact layer from the trained conv it replaces, by least squares.

``fit_layer(module, dense, fit_x, fit_y, held_x, held_y)`` takes the compact layer, the dense conv it
replaces, the layer's inputs in the compressed network (``fit_x``) and the dense conv's outputs in the
original network (``fit_y``), and sets the module's weights; it reports the relative output error
``sum ||f(x) - y||^2 / sum ||y||^2`` on the held-out batches before (as built, random init) and after.

Per method (all linear parts are exact ridge least squares, see :mod:`compconv.compress.lstsq`):

* **structurally dense** (CompConv ``d=0``, Ghost ``ratio=1``, HetConv ``P=1``): the dense weights are
  copied (exact);
* **CompConv**: ``W_1 .. W_d`` in order, each on its real input (``W_i`` reads ``T_{i-1}``, which holds the
  already fitted earlier outputs and the identity copies), against the dense channels its outputs stand
  for; then each depthwise tail filter on the fitted ``B_0`` channel it reads (a ``k*k`` least squares per
  channel); ``identity="conv"`` 1x1 copies are fitted too; the identity copies themselves cannot be;
* **Ghost** (``norm=False, act=False``): the primary conv on the first ``ceil(C_out/s)`` outputs, then each
  cheap depthwise filter on the fitted primary channel it reads;
* **HetConv**: each filter's live taps (``K x K`` on its ``M/P`` channels, the centre tap on the others),
  one least squares per residue class ``n mod P``, written into the module through ``dense_weight()``;
* **anything else** (SlimConv's SE gate and BNs, XSepConv's inner BN + activation, Ghost with norm/act,
  user methods): ``adam_steps`` steps of Adam on the layer's MSE, in train mode (documented fallback).

A final bias (when the module has one) is set to the mean residual, its least-squares value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from compconv.compress.assign import matched_targets, plain_targets
from compconv.compress.lstsq import (
    NormalEquations,
    conv_patches,
    depthwise_patches,
    flat_channels,
    relative_error,
    solve_ridge,
)
from compconv.layers.compconv import CompConv2d
from compconv.layers.ghost import GhostConv2d
from compconv.layers.hetconv import HetConv2d, hetconv_kernel_mask
from compconv.layers.ops import align_identity

__all__ = ["LayerFit", "fit_layer"]

ASSIGNMENTS = ("plain", "matched")


@dataclass
class LayerFit:
    """The outcome of one layer's warm start.

    ``err_init`` / ``err_fit``: held-out relative output error before / after; ``how``: ``"copy"``,
    ``"lstsq"`` or ``"adam"``; ``parts``: held-out error per kind of output channel (CompConv:
    ``identity``, ``tail``, ``conv``); ``permutation``: ``None``, or ``pi`` with output ``j`` reproducing
    dense channel ``pi[j]`` (the consumers must be permuted to match).
    """

    how: str
    err_init: float
    err_fit: float
    parts: dict[str, float] = field(default_factory=dict)
    permutation: list[int] | None = None


def _outputs(module: nn.Module, xs: list[Tensor]) -> list[Tensor]:
    with torch.no_grad():
        return [module(x) for x in xs]


def _set_rows(weight: Tensor, rows: list[int], sol: Tensor) -> None:
    """``weight[rows] = sol.T`` reshaped; ``sol`` is ``(D, len(rows))`` from a least-squares solve."""
    with torch.no_grad():
        w = sol.T.reshape(len(rows), *weight.shape[1:]).to(weight)
        weight[torch.as_tensor(rows, dtype=torch.long, device=weight.device)] = w


def _fit_conv(conv: nn.Conv2d, xs: list[Tensor], ys: list[Tensor], rows: list[int], ridge: float,
              intercept: bool = False) -> None:
    """Fit output channels ``rows`` of a dense ``conv`` (no bias) so that ``conv(x)[:, rows] ~ y`` (``y`` has
    ``len(rows)`` channels). ``intercept``: fit a constant too and drop it (the module's final bias takes it)."""
    if not rows:
        return
    ne = NormalEquations(intercept)
    for x, y in zip(xs, ys, strict=True):
        ne.add(conv_patches(x, conv), flat_channels(y))
    _set_rows(conv.weight, rows, ne.solve(ridge))


def _fit_depthwise(conv: nn.Conv2d, xs: list[Tensor], ys: list[Tensor], ridge: float,
                   intercept: bool = False) -> None:
    """Fit a depthwise ``conv`` (no bias): channel ``c`` of ``conv(x)`` ~ channel ``c`` of ``y``."""
    ne = NormalEquations(intercept)
    for x, y in zip(xs, ys, strict=True):
        ne.add(depthwise_patches(x, conv), flat_channels(y).T.unsqueeze(-1))
    sol = ne.solve(ridge)  # (C, kk, 1)
    with torch.no_grad():
        conv.weight.copy_(sol.reshape(conv.weight.shape).to(conv.weight))


def _fit_bias(module: nn.Module, xs: list[Tensor], ys: list[Tensor]) -> None:
    bias = getattr(module, "bias", None)
    if not isinstance(bias, Tensor):
        return
    with torch.no_grad():
        bias.zero_()
        num = torch.zeros_like(bias, dtype=torch.float64)
        n = 0
        for x, y in zip(xs, ys, strict=True):
            r = (y - module(x)).double()
            num += r.sum((0, 2, 3))
            n += r.numel() // r.shape[1]
        bias.copy_((num / max(n, 1)).to(bias))


# -- CompConv -----------------------------------------------------------------------------------------------
def _fit_compconv(m: CompConv2d, xs: list[Tensor], ys: list[Tensor], tgt: list[int], ridge: float) -> None:
    plan = m.plan
    assert plan is not None
    icpt = m.bias is not None
    pos = {s: i for i, s in enumerate(plan.sources)}

    def targets(kind: str, step: int, width: int) -> tuple[list[int], list[int]]:
        rows, dense = [], []
        for j in range(width):
            p = pos.get((kind, step, j))
            if p is not None:  # a front-dropped channel has no target: it keeps its init (it still feeds on)
                rows.append(j)
                dense.append(tgt[p])
        return rows, dense

    def pick(chans: list[int]) -> list[Tensor]:
        idx = torch.as_tensor(chans, dtype=torch.long)
        return [y.index_select(1, idx.to(y.device)) for y in ys]

    with torch.no_grad():
        hw = [tuple(y.shape[-2:]) for y in ys]
        xis = [align_identity(x, m.kernel_size, m.stride, m.padding, m.dilation, s)
               for x, s in zip(xs, hw, strict=True)]
        t_in = xs
        for step in range(1, plan.depth + 1):
            conv = m.convs[step - 1]
            rows, dense = targets("conv", step, conv.out_channels)
            _fit_conv(conv, t_in, pick(dense), rows, ridge, icpt)
            if step == plan.depth:
                break
            if m.identity_convs is not None:  # identity="conv": a 1x1 copy, fittable
                idc = m.identity_convs[step - 1]
                rows_i, dense_i = targets("identity", step, idc.out_channels)
                _fit_conv(idc, xis, pick(dense_i), rows_i, ridge, icpt)
            t_in = [torch.cat([m._identity(xi, step - 1), conv(t)], 1) for xi, t in zip(xis, t_in, strict=True)]
        if m.tail is not None:
            b0 = [m.convs[plan.depth - 1](t)[:, : plan.tail_channels] for t in t_in]
            _, dense_t = targets("tail", plan.depth, plan.tail_channels)
            _fit_depthwise(m.tail, b0, pick(dense_t), ridge, icpt)


def _compconv_parts(m: CompConv2d, xs: list[Tensor], ys: list[Tensor], pi: list[int]) -> dict[str, float]:
    plan = m.plan
    assert plan is not None
    perm = m.output_permutation()
    kinds: dict[str, list[int]] = {}
    for j, p in enumerate(perm):
        kinds.setdefault(plan.sources[p][0], []).append(j)
    outs = _outputs(m, xs)
    yp = [y[:, pi] for y in ys]
    return {k: relative_error(outs, yp, ch) for k, ch in sorted(kinds.items())}


# -- Ghost, HetConv -----------------------------------------------------------------------------------------
def _fit_ghost(m: GhostConv2d, xs: list[Tensor], ys: list[Tensor], ridge: float) -> None:
    p = m.primary_channels
    icpt = m.bias is not None
    _fit_conv(m.primary, xs, [y[:, :p] for y in ys], list(range(p)), ridge, icpt)
    if m.cheap is not None:
        with torch.no_grad():
            prim = [m.primary(x) for x in xs]
            src = [y[:, : m.ghost_channels] if m.ratio == 2 else y.index_select(1, m.cheap_index) for y in prim]
        _fit_depthwise(m.cheap, src, [y[:, p:] for y in ys], ridge, icpt)


def _het_params(m: HetConv2d) -> list[Tensor]:
    own = [m._parameters.get(n) for n in ("weight", "weight_1x1")]  # the "dense"/"masked" impls' kernels
    subs = [c.weight for c in (m.conv_k, m.conv_1) if c is not None]
    return [t for t in (*subs, *own) if t is not None]


def load_dense_weight(m: HetConv2d, w: Tensor) -> None:
    """Set ``m``'s parameters so that ``m.dense_weight() == w`` on its live taps (dead weights set to 0).

    ``dense_weight`` only gathers parameters into place, so each parameter's slot is found by writing
    unique ids into the parameters and reading where they land.
    """
    params = _het_params(m)
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    if total >= 2**24:
        raise ValueError(f"HetConv layer too large for the id mapping ({total} weights >= 2^24)")
    with torch.no_grad():
        saved = [p.clone() for p in params]
        off = 0
        for p, s in zip(params, sizes, strict=True):
            p.copy_(torch.arange(off + 1, off + s + 1, dtype=p.dtype).view_as(p))
            off += s
        ids = m.dense_weight().flatten().round().long()
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
        vals = torch.zeros(total, dtype=torch.float64)
        live = ids > 0
        vals[ids[live] - 1] = w.flatten()[live.to(w.device)].double().cpu()
        off = 0
        for p, s in zip(params, sizes, strict=True):
            p.copy_(vals[off : off + s].view_as(p).to(p))
            off += s


def _fit_hetconv(m: HetConv2d, dense: nn.Conv2d, xs: list[Tensor], ys: list[Tensor], ridge: float) -> None:
    mm, n, part = m.in_channels, m.out_channels, m.part
    kh, kw = m.kernel_size
    if part == 1:
        load_dense_weight(m, dense.weight.detach())
        return
    probe = nn.Conv2d(mm, n, m.kernel_size, m.stride, m._pad, m.dilation, bias=False)  # geometry for patches
    probe.padding_mode = m.padding_mode
    icpt = m.bias is not None
    ne = NormalEquations(icpt)
    for x, y in zip(xs, ys, strict=True):
        ne.add(conv_patches(x, probe), flat_channels(y))
    assert ne.g is not None and ne.b is not None
    kmask = hetconv_kernel_mask(mm, n, part)  # (N, M): True where the kernel is K x K
    w = torch.zeros(n, mm * kh * kw, dtype=torch.float64)
    centre = (kh // 2) * kw + kw // 2
    for r in range(part):
        filt = [f for f in range(n) if f % part == r]
        full = kmask[filt[0]]
        cols = [c * kh * kw + t for c in range(mm) for t in range(kh * kw) if full[c] or t == centre]
        ci = torch.as_tensor(cols + ([mm * kh * kw] if icpt else []))  # + the intercept (dropped after)
        sol = solve_ridge(ne.g[ci][:, ci], ne.b[ci][:, filt], ridge, free_last=icpt)  # (|cols|, |filt|)
        w[torch.as_tensor(filt)[:, None], torch.as_tensor(cols)[None, :]] = sol[: len(cols)].T
    load_dense_weight(m, w.view(n, mm, kh, kw))


# -- the generic route ---------------------------------------------------------------------------------------
def _fit_adam(m: nn.Module, xs: list[Tensor], ys: list[Tensor], steps: int, lr: float) -> None:
    params = [p for p in m.parameters() if p.requires_grad]
    if not params or steps <= 0:
        return
    opt = torch.optim.Adam(params, lr=lr)
    was = m.training
    m.train()
    try:
        with torch.enable_grad():
            for i in range(steps):
                x, y = xs[i % len(xs)], ys[i % len(ys)]
                loss = (m(x) - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-12)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        m.train(was)


def _linear_ghost(m: nn.Module) -> bool:
    return isinstance(m, GhostConv2d) and not m.norm and not m.act


def fit_layer(
    module: nn.Module,
    dense: nn.Conv2d,
    fit_x: list[Tensor],
    fit_y: list[Tensor],
    held_x: list[Tensor],
    held_y: list[Tensor],
    *,
    ridge: float = 1e-4,
    assignment: str = "plain",
    adam_steps: int = 300,
    adam_lr: float = 1e-3,
    seed: int = 0,
) -> LayerFit:
    """Warm-start ``module`` (which replaces ``dense``) from calibration activations; see the module doc.

    ``fit_x`` / ``held_x``: the layer's inputs ``(N, C_in, H, W)`` in the compressed network; ``fit_y`` /
    ``held_y``: the dense conv's outputs ``(N, C_out, H', W')`` in the original network. ``assignment``:
    ``"plain"`` (output ``j`` reproduces dense channel ``j``) or ``"matched"`` (CompConv only: see
    :mod:`compconv.compress.assign`; the result's ``permutation`` must then be absorbed downstream).
    Raises ``ValueError`` for an unknown ``assignment`` or empty calibration lists.
    """
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, but got {assignment!r}")
    if not fit_x or not held_x:
        raise ValueError("fit_layer needs at least one fit batch and one held-out batch")
    module.eval()
    err_init = relative_error(_outputs(module, held_x), held_y)
    pi: list[int] | None = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(module, CompConv2d) and module.plan is None:
            how = "copy"
            module.conv.load_state_dict(dense.state_dict())
        elif isinstance(module, CompConv2d):
            how = "lstsq"
            if assignment == "matched":
                tgt = matched_targets(module, fit_x, fit_y, ridge=ridge, seed=seed)
            else:
                tgt = plain_targets(module)
            _fit_compconv(module, fit_x, fit_y, tgt, ridge)
            perm = module.output_permutation()
            pi = [tgt[p] for p in perm]
        elif _linear_ghost(module) and module.ghost_channels == 0:
            how = "copy"
            with torch.no_grad():
                module.primary.weight.copy_(dense.weight)
        elif _linear_ghost(module):
            how = "lstsq"
            _fit_ghost(module, fit_x, fit_y, ridge)  # type: ignore[arg-type]
        elif isinstance(module, HetConv2d):
            how = "copy" if module.part == 1 else "lstsq"
            _fit_hetconv(module, dense, fit_x, fit_y, ridge)
        else:
            how = "adam"
            _fit_adam(module, fit_x, fit_y, adam_steps, adam_lr)
        module.eval()
        target_fit = fit_y if pi is None else [y[:, pi] for y in fit_y]
        bias = getattr(module, "bias", None)
        if how != "copy":
            _fit_bias(module, fit_x, target_fit)
        elif isinstance(bias, Tensor):  # CompConv d=0 holds its bias in .conv (copied above)
            with torch.no_grad():
                bias.copy_(dense.bias if dense.bias is not None else torch.zeros_like(bias))
    target_held = held_y if pi is None else [y[:, pi] for y in held_y]
    err_fit = relative_error(_outputs(module, held_x), target_held)
    parts = _compconv_parts(module, held_x, held_y, pi) if pi is not None else {}
    if pi is not None and pi == list(range(len(pi))):
        pi = None
    return LayerFit(how, err_init, err_fit, parts, pi)


def describe(fit: LayerFit) -> dict[str, Any]:
    """A JSON-ready view of a :class:`LayerFit`."""
    return {"how": fit.how, "err_init": fit.err_init, "err_fit": fit.err_fit, "parts": dict(fit.parts),
            "permuted": fit.permutation is not None}
