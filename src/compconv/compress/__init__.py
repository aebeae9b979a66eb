"""Compress a trained model to a budget: choose each layer's option, warm-start it, re-estimate BN.

    model, report = compconv.compress(trained, "compconv", 0.5, calib_loader, input_size=(1, 3, 32, 32))
    print(report)                      # per layer: choice, MACs/params before -> after, sensitivity, errors

The steps (each in its own module of this package):

1. ``candidates``: every convertible conv's option ladder and each option's exact params and MACs;
2. ``search``: the per-layer sensitivity on calibration batches and the choice that meets the budget
   (or Eq. 6's rule, or one option everywhere);
3. ``convert`` (the library's converter) with the choices as per-layer overrides;
4. ``warmstart``: each compact layer, in network order, fitted by least squares so that it reproduces the
   trained conv's output on the *compressed* upstream (``assign`` and ``permute``: CompConv's channel
   assignment, where the graph lets the permutation be absorbed);
5. ``bn``: batch-norm statistics re-estimated on the calibration batches.

Distillation (training the result against the original) is the trainer's job, not this function's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compconv.compress.bn import reestimate_bn
from compconv.compress.calib import as_batches, capture, split_batches
from compconv.compress.candidates import exact_pattern, find_layers, layer_candidates
from compconv.compress.permute import apply_permutation, permutable_outputs
from compconv.compress.report import CompressionReport, LayerRecord
from compconv.compress.search import (
    RULES,
    SENSITIVITIES,
    eq6_select,
    greedy_select,
    measure_sensitivity,
    uniform_select,
)
from compconv.compress.warmstart import LayerFit, fit_layer
from compconv.convert import convert
from compconv.layers.base import get_method
from compconv.profile import profile

__all__ = ["BUDGET_TYPES", "CompressionReport", "LayerRecord", "compress", "reestimate_bn"]

BUDGET_TYPES = ("macs", "params")
ASSIGNMENT_MODES = ("auto", "plain", "matched")


def _check(model: Any, method: str, budget: Any, budget_type: str, rule: str, assignment: str,
           sensitivity: str, tolerance: float) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}")
    get_method(method)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of the model's cost in (0, 1], e.g. 0.5, but got {budget!r}")
    if budget_type not in BUDGET_TYPES:
        raise ValueError(f"budget_type must be one of {BUDGET_TYPES} (measured latency is not supported yet), "
                         f"but got {budget_type!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, but got {rule!r}")
    if rule == "eq6" and method != "compconv":
        raise ValueError(f"rule='eq6' (CompConv's Eq. 6) needs method='compconv', but got method={method!r}")
    if assignment not in ASSIGNMENT_MODES:
        raise ValueError(f"assignment must be one of {ASSIGNMENT_MODES}, but got {assignment!r}")
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, but got {sensitivity!r}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), but got {tolerance!r}")


def _fit_one(comp: nn.Module, ref: nn.Module, name: str, fit: list[Tensor], held: list[Tensor], *,
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


def conv_output_hw(conv: nn.Conv2d, hw: tuple[int, ...]) -> tuple[int, int]:
    """``(H_out, W_out)`` of ``conv`` for an ``hw`` input (``"same"``/``"valid"`` or numeric padding)."""
    out = []
    for i, size in enumerate(hw):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        if conv.padding == "same":
            out.append(size)
            continue
        p = 0 if conv.padding == "valid" else conv.padding[i]  # type: ignore[index]
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def _agreement(ref: nn.Module, comp: nn.Module, held: list[Tensor]) -> tuple[float | None, float | None]:
    """Top-1 agreement and mean KL(ref || comp) on held-out batches, for models with (N, classes) outputs."""
    agree = kl = 0.0
    n = 0
    with torch.no_grad():
        for x in held:
            a, b = ref(x), comp(x)
            if not isinstance(a, Tensor) or a.dim() != 2:
                return None, None
            lp, lq = F.log_softmax(a.double(), 1), F.log_softmax(b.double(), 1)
            agree += float((a.argmax(1) == b.argmax(1)).sum())
            kl += float((lp.exp() * (lp - lq)).sum())
            n += x.shape[0]
    return agree / n, kl / n


def compress(
    model: nn.Module,
    method: str,
    budget: float,
    calib: Iterable[Any] | Tensor,
    *,
    budget_type: str = "macs",
    input_size: tuple[int, ...] | None = None,
    rule: str = "search",
    warm_start: bool = True,
    assignment: str = "auto",
    sensitivity: str = "reconstruction",
    reestimate_bn_stats: bool | None = None,
    seed: int = 0,
    tolerance: float = 0.0,
    keep_stem: bool = True,
    exclude: str | Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
    ladder: list[dict[str, Any]] | None = None,
    method_options: dict[str, Any] | None = None,
    held_out: float = 0.25,
    ridge: float = 1e-4,
    adam_steps: int = 300,
    inplace: bool = False,
    verbose: bool = False,
) -> tuple[nn.Module, CompressionReport]:
    """Compress ``model`` with ``method`` to ``budget`` of its MACs (or params), warm-started from its weights.

    Args:
        model: any trained ``nn.Module`` (not modified unless ``inplace=True``).
        method: a registered method (``compconv.list_methods()``).
        budget: the target share of the whole model's cost, in ``(0, 1]``; the result's cost is at most
            ``budget * (1 + tolerance)`` of the original's, or ``ValueError`` says the smallest reachable share.
        calib: calibration inputs: a tensor, an iterable of tensors or ``(input, label)`` pairs, or a
            ``DataLoader`` (labels ignored; a few hundred images). The last ``held_out`` share is held out
            to measure the fits.
        budget_type: ``"macs"`` (multiply-accumulates of conv and linear layers per image at
            ``input_size``) or ``"params"``.
        input_size: ``(1, C, H, W)`` at which MACs are counted (default: one image of the first batch).
        rule: ``"search"`` (per-layer options from measured sensitivity), ``"eq6"`` (CompConv's Eq. 6 with
            the largest ``c0`` within budget) or ``"uniform"`` (one option for every layer).
        warm_start: least-squares initialisation of every compact layer (False: random init, for comparison).
        assignment: CompConv's output channel assignment: ``"plain"``, ``"matched"`` where the permutation
            can be absorbed, or ``"auto"`` (both tried there; the lower held-out error kept).
        sensitivity: ``"reconstruction"`` or ``"kl"`` (see :mod:`compconv.compress.search`).
        reestimate_bn_stats: re-estimate every BN's statistics on the calibration batches at the end;
            ``None`` (default): only without a warm start. Measured on the trained CIFAR ResNet-20
            (docs/compress.md), re-estimating after the warm start lowered top-1 (least-squares outputs are
            shrunk towards the mean; new statistics scale them back up, noise included).
        seed: seeds module init, fits and sampling (the same seed gives the same choices and weights).
        keep_stem, exclude: layers never changed (the first conv; fnmatch patterns or a callable).
        ladder: options to offer every layer instead of the built-in ladder (needed for user methods).
        method_options: options added to every candidate (e.g. CompConv's ``width_multiple``).
        ridge, adam_steps: the warm start's ridge (relative) and the Adam fallback's steps.
        inplace: compress ``model`` itself.

    Returns:
        ``(compressed model, CompressionReport)``; the model is in the mode ``model`` was in.

    Raises:
        TypeError / ValueError: bad arguments (naming the argument and the allowed values), an unreachable
        budget, empty calibration data.
    """
    _check(model, method, budget, budget_type, rule, assignment, sensitivity, tolerance)
    p = next(model.parameters(), None)
    batches = as_batches(calib, device=p.device if p is not None else None,
                         dtype=p.dtype if p is not None and p.is_floating_point() else None)
    fit, held = split_batches(batches, held_out)
    size = tuple(input_size) if input_size is not None else (1, *batches[0].shape[1:])
    was_training = model.training
    ref = copy.deepcopy(model).eval()
    comp = model if inplace else copy.deepcopy(model)
    comp.eval()
    notes: list[str] = []

    layers = layer_candidates(ref, method, find_layers(ref, size, keep_stem=keep_stem, exclude=exclude),
                              ladder=ladder, method_options=method_options)
    prof = profile(ref, size)
    total = prof.total_macs if budget_type == "macs" else prof.total_params
    target = budget * (1 + tolerance) * total
    sens: dict[str, list[float]] | None = None
    detail = ""
    if rule == "search":
        sens = measure_sensitivity(ref, method, layers, fit, held, kind=sensitivity, ridge=ridge,
                                   adam_steps=adam_steps, seed=seed)
        choice = greedy_select(layers, sens, total, target, budget_type)
        detail = f"sensitivity={sensitivity}"
    elif rule == "eq6":
        choice, c0 = eq6_select(ref, layers, total, target, budget_type)
        detail = f"c0={c0}"
    else:
        choice, label = uniform_select(layers, total, target, budget_type)
        detail = label

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
                                       sensitivity=sens[lc.name][i] if sens is not None else None)
    perms: dict[str, Any] = {}
    if warm_start and method == "compconv" and assignment != "plain" and chosen:
        perms, why = permutable_outputs(ref)
        if why:
            notes.append(why)
    fit_opts = {"ridge": ridge, "adam_steps": adam_steps, "seed": seed}
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
            from compconv.compress.lstsq import relative_error

            with torch.no_grad():
                rec.err_init = relative_error([module(x) for x in hx], hy)
            continue
        res, errs = _fit_one(comp, ref, name, fit, held, try_matched=name in perms,
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
    if reestimate_bn_stats is None:
        reestimate_bn_stats = not warm_start
    n_bn = reestimate_bn(comp, batches) if reestimate_bn_stats else 0
    comp.eval()
    agreement, kl = _agreement(ref, comp, held)
    after = profile(comp, size)
    report = CompressionReport(
        method=method, rule=rule, budget=float(budget), budget_type=budget_type, input_size=size, seed=seed,
        layers=list(records.values()), macs_before=prof.total_macs, macs_after=after.total_macs,
        params_before=prof.total_params, params_after=after.total_params, rule_detail=detail,
        warm_start=warm_start, bn_reestimated=n_bn, calib_images=sum(x.shape[0] for x in batches),
        held_out_images=sum(x.shape[0] for x in held), agreement=agreement, kl=kl, notes=notes,
        conversion=conv_report)
    comp.train(was_training)
    if verbose:
        print(report)
    return comp, report
