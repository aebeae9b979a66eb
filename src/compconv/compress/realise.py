"""Turning a per-layer choice into a warm-started model, and scoring a result against the original.

``realise`` converts the chosen layers, warm-starts them in call order (each on the already compressed
upstream) and optionally re-estimates BN; ``output_distance`` is the held-out objective on which
``compress`` compares the search's result with Eq. 6's (or the uniform rule's): the mean
``KL(original || compressed)`` of the logits for classifiers, else the relative squared error of the
output tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compconv.compress.bn import reestimate_bn, reparametrize_bn
from compconv.compress.calib import capture
from compconv.compress.candidates import LayerCandidates, exact_pattern
from compconv.compress.lstsq import relative_error
from compconv.compress.permute import apply_permutation, permutable_outputs
from compconv.compress.report import LayerRecord
from compconv.compress.warmstart import LayerFit, fit_layer
from compconv.convert import ConversionReport, convert
from compconv.layers.base import conv_output_hw

__all__ = ["Realised", "conv_output_hw", "output_distance", "realise"]


@dataclass
class Realised:
    """A compressed, warm-started model with its per-layer records, notes and conversion report."""

    model: nn.Module
    records: list[LayerRecord]
    notes: list[str] = field(default_factory=list)
    conversion: ConversionReport | None = None
    bn_reestimated: int = 0
    bn_reparametrized: int = 0


def fit_one(comp: nn.Module, ref: nn.Module, name: str, fit: list[Tensor], held: list[Tensor], *,
             try_matched: bool, force_matched: bool, opts: dict[str, Any]) -> tuple[LayerFit, dict[str, float]]:
    """Warm-start layer ``name`` of ``comp`` in place; returns the kept fit and both assignments' errors."""
    module = comp.get_submodule(name)
    dense = ref.get_submodule(name)
    fx = capture(comp, module, fit, "input")
    hx = capture(comp, module, held, "input")
    fy = capture(ref, dense, fit, "output")
    hy = capture(ref, dense, held, "output")
    if not try_matched:
        return fit_layer(module, dense, fx, fy, hx, hy, assignment="plain", **opts), {}
    init = copy.deepcopy(module.state_dict())
    plain = fit_layer(module, dense, fx, fy, hx, hy, assignment="plain", **opts)
    plain_state = copy.deepcopy(module.state_dict())
    module.load_state_dict(init)
    matched = fit_layer(module, dense, fx, fy, hx, hy, assignment="matched", **opts)
    errs = {"plain": plain.err_fit, "matched": matched.err_fit}
    if force_matched or matched.err_fit < plain.err_fit:
        return matched, errs
    module.load_state_dict(plain_state)
    return plain, errs


def output_distance(
    ref: nn.Module, comp: nn.Module, held: list[Tensor],
) -> tuple[float | None, float | None, float | None]:
    """``(top-1 agreement, mean KL(ref || comp), distance)`` on held-out batches.

    For ``(N, classes)`` outputs the distance is the KL; for other tensor outputs agreement and KL are
    ``None`` and the distance is ``sum ||comp(x) - ref(x)||^2 / sum ||ref(x)||^2``; non-tensor outputs: all ``None``.
    """
    agree = kl = 0.0
    n = 0
    with torch.no_grad():
        for x in held:
            a, b = ref(x), comp(x)
            if not isinstance(a, Tensor) or not isinstance(b, Tensor):
                return None, None, None
            if a.dim() != 2:
                return None, None, relative_error([comp(x) for x in held], [ref(x) for x in held])
            lp, lq = F.log_softmax(a.double(), 1), F.log_softmax(b.double(), 1)
            agree += float((a.argmax(1) == b.argmax(1)).sum())
            kl += float((lp.exp() * (lp - lq)).sum())
            n += x.shape[0]
    return agree / n, kl / n, kl / n



def realise(
    ref: nn.Module,
    comp: nn.Module,
    method: str,
    layers: Sequence[LayerCandidates],
    choice: list[int],
    fit: list[Tensor],
    held: list[Tensor],
    batches: list[Tensor],
    *,
    size: tuple[int, ...],
    seed: int,
    warm_start: bool,
    assignment: str,
    sens: dict[str, list[float]] | None,
    reestimate_bn_stats: bool,
    reparametrize_bn_stats: bool,
    fit_opts: dict[str, Any],
) -> Realised:
    """Convert ``comp`` (a copy of the eval-mode original ``ref``, changed in place) to ``choice`` (one
    candidate index per layer of ``layers``), warm-start every compact layer and (optionally) re-estimate or
    re-parametrise BN."""
    notes: list[str] = []
    chosen = {lc.name: lc.candidates[i].options for lc, i in zip(layers, choice, strict=True) if i > 0}
    conv_report = None
    if chosen:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            comp, conv_report = convert(  # type: ignore[misc]
                comp, method, include=[exact_pattern(n) for n in chosen], keep_stem=False,
                overrides={exact_pattern(n): dict(o or {}) for n, o in chosen.items()},
                input_size=size, return_report=True)
    comp.eval()

    records: dict[str, LayerRecord] = {}
    for lc, i in zip(layers, choice, strict=True):
        c, k = lc.candidates[i], lc.keep
        records[lc.name] = LayerRecord(lc.name, c.label, c.options, k.params, c.params, k.macs, c.macs,
                                       sensitivity=sens[lc.name][i] if sens is not None else None,
                                       latency_before=k.latency, latency_after=c.latency)
    perms: dict[str, Any] = {}
    if warm_start and method == "compconv" and assignment != "plain" and chosen:
        perms, why = permutable_outputs(ref)
        if why:
            notes.append(why)
    starved: list[str] = []
    for name in chosen:  # in call order: each layer sees the already compressed upstream
        rec = records[name]
        dense = ref.get_submodule(name)
        shape = next(lc.in_shape for lc in layers if lc.name == name)
        h, w = conv_output_hw(dense, shape[-2:])
        rows = sum(x.shape[0] for x in fit) * h * w
        if warm_start and rows < 4 * dense.in_channels * dense.kernel_size[0] * dense.kernel_size[1]:
            starved.append(name)
        if not warm_start:
            module, dense = comp.get_submodule(name), ref.get_submodule(name)
            hx = capture(comp, module, held, "input")
            hy = capture(ref, dense, held, "output")
            with torch.no_grad():
                rec.err_init = relative_error([module(x) for x in hx], hy)
            continue
        res, errs = fit_one(comp, ref, name, fit, held, try_matched=name in perms,
                            force_matched=assignment == "matched", opts=fit_opts)
        if res.permutation is not None:
            apply_permutation(comp, perms[name], res.permutation)
        rec.err_init, rec.err_fit, rec.fit, rec.parts = res.err_init, res.err_fit, res.how, dict(res.parts)
        if method == "compconv":
            rec.assignment = "matched" if res.permutation is not None else "plain"
            rec.err_plain, rec.err_matched = errs.get("plain"), errs.get("matched")
    if warm_start and method == "compconv" and perms == {} and assignment != "plain" and chosen:
        notes.append("no layer's output order can be permuted for free here (each output meets a residual add, "
                     "a concat or a flatten): the plain assignment is used")

    if starved:
        notes.append(f"calibration is small for {len(starved)} layer(s) (e.g. {starved[-1]}): fewer than 4 rows "
                     "(fit images x output pixels) per unknown of a filter; the fit may not generalise "
                     "(compare err fit with err init) - pass more images or raise ridge")
    n_bn = reestimate_bn(comp, batches) if reestimate_bn_stats else 0
    n_rep = reparametrize_bn(comp, batches) if reparametrize_bn_stats else 0
    comp.eval()
    return Realised(comp, list(records.values()), notes, conv_report, n_bn, n_rep)
