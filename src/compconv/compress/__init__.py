"""Compress a trained model to a budget: choose each layer's option, warm-start it, re-estimate BN.

    model, report = compconv.compress(trained, "compconv", 0.5, calib_loader, input_size=(1, 3, 32, 32))
    print(report)                      # per layer: choice, MACs/params before -> after, sensitivity, errors
    # or half of the latency measured on this machine at batch 8 (timed with compconv.hardware_aware):
    model, report = compconv.compress(trained, "compconv", 0.5, calib_loader, budget_type="latency",
                                      input_size=(8, 3, 32, 32))

The steps (each in its own module of this package):

1. ``candidates``: every convertible conv's option ladder and each option's exact params and MACs (and,
   for a latency budget, its measured latency);
2. ``search``: the per-layer sensitivity on calibration batches and the choice that meets the budget
   (or Eq. 6's rule, or one option everywhere); the search's result is checked against Eq. 6's (or the
   uniform rule's) on held-out batches and the closer one kept (``realise.output_distance``);
3. ``realise``: ``convert`` (the library's converter) with the choices as per-layer overrides, then
   ``warmstart``: each compact layer, in network order, fitted by least squares so that it reproduces the
   trained conv's output on the *compressed* upstream (``assign`` and ``permute``: CompConv's channel
   assignment, where the graph lets the permutation be absorbed);
4. ``bn``: batch-norm statistics re-estimated on the calibration batches.

Distillation (training the result against the original) is the trainer's job, not this function's.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from compconv import hardware_aware
from compconv.compress.bn import reestimate_bn, reparametrize_bn
from compconv.compress.calib import as_batches, first_non_finite, split_batches
from compconv.compress.candidates import LayerCandidates, call_shapes, find_layers, layer_candidates
from compconv.compress.latency import LATENCY_FORMS, time_in_form, time_side_by_side
from compconv.compress.realise import conv_output_hw, output_distance, realise
from compconv.compress.report import CompressionReport, LayerRecord
from compconv.compress.search import (
    EQ6_C0,
    RULES,
    SENSITIVITIES,
    chosen_cost,
    eq6_select,
    greedy_select,
    measure_sensitivity,
    uniform_select,
)
from compconv.layers.base import get_method, list_methods
from compconv.profile import profile

__all__ = ["BUDGET_TYPES", "LATENCY_FORMS", "CompressionReport", "LayerRecord", "compress", "conv_output_hw",
           "reestimate_bn", "reparametrize_bn"]

BUDGET_TYPES = ("macs", "params", "latency")
ASSIGNMENT_MODES = ("auto", "plain", "matched")


def _check_options(method: str, ladder: Any, method_options: Any) -> None:
    """A misspelt option in ``ladder`` or ``method_options`` is an error naming it (as in ``convert``), not a
    candidate that silently never builds."""
    cls = get_method(method)
    base = dict(method_options or {})
    try:
        cls.validate_options(base)
    except ValueError as e:
        raise ValueError(f"method_options: {e}") from None
    if ladder is None:
        return
    if not isinstance(ladder, list) or not ladder or not all(isinstance(o, dict) for o in ladder):
        raise ValueError(f"ladder must be a non-empty list of option dicts, e.g. [{{'depth': 1}}, {{'depth': 2}}], "
                         f"but got {ladder!r}")
    for i, opts in enumerate(ladder):
        try:
            cls.validate_options({**base, **opts})
        except ValueError as e:
            raise ValueError(f"ladder[{i}] {opts!r}: {e}") from None


def _excluded_convs(model: nn.Module, exclude: Any) -> set[str]:
    """The names of the convs ``exclude`` keeps, read as ``convert`` reads it (fnmatch patterns, module objects,
    module types, callables ``(name, module) -> bool``, or a list of them).

    A selector that picks no conv is an error: a typo would otherwise compress the layer the user meant to
    protect.
    """
    from compconv.convert import _as_list, selector_matches

    sels = _as_list("exclude", exclude)
    if not sels:
        return set()
    names_of: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(n)
    convs = [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Conv2d)]
    hits = {id(s): {n for n, m in convs if selector_matches(s, [n], m, names_of, "exclude")} for s in sels}
    unused = [s for s in sels if not hits[id(s)]]
    if unused:
        first = unused[0]
        close = difflib.get_close_matches(first, [n for n, _ in convs], n=3) if isinstance(first, str) else []
        hint = f"; close matches: {close}" if close else ""
        if isinstance(first, str) and any(n.startswith(first + ".") for n, _ in convs):  # a container's name
            hint = f"; to keep the convs inside {first!r}, use {first + '.*'!r}"
        raise ValueError(f"exclude selector(s) matched no conv layer: {unused!r}{hint}")
    return set().union(*hits.values())


def _check(model: Any, method: str, budget: Any, budget_type: str, rule: str, assignment: str,
           sensitivity: str, tolerance: float, input_size: Any, timer: Any, latency_form: Any = None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}")
    from compconv.binary.transform import binary_layers

    binary = binary_layers(model)
    if binary:  # its binary convs cost 0 real MACs and hold latent weights the fits cannot reproduce
        raise ValueError(f"model is binarized ({len(binary)} BinaryConv2d, e.g. {binary[0]!r}): compress the "
                         "full-precision model first, then binarize (compconv.binarize(compress(model, ...)))")
    get_method(method)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of the model's cost in (0, 1], e.g. 0.5, but got {budget!r}")
    if budget_type not in BUDGET_TYPES:
        raise ValueError(f"budget_type must be one of {BUDGET_TYPES}, but got {budget_type!r}")
    if budget_type == "latency" and input_size is None:
        raise ValueError("budget_type='latency' times the model at input_size (N, C, H, W), whose batch N is the "
                         "deployment batch, but input_size is missing: pass e.g. input_size=(1, 3, 224, 224)")
    if timer is not None and (not callable(timer) or budget_type != "latency"):
        raise ValueError(f"timer must be a callable timer(name, module, x) -> seconds, used with "
                         f"budget_type='latency', but got timer={timer!r} with budget_type={budget_type!r}")
    if latency_form is not None and budget_type != "latency":
        raise ValueError(f"latency_form chooses how a latency budget times the model; it is used with "
                         f"budget_type='latency', but got latency_form={latency_form!r} with "
                         f"budget_type={budget_type!r}")
    if latency_form is not None and latency_form not in LATENCY_FORMS:
        raise ValueError(f"latency_form must be one of {LATENCY_FORMS}, but got {latency_form!r}")
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


def _reference_choice(ref: nn.Module, method: str, layers: list[LayerCandidates], total: float, target: float,
                      budget_type: str) -> tuple[list[int], str] | None:
    """The fixed rule the search is checked against: Eq. 6 (CompConv), else uniform; ``None`` if neither fits."""
    if method == "compconv":
        try:
            choice, c0 = eq6_select(ref, layers, total, target, budget_type)
            return choice, f"eq6 (c0={c0})"
        except ValueError:
            pass
    try:
        choice, label = uniform_select(layers, total, target, budget_type)
        return choice, f"uniform ({label})"
    except ValueError:
        return None


def _check_calib_fits(model: nn.Module, batches: list[Tensor], p: Tensor | None) -> None:
    """Refuse calibration data the model cannot take, naming the batch (not a conv error deep in the search)."""
    if p is not None and p.is_floating_point():
        bad = next((i for i, x in enumerate(batches) if not x.is_floating_point()), None)
        if bad is not None:
            raise TypeError(f"calib batch {bad} has dtype {batches[bad].dtype}; compress needs the model's inputs "
                            f"({p.dtype}), normalised as in training (e.g. images.float() / 255, then Normalize)")
    bad = next((i for i, x in enumerate(batches) if x.dim() != 4), None)
    if bad is not None:  # a (C, H, W) image would be read as C one-channel images: say so, not a conv error
        raise ValueError(f"calib batch {bad} has shape {tuple(batches[bad].shape)}; calib must hold image batches "
                         "(N, C, H, W)" + (" (one unbatched image? add the batch dimension: x.unsqueeze(0))"
                                           if batches[bad].dim() == 3 else ""))
    shapes = {tuple(x.shape[1:]) for x in batches}
    if len({s[0] for s in shapes if s}) > 1:
        raise ValueError(f"calib batches have different channel counts: {sorted(shapes)}")
    _check_forward(model, batches[0][:1], f"calib batch 0 of shape {tuple(batches[0].shape)}")


def _check_forward(model: nn.Module, x: Tensor, what: str) -> None:
    """One eval-mode forward of ``x``; a failure is a ``ValueError`` saying ``what`` does not fit the model."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{what} does not fit the model: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        model.train(was_training)


def _check_input_size(model: nn.Module, input_size: Any, batches: list[Tensor]) -> None:
    """Refuse an ``input_size`` that is not ``(N, C, H, W)`` or that the model cannot take, naming it."""
    size = tuple(input_size)
    if len(size) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"input_size must be (N, C, H, W) of positive ints, got {input_size!r}")
    if size[1] != batches[0].shape[1]:
        raise ValueError(f"input_size={size} has {size[1]} channels but the calib batches have "
                         f"{batches[0].shape[1]}: input_size is the shape of the model's input, e.g. "
                         f"{(size[0], *batches[0].shape[1:])}")
    p = next(model.parameters(), None)
    x = torch.zeros((1, *size[1:]), device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None and p.is_floating_point() else None)
    _check_forward(model, x, f"input_size={size}")


def _no_layers_error(model: nn.Module, method: str, found: dict[str, tuple[int, ...]], keep_stem: bool,
                     exclude: Any) -> ValueError:
    """Why nothing can be compressed: every conv kept (stem, ``exclude``) or none eligible for ``method``."""
    if not found:
        return ValueError(f"no conv is left to compress: every nn.Conv2d the forward reaches is the stem "
                          f"(keep_stem={keep_stem}) or matches exclude={exclude!r}; allow more layers")
    cls = get_method(method)
    name = next(iter(found))
    conv = model.get_submodule(name)
    why = cls.ineligible_reason(conv) or "none of its options changes this conv"
    return ValueError(f"no conv of this model can take method {method!r}: none of the {len(found)} convs "
                      f"compress may change has an option for it (e.g. {name!r}: {why}); choose another method "
                      f"({', '.join(m for m in list_methods() if m != method)})")


def _undershoot_note(achieved: float, budget: float, budget_type: str, rule: str, detail: str,
                     mildest: bool = False) -> list[str]:
    """A note when the result spends much less than the budget allows (coarse options, a kept reference rule).

    ``mildest``: the rule's least compressing setting was chosen (Eq. 6's largest C0, uniform's first option),
    so no setting of that rule spends more.
    """
    if achieved >= 0.95 * budget:
        return []
    if "; kept " in detail:
        why = "the reference rule's result was kept for its lower held-out error (rule line) and spends less"
    elif rule == "search":
        why = ("no layer can move to a less damaging option within the budget: the method's options are coarse "
               "here (e.g. Ghost's whole-number ratio)")
    elif rule == "eq6":
        why = (f"Eq. 6's largest C0 ({EQ6_C0[0]}) already compresses this far (it changes every layer it can)"
               if mildest else "Eq. 6's C0 steps are coarse; the next larger C0 exceeds the budget")
    elif mildest:
        why = "the mildest option on every layer lands there (the uniform rule changes every layer)"
    else:
        why = "the one option for every layer that fits lands there; the next milder one exceeds the budget"
    return [f"lands at {achieved:.3f} of the model's {budget_type}, {100 * (1 - achieved / budget):.0f}% under "
            f"the budget {budget:g}: {why}"]


def _latency_notes(layers: list[LayerCandidates], total: float) -> list[str]:
    """A warning when the layers' dense timings add up to more than the whole model's (the estimate is then off)."""
    dense = sum(lc.keep.latency or 0.0 for lc in layers)
    if not math.isfinite(dense) or dense <= total:
        return []
    return [f"the timed layers' dense latencies add up to {1e3 * dense:.3g} ms, more than the whole model's "
            f"{1e3 * total:.3g} ms: the timings are noisy (time on a quiet machine); the estimate may be off"]


def _slower_notes(layers: list[LayerCandidates], choice: list[int]) -> list[str]:
    """One note per kept layer none of whose candidates was timed faster than its dense conv."""
    out = []
    for lc, i in zip(layers, choice, strict=True):
        dense = lc.keep.latency
        fastest = min((c.latency for c in lc.candidates[1:] if c.latency is not None), default=None)
        if i == 0 and dense is not None and fastest is not None and fastest >= dense:
            out.append(f"{lc.name} kept (latency): no candidate is faster here: fastest {1e3 * fastest:.3g} ms "
                       f">= dense {1e3 * dense:.3g} ms")
    return out


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
    fallback: bool = True,
    reestimate_bn_stats: bool | None = None,
    reparametrize_bn_stats: bool = False,
    seed: int = 0,
    tolerance: float = 0.0,
    keep_stem: bool = True,
    exclude: Any = None,
    ladder: list[dict[str, Any]] | None = None,
    method_options: dict[str, Any] | None = None,
    held_out: float = 0.25,
    ridge: float = 1e-4,
    adam_steps: int = 300,
    inplace: bool = False,
    verbose: bool = False,
    timer: hardware_aware.LayerTimer | None = None,
    latency_form: str | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """Compress ``model`` with ``method`` to ``budget`` of its MACs (or params, or measured latency),
    warm-started from its weights.

    Args:
        model: any trained ``nn.Module`` (not modified unless ``inplace=True``).
        method: a registered method (``compconv.list_methods()``).
        budget: the target share of the whole model's cost, in ``(0, 1]``; the result's cost is at most
            ``budget * (1 + tolerance)`` of the original's, or ``ValueError`` says the smallest reachable share.
        calib: calibration inputs: a tensor, an iterable of tensors or ``(input, label)`` pairs, or a
            ``DataLoader`` (labels ignored; a few hundred images). A seeded random ``held_out`` share of
            the images is held out to measure the fits (random, so a class-ordered loader still fits on
            every class).
        budget_type: ``"macs"`` (multiply-accumulates of conv and linear layers per image at
            ``input_size``), ``"params"``, or ``"latency"``: seconds per forward of the whole model at
            ``input_size``, measured on this machine (current device, dtype and ``torch.get_num_threads()``)
            with ``timer``. Each candidate (keep: the dense conv) is built as ``convert`` would build it and
            timed in eval mode under ``torch.no_grad`` on random inputs of the layer's input shape(s) at
            batch ``N`` (every call of the layer in one forward summed); the whole model is timed the same
            way on a random input of ``input_size``. The budget is met on the estimate ``model latency -
            sum(dense latency - chosen latency)`` over the layers (the rest of the model assumed unchanged);
            the compressed model is then timed too and the report gives both shares
            (``latency_share_estimated``, ``latency_share_measured``). Timings are machine-specific and
            noisy: run on a quiet machine. A layer none of whose candidates is faster than its dense conv
            is kept by the search.
        input_size: ``(N, C, H, W)`` at which MACs are counted (default: one image of the first batch).
            Required for ``budget_type="latency"``, where ``N`` is the deployment batch the model is timed at.
        rule: ``"search"`` (per-layer options from measured sensitivity), ``"eq6"`` (CompConv's Eq. 6 with
            the largest ``c0`` within budget) or ``"uniform"`` (one option for every layer).
        warm_start: least-squares initialisation of every compact layer (False: random init, for comparison).
        assignment: CompConv's output channel assignment: ``"plain"``, ``"matched"`` where the permutation
            can be absorbed, or ``"auto"`` (both tried there; the lower held-out error kept).
        sensitivity: ``"reconstruction"`` or ``"kl"`` (see :mod:`compconv.compress.search`).
        fallback: with ``rule="search"``, also build Eq. 6's assignment (CompConv; else the uniform rule's)
            and keep whichever result is closer to the original on the held-out batches (KL of the logits,
            or relative output error); per-layer sensitivities ignore how errors compound through the
            network, and on the trained CIFAR ResNet-20 the search alone lost to Eq. 6 (docs/compress.md).
        reestimate_bn_stats: re-estimate every BN's statistics on the calibration batches at the end;
            ``None`` (default): only without a warm start. Measured on the trained CIFAR ResNet-20
            (docs/compress.md), re-estimating after the warm start lowered top-1 (least-squares outputs are
            shrunk towards the mean; new statistics scale them back up, noise included).
        reparametrize_bn_stats: give every BN the statistics of its input in the compressed network and move
            the change into its gamma / beta (:func:`reparametrize_bn`): the eval-mode outputs stay the same,
            and training mode (batch statistics) then computes nearly what eval mode does. Measured on the
            CIFAR ResNet-20 at 0.5x (docs/compress.md): CompConv's train-mode top-1 12.0% -> 49.9% (eval
            50.2%); but a 16-step fine-tune still lost the warm start (22% with it, 18% without; frozen BN at
            lr 5e-4: 43% with it, 52% without). Default False. Not with ``reestimate_bn_stats=True``.
        seed: seeds module init, fits and sampling (the same seed gives the same choices and weights).
        keep_stem, exclude: layers never changed (the first conv; as ``convert``'s ``exclude``: fnmatch
            patterns of names, module objects, module types, callables ``(name, module) -> bool``, or a
            list of them). A selector that matches no conv is a ``ValueError``.
        ladder: options to offer every layer instead of the built-in ladder (needed for user methods).
        method_options: options added to every candidate (e.g. CompConv's ``width_multiple``).
        ridge, adam_steps: the warm start's ridge (relative) and the Adam fallback's steps.
        inplace: compress ``model`` itself.
        verbose: print the report.
        timer: ``timer(name, module, x) -> seconds per call`` for ``budget_type="latency"`` (default
            :func:`compconv.hardware_aware.benchmark_timer`: ``torch.utils.benchmark`` median); ``name`` is the
            layer's dotted name, ``""`` for the whole model (the original and the compressed one).
        latency_form: for ``budget_type="latency"``, the form every module is timed in: ``"deployed"``
            (default: each module as ``compconv.deploy`` leaves it, as the model will run; a whole model
            holding HetConv layers also as ``deploy(model, collapse_hetconv=True)``, the faster counting: the
            compressed model's is ``report.latency_form_after``) or ``"converted"`` (as ``convert`` builds it and the
            original as given). See :mod:`compconv.compress.latency`.

    Returns:
        ``(compressed model, CompressionReport)``; the model is in the mode ``model`` was in.

    Raises:
        TypeError / ValueError: bad arguments (naming the argument and the allowed values: ``budget_type``
        not in ``BUDGET_TYPES``, ``input_size`` missing for a latency budget, a ``timer`` or ``latency_form``
        without one, ``latency_form`` not in ``LATENCY_FORMS``), an
        unreachable budget, empty calibration data, a timer returning a non-finite or negative value (naming
        the layer, or "the whole model"); a binarized model (``compconv.binarize``: compress the
        full-precision model first, then binarize).
    """
    _check(model, method, budget, budget_type, rule, assignment, sensitivity, tolerance, input_size, timer,
           latency_form)
    if not isinstance(reparametrize_bn_stats, bool):
        raise ValueError(f"reparametrize_bn_stats must be True or False, but got {reparametrize_bn_stats!r}")
    if reparametrize_bn_stats and not warm_start:  # before the search: a conflict costs nothing to find
        raise ValueError("reparametrize_bn_stats=True keeps a warm start's outputs; without a warm start BN is "
                         "re-estimated (reestimate_bn_stats), which already gives every BN its own statistics")
    if reparametrize_bn_stats and reestimate_bn_stats:
        raise ValueError("reparametrize_bn_stats=True keeps the outputs and reestimate_bn_stats=True changes them: "
                         "choose one")
    form = latency_form or "deployed"
    user_rng = torch.get_rng_state()  # the seeded steps below must not change the caller's random stream
    p = next(model.parameters(), None)
    batches = as_batches(calib, device=p.device if p is not None else None,
                         dtype=p.dtype if p is not None and p.is_floating_point() else None)
    _check_options(method, ladder, method_options)
    excluded = _excluded_convs(model, exclude)
    bad = first_non_finite(batches)
    if bad is not None:  # least squares on NaN/inf gives a NaN model whose report still looks fine
        raise ValueError(f"calib batch {bad} holds non-finite values (NaN or inf): check the data and its "
                         "normalisation")
    _check_calib_fits(model, batches, p)
    if input_size is not None:
        _check_input_size(model, input_size, batches)
    fit, held = split_batches(batches, held_out, seed)
    size = tuple(input_size) if input_size is not None else (1, *batches[0].shape[1:])
    one = (1, *size[1:])  # MACs and params are per image: input_size's batch is for the latency budget only
    was_training = model.training
    ref = copy.deepcopy(model).eval()
    comp = model if inplace else copy.deepcopy(model)
    comp.eval()
    notes: list[str] = []

    timed = budget_type == "latency"
    timer = timer or (hardware_aware.benchmark_timer if timed else None)  # looked up now: tests may patch it
    found = find_layers(ref, one, keep_stem=keep_stem, exclude=lambda n, _m: n in excluded)
    layers = layer_candidates(ref, method, found, ladder=ladder, method_options=method_options,
                              latency_shapes=call_shapes(ref, size, found) if timed else None, timer=timer,
                              latency_form=form,
                              mac_shapes=call_shapes(ref, one, found))
    if not layers:
        raise _no_layers_error(ref, method, found, keep_stem, exclude)
    prof = profile(ref, one)
    total: float = prof.total_macs if budget_type == "macs" else prof.total_params
    if timed:
        total, _ = time_in_form("", ref, [size], timer, form)
        if total <= 0:
            raise ValueError(f"timer returned {total!r} seconds for the whole model at input_size={size}: "
                             "a latency budget needs a positive model latency")
        notes += _latency_notes(layers, total)
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

    if timed and (estimate := chosen_cost(layers, choice, total, budget_type)) <= 0:
        # the layers' savings exceed the whole model's time: the timer disagrees with itself
        raise ValueError(f"the latency estimate for the chosen layers is {1e3 * estimate:.3g} ms (the whole model "
                         f"measured {1e3 * total:.3g} ms): the per-layer and whole-model timings are inconsistent; "
                         "time on a quiet machine, or pass a timer that measures layers and models alike")
    if reestimate_bn_stats is None:
        reestimate_bn_stats = not warm_start
    build = {"size": size, "seed": seed, "warm_start": warm_start, "assignment": assignment, "sens": sens,
             "reestimate_bn_stats": reestimate_bn_stats, "reparametrize_bn_stats": reparametrize_bn_stats,
             "fit_opts": {"ridge": ridge, "adam_steps": adam_steps, "seed": seed}}
    res = realise(ref, comp, method, layers, choice, fit, held, batches, **build)
    agreement, kl, dist = output_distance(ref, res.model, held)
    alt = _reference_choice(ref, method, layers, total, target, budget_type) if rule == "search" and fallback \
        else None
    if alt is not None and alt[0] != choice and dist is not None:
        other = realise(ref, copy.deepcopy(ref), method, layers, alt[0], fit, held, batches, **build)
        a2, kl2, dist2 = output_distance(ref, other.model, held)
        what = "KL" if kl is not None else "relative output error"
        if dist2 is not None and dist2 < dist:
            detail += f"; kept {alt[1]}: held-out {what} {dist2:.4g} < search's {dist:.4g}"
            if inplace:  # the caller's object must carry the result: move the winner's state into it
                for attr in ("_parameters", "_buffers", "_modules"):
                    getattr(res.model, attr).clear()
                    getattr(res.model, attr).update(getattr(other.model, attr))
                other.model = res.model
            res, agreement, kl, choice = other, a2, kl2, alt[0]
        else:
            shown = "-" if dist2 is None else format(dist2, ".4g")
            detail += f"; search kept over {alt[1]}: held-out {what} {dist:.4g} <= {shown}"
    comp = res.model
    notes += res.notes
    records = res.records
    conv_report, n_bn, n_rep = res.conversion, res.bn_reestimated, res.bn_reparametrized
    after = profile(comp, one)
    if budget_type != "latency":
        done = after.total_macs / prof.total_macs if budget_type == "macs" else after.total_params / prof.total_params
        first = next((c.label for lc in layers for c in lc.candidates[1:]), None)  # uniform's mildest option
        mildest = detail == f"c0={EQ6_C0[0]}" if rule == "eq6" else rule == "uniform" and detail == first
        notes += _undershoot_note(done, budget, budget_type, rule, detail, mildest)
    lat: dict[str, Any] = {"latency_before": None, "latency_estimate": None, "latency_after": None}
    if timed:
        # the measured share: both models timed in alternation, so drift of the machine's speed since the
        # original was first timed (the search and the warm start ran in between) cancels out
        side = time_side_by_side({"before": ref, "after": comp}, size, timer, form)
        lat = {"latency_before": total, "latency_estimate": chosen_cost(layers, choice, total, budget_type),
               "latency_after": side["after"][0], "latency_before_measured": side["before"][0],
               "latency_form": form, "latency_form_before": side["before"][1],
               "latency_form_after": side["after"][1]}
        notes += _slower_notes(layers, choice)
    report = CompressionReport(
        method=method, rule=rule, budget=float(budget), budget_type=budget_type, input_size=size, seed=seed,
        layers=records, macs_before=prof.total_macs, macs_after=after.total_macs,
        params_before=prof.total_params, params_after=after.total_params, rule_detail=detail,
        warm_start=warm_start, bn_reestimated=n_bn, bn_reparametrized=n_rep,
        calib_images=sum(x.shape[0] for x in batches),
        held_out_images=sum(x.shape[0] for x in held), agreement=agreement, kl=kl, notes=notes,
        conversion=conv_report, **lat)
    comp.train(was_training)
    if verbose:
        print(report)
    torch.set_rng_state(user_rng)
    return comp, report
