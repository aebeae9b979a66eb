"""Choosing each layer's option to meet a budget: measured sensitivity, then a greedy knapsack.

**Sensitivity** of candidate ``c`` at layer ``l`` (keep = 0), measured on calibration batches with the
layer alone replaced in the original network:

* ``"reconstruction"`` (default, any model): the held-out relative output error of the layer after its
  least-squares warm start, ``sum ||f_c(x) - conv(x)||^2 / sum ||conv(x)||^2``;
* ``"kl"`` (classifiers): the mean ``KL(softmax(original logits) || softmax(logits))`` on the held-out
  batches with the fitted candidate in place (BN statistics unchanged).

**Selection** (``rule="search"``): start from keep everywhere; while the cost is above the budget, take
the move (any layer, to any cheaper candidate) with the least added sensitivity per MAC (or param, or
second of measured latency) saved; then, while some layer can go back to a candidate of lower sensitivity
without leaving the budget, take the largest such gain. Deterministic: ties break by the larger saving,
then layer order. ``rule="eq6"`` (CompConv only) uses the paper's Eq. 6 for every layer (depth from
``C_in`` and ``c0``) with the largest ``c0`` in ``EQ6_C0`` that meets the budget; ``rule="uniform"`` gives
every layer the same option (the least compressing one that meets the budget; layers without it keep their conv).

With ``budget_type="latency"`` a candidate's cost is its measured ``latency`` (seconds per forward, see
:mod:`compconv.compress.candidates`) and ``total`` is the whole model's measured latency: a choice's cost is
the estimate ``total - sum(keep latency - chosen latency)`` (the rest of the model assumed unchanged). A
candidate no faster than the dense conv saves nothing, so the greedy search never takes it to meet the budget.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compconv.compress.calib import capture_io
from compconv.compress.candidates import LayerCandidates
from compconv.compress.warmstart import fit_layer
from compconv.layers.base import get_method
from compconv.layers.compconv import MAX_DEPTH, depth_from_c0

__all__ = ["EQ6_C0", "RULES", "SENSITIVITIES", "chosen_cost", "eq6_select", "greedy_select",
           "measure_sensitivity", "uniform_select"]

RULES = ("search", "eq6", "uniform")
SENSITIVITIES = ("reconstruction", "kl")
EQ6_C0: tuple[int, ...] = (2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


def _cost(layer: LayerCandidates, i: int, budget_type: str) -> float:
    """Candidate ``i``'s MACs, params or measured latency (seconds), per ``budget_type``."""
    c = layer.candidates[i]
    if budget_type == "latency":
        if c.latency is None:
            raise ValueError(f"layer {layer.name!r}: candidate {c.label!r} was not timed (budget_type='latency' "
                             "needs every candidate's latency)")
        return c.latency
    return c.macs if budget_type == "macs" else c.params


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def measure_sensitivity(
    model: nn.Module,
    method: str,
    layers: Sequence[LayerCandidates],
    fit: list[Tensor],
    held: list[Tensor],
    *,
    kind: str = "reconstruction",
    ridge: float = 1e-4,
    adam_steps: int = 300,
    seed: int = 0,
) -> dict[str, list[float]]:
    """``{layer: [sensitivity of each candidate]}`` (keep first, 0.0); ``model`` is the original (eval).

    Raises ``ValueError`` for an unknown ``kind`` or (``"kl"``) a model whose output is not ``(N, classes)``.
    """
    if kind not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, but got {kind!r}")
    cls = get_method(method)
    work = copy.deepcopy(model).eval() if kind == "kl" else model
    ref_logp: list[Tensor] = []
    if kind == "kl":
        with torch.no_grad():
            outs = [model(x) for x in held]
        if any(not isinstance(o, Tensor) or o.dim() != 2 for o in outs):
            raise ValueError("sensitivity='kl' needs a model whose output is logits (N, classes); "
                             "use sensitivity='reconstruction'")
        ref_logp = [F.log_softmax(o.double(), 1) for o in outs]
    out: dict[str, list[float]] = {}
    for layer in layers:
        conv = model.get_submodule(layer.name)
        fx, fy = capture_io(model, conv, fit)
        hx, hy = capture_io(model, conv, held)
        sens = [0.0]
        for cand in layer.candidates[1:]:
            opts, _ = cls.resolve_hparams(conv, **(cand.options or {}))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                mod = cls.from_conv(conv, **opts)
            res = fit_layer(mod, conv, fx, fy, hx, hy, ridge=ridge, adam_steps=adam_steps, seed=seed)
            if kind == "reconstruction":
                sens.append(res.err_fit)
                continue
            old = _swap(work, layer.name, mod.eval())
            try:
                with torch.no_grad():
                    kl = 0.0
                    for x, lp in zip(held, ref_logp, strict=True):
                        q = F.log_softmax(work(x).double(), 1)
                        kl += float((lp.exp() * (lp - q)).sum())
                    sens.append(kl / sum(x.shape[0] for x in held))
            finally:
                _swap(work, layer.name, old)
        out[layer.name] = sens
    return out


def _unreachable(layers: Sequence[LayerCandidates], total: float, budget_type: str, what: str) -> ValueError:
    saving = sum(_cost(lc, 0, budget_type) - min(_cost(lc, i, budget_type) for i in range(len(lc.candidates)))
                 for lc in layers)
    if budget_type == "latency":  # layer counts are rarely the cause: the compact forms are not faster here
        est = " (estimated from the layers' timings)"
        hint = ("on this machine and batch the compact forms save little time (see the layers' timings); raise "
                "budget, time at the batch you deploy (input_size), or use a MACs budget")
    else:
        est = ""
        hint = ("raise the budget, or (Python API) let more layers change: keep_stem=False, fewer exclude "
                "patterns")
    return ValueError(f"budget cannot be met{what}: the smallest reachable {budget_type}{est} is "
                      f"{(total - saving) / total:.4f} of the model's (every layer at its cheapest candidate); "
                      + hint)


def greedy_select(
    layers: Sequence[LayerCandidates],
    sensitivity: dict[str, list[float]],
    total: float,
    target: float,
    budget_type: str = "macs",
) -> list[int]:
    """The chosen candidate index per layer, with cost ``total - savings <= target``; see the module doc.

    ``total``: the whole model's MACs (or params, or measured latency in seconds); ``target``: the budget in
    the same unit.
    Raises ``ValueError`` with the smallest reachable fraction when the budget cannot be met.
    """
    cur = [0] * len(layers)
    cost = float(total)
    while cost > target:
        best: tuple[float, float, int, int] | None = None
        for li, lc in enumerate(layers):
            c0 = _cost(lc, cur[li], budget_type)
            s0 = sensitivity[lc.name][cur[li]]
            for i in range(len(lc.candidates)):
                saved = c0 - _cost(lc, i, budget_type)
                if saved <= 0:
                    continue
                key = ((sensitivity[lc.name][i] - s0) / saved, -saved, li, i)
                if best is None or key < best:
                    best = key
        if best is None:
            raise _unreachable(layers, total, budget_type, "")
        _, neg_saved, li, i = best
        cur[li] = i
        cost += neg_saved
    # Give back what the last steps overshot: moves to lower sensitivity that stay within the budget.
    while True:
        best_back: tuple[float, int, int] | None = None
        for li, lc in enumerate(layers):
            s0 = sensitivity[lc.name][cur[li]]
            c0 = _cost(lc, cur[li], budget_type)
            for i in range(len(lc.candidates)):
                gain = s0 - sensitivity[lc.name][i]
                extra = _cost(lc, i, budget_type) - c0
                if gain > 0 and cost + extra <= target:
                    key = (-gain, li, i)
                    if best_back is None or key < best_back:
                        best_back = key
        if best_back is None:
            return cur
        _, li, i = best_back
        cost += _cost(layers[li], i, budget_type) - _cost(layers[li], cur[li], budget_type)
        cur[li] = i


def chosen_cost(layers: Sequence[LayerCandidates], choice: list[int], total: float, budget_type: str) -> float:
    """The model's cost with candidate ``choice[i]`` at layer ``i``: ``total`` less each layer's saving
    (for latency, the estimate: the rest of the model assumed unchanged)."""
    return total - sum(_cost(lc, 0, budget_type) - _cost(lc, i, budget_type) for lc, i in zip(layers, choice,
                                                                                              strict=True))


def eq6_select(
    model: nn.Module, layers: Sequence[LayerCandidates], total: float, target: float, budget_type: str = "macs",
    max_depth: int = MAX_DEPTH,
) -> tuple[list[int], int]:
    """``(choice, c0)``: Eq. 6's depth per layer for the largest ``c0`` in ``EQ6_C0`` within the budget.

    A depth the layer cannot take is lowered to the next one it can (as ``convert`` does), 0 = keep.
    """
    for c0 in EQ6_C0:
        choice = []
        for lc in layers:
            conv = model.get_submodule(lc.name)
            d = depth_from_c0(conv.in_channels, c0, max_depth)
            labels = {c.label: i for i, c in enumerate(lc.candidates)}
            while d > 0 and f"depth={d}" not in labels:
                d -= 1
            choice.append(labels[f"depth={d}"] if d else 0)
        if chosen_cost(layers, choice, total, budget_type) <= target:
            return choice, c0
    raise _unreachable(layers, total, budget_type, f" by Eq. 6 with any c0 in {EQ6_C0}")


def uniform_select(
    layers: Sequence[LayerCandidates], total: float, target: float, budget_type: str = "macs",
) -> tuple[list[int], str]:
    """``(choice, label)``: the same option everywhere, the least compressing one that meets the budget."""
    labels: list[str] = []
    for lc in layers:
        for c in lc.candidates[1:]:
            if c.label not in labels:
                labels.append(c.label)
    for label in labels:
        choice = [next((i for i, c in enumerate(lc.candidates) if c.label == label), 0) for lc in layers]
        if chosen_cost(layers, choice, total, budget_type) <= target:
            return choice, label
    raise _unreachable(layers, total, budget_type, f" by one option for every layer (tried {labels})")
