"""Inference-time rewrites: ``deploy(model)`` returns an eval-only copy computing the same function faster.

``deploy`` traces the model once (``torch.fx``, CompConvs as leaves) and runs small passes in order, each
stating and checking what it assumes (:mod:`compconv.deploy.graph` holds the facts they ask):

0. ``collapse_hetconv`` (optional, :mod:`~compconv.deploy.hetconv`): HetConv layers become the dense conv
   they equal (``True``) or, per layer, whichever of the two is timed faster (``"auto"``); first, so a BN
   after a collapsed layer folds into it in the next pass.
1. ``fold_bn`` (:mod:`~compconv.deploy.bn`): each BatchNorm2d folded into the conv whose output only it
   reads (a fresh plain conv with a bias; the BN becomes ``nn.Identity``; timm's ``BatchNormAct2d`` keeps
   its activation). Peers (other compact convs) are traced through, so conv -> BN pairs inside them are
   folded too; a BN after a peer module stays (eval BN).
2. ``compconv`` (:mod:`~compconv.deploy.compconv`): every CompConv2d becomes a DeployedCompConv2d, which
   writes each output part once into its final (shuffled) channel slots, with its BN folded into that
   write.
3. ``collapse_1x1`` (optional): 1x1 CompConvs become the dense 1x1 conv they equal, or the two GEMMs
   of their low-rank map (:mod:`~compconv.deploy.lowrank`), or (``"auto"``) whichever of their exact
   forms is timed fastest on the example input (:mod:`~compconv.deploy.forms`).
4. ``fold_shuffle`` (:mod:`~compconv.deploy.shuffle`): CompConv's channel shuffle folded into the tensors'
   neighbours (producers and readers of each channel group), so each part is written contiguously.

Last line of defence (:mod:`~compconv.deploy.check`): the original and the rewritten model run on one small
example input (eval mode); when they differ beyond float tolerance, the rewrite is redone with a check
after every pass and a ``RuntimeError`` names the pass (``check=False`` skips this).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from compconv.deploy.bn import BNPlan, fold_bn_into_conv, fold_plain_convs, plan_bn_folds
from compconv.deploy.check import Checker, CheckFailed, build_example, example_input_for, run_model
from compconv.deploy.compconv import (
    DeployedCompConv2d,
    collapse_all_pointwise,
    collapse_pointwise,
    deploy_compconvs,
)
from compconv.deploy.forms import POINTWISE_FORMS, Timer, tune_pointwise
from compconv.deploy.graph import GraphFacts
from compconv.deploy.hetconv import HETCONV_FORMS, collapse_all_hetconv, collapse_hetconv, tune_hetconv
from compconv.deploy.lowrank import LowRankPointwise
from compconv.deploy.shuffle import ShuffleResult, permute_input_channels, report_unvisited
from compconv.deploy.shuffle import fold_shuffles as _fold_shuffles
from compconv.layers.compconv import CompConv2d

__all__ = [
    "DeployReport",
    "DeployedCompConv2d",
    "HETCONV_FORMS",
    "LowRankPointwise",
    "POINTWISE_FORMS",
    "collapse_hetconv",
    "collapse_pointwise",
    "deploy",
    "example_input_for",
    "fold_bn_into_conv",
    "permute_input_channels",
    "tune_hetconv",
    "tune_pointwise",
]

@dataclass
class DeployReport:
    """What ``deploy`` did (``deploy(..., return_report=True)``). Names are dotted module names."""

    example_input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    folded_bn: list[tuple[str, str]] = field(default_factory=list)  # (conv, BN)
    kept_bn: dict[str, str] = field(default_factory=dict)  # BN -> why it stays a BN
    compconv: list[str] = field(default_factory=list)  # CompConv2d -> DeployedCompConv2d
    collapsed_1x1: list[str] = field(default_factory=list)  # 1x1 CompConvs now dense 1x1 convs
    lowrank_1x1: list[str] = field(default_factory=list)  # 1x1 CompConvs now LowRankPointwise
    pointwise_forms: list[dict[str, Any]] = field(default_factory=list)  # "auto": tune_pointwise's rows
    collapsed_hetconv: list[str] = field(default_factory=list)  # HetConv2d now the dense convs they equal
    hetconv_forms: list[dict[str, Any]] = field(default_factory=list)  # collapse_hetconv="auto": tune_hetconv's rows
    kept_hetconv: dict[str, str] = field(default_factory=dict)  # HetConv2d left as it is -> why (collapse asked)
    folded_shuffles: list[str] = field(default_factory=list)
    kept_shuffles: dict[str, str] = field(default_factory=dict)  # DeployedCompConv2d -> why it shuffles
    max_error: dict[str, float] = field(default_factory=dict)  # pass -> max |out - original| (example)
    trace_error: str | None = None  # why torch.fx could not trace the model (None: traced)

    def __str__(self) -> str:
        lines = [
            f"deploy: {len(self.folded_bn)} BN folded, {len(self.kept_bn)} kept; {len(self.compconv)} CompConv "
            f"deployed ({len(self.collapsed_1x1)} collapsed to 1x1 convs, {len(self.lowrank_1x1)} to two "
            f"GEMMs); {len(self.folded_shuffles)} "
            f"shuffles folded, {len(self.kept_shuffles)} kept"
        ]
        if self.collapsed_hetconv or self.hetconv_forms or self.kept_hetconv:
            lines.append(f"  {len(self.collapsed_hetconv)} HetConv collapsed to dense convs")
        lines += [f"  kept HetConv {n}: {why}" for n, why in self.kept_hetconv.items()]
        lines += [f"  kept BN {n}: {why}" for n, why in self.kept_bn.items()]
        lines += [f"  kept shuffle {n}: {why}" for n, why in self.kept_shuffles.items()]
        lines += [
            f"  1x1 {r['name']} {r['input_shape']}: kept {r['form']} ("
            + ", ".join(f"{f} {t:.3g} ms" for f, t in r["times_ms"].items()) + ")"
            for r in self.pointwise_forms
        ]
        lines += [
            f"  HetConv {r['name'] or '(the module)'} {r['input_shape']}: kept {r['form']} ("
            + ", ".join(f"{f} {t:.3g} ms" for f, t in r["times_ms"].items()) + ")"
            for r in self.hetconv_forms
        ]
        lines += [f"  check after {p}: max abs error {e:.3g}" for p, e in self.max_error.items()]
        return "\n".join(lines)


def deploy(
    model: nn.Module,
    *,
    fold_bn: bool = True,
    fold_shuffle: bool = True,
    collapse_1x1: bool | str = False,
    collapse_hetconv: bool | str = False,
    example_input: Tensor | tuple[Any, ...] | None = None,
    check: bool = True,
    inplace: bool = False,
    return_report: bool = False,
    timer: Timer | None = None,
) -> nn.Module | tuple[nn.Module, DeployReport]:
    """An eval-only copy of ``model`` with equal outputs (eval mode), rewritten for inference speed.

    Args:
        model: any ``nn.Module`` (converted by :func:`compconv.convert` or not).
        fold_bn: fold each BatchNorm2d into the conv (or CompConv2d) whose output it alone reads.
        fold_shuffle: fold CompConv's channel shuffle into the neighbouring convs where provably exact.
        collapse_1x1: ``True``: replace every 1x1 CompConv by the dense 1x1 conv it equals
            (:func:`collapse_pointwise`), executing the dense layer's MACs; ``"lowrank"``: by the two
            dense GEMMs of its low-rank map (:class:`LowRankPointwise`); ``"auto"``: per layer, whichever
            of its exact forms (split, dense, lowrank) is timed fastest on its input from
            ``example_input`` (:func:`tune_pointwise`; timings in the report); ``False``: none.
        collapse_hetconv: ``True``: replace every HetConv2d by the dense conv it equals
            (:func:`collapse_hetconv`; a BN after it then folds into it where BN folding is allowed),
            executing the dense layer's MACs; ``"auto"``: per layer, whichever of the two is timed faster on
            its input from ``example_input`` (:func:`tune_hetconv`; timings in the report); ``False``:
            HetConv layers run as they are. Layers with hooks or called with keyword arguments stay (a
            warning and ``report.kept_hetconv`` say why).
        example_input: a batch the model accepts (a Tensor, or a tuple of positional arguments). Used for
            the equality check, for tensor shapes (channel counts the shuffle pass verifies) and, with
            ``collapse_1x1="auto"`` / ``collapse_hetconv="auto"``, for timing (its batch, dtype, device and
            memory format). Default: built by :func:`example_input_for`, ``(2, C_in of the first conv, S, S)``
            with the smallest ``S`` in ``EXAMPLE_SIZES`` the model runs with.
        check: compare the rewritten model's output on the example input with the original's (on a
            difference, find the pass responsible); ``False`` skips this.
        inplace: rewrite ``model`` itself instead of a deep copy (checked after every pass; on a failed
            check it is left half-done).
        return_report: also return a :class:`DeployReport` (what was folded, what was kept and why).
        timer: with ``collapse_1x1="auto"`` / ``collapse_hetconv="auto"``, what times the forms (see
            :func:`tune_pointwise`; default: interleaved medians on this machine).

    Returns the rewritten model in eval mode with ``requires_grad=False`` everywhere (and the report). It
    keeps its class and ``forward`` (folded BNs become ``nn.Identity``). Models that ``torch.fx`` cannot
    trace get BN folding only for conv/BN pairs adjacent in an ``nn.Sequential`` whose calls the example
    run confirms, and no shuffle folding (a warning names the model). A warning also lists BNs that follow
    a conv but were kept (with the reason).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a bad ``collapse_1x1`` or ``collapse_hetconv``; ``"auto"`` without ``example_input``; no
            example input could be built (the message says how to pass one); a binarized model
            (``compconv.binarize``: named layers); an ``example_input`` the model cannot run (wrong shape: its
            shape and the expected one named); a ``timer`` that returns no finite seconds >= 0 for a form
            (the layer named).
        TypeError: also an ``example_input`` that is not a Tensor or tuple, or whose dtype is not the model's
            (when the model cannot run it); a ``timer`` that does not return ``{form: seconds}``.
        RuntimeError: a rewrite changed the output on the example input (names the rewrite).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}")
    from compconv.binary.transform import binary_layers

    binary = binary_layers(model)
    if binary:  # folding a BN before a sign() moves its threshold by rounding: refuse rather than approximate
        shown = binary[:5] + ([f"... ({len(binary)} in all)"] if len(binary) > 5 else [])
        raise ValueError(f"deploy does not rewrite binarized models: binary layers {shown} (BinaryConv2d). Their "
                         "speed needs bit-packed XNOR/popcount kernels, which compconv does not provide; run the "
                         "binarized model as it is (model.eval()) for its outputs")
    # identity for the bools: 1 == True and 1.0 == True, but the passes test `is True` (1 would do nothing)
    if not (collapse_1x1 is True or collapse_1x1 is False
            or (isinstance(collapse_1x1, str) and collapse_1x1 in ("lowrank", "auto"))):
        raise ValueError(f"collapse_1x1 must be one of True, False, 'lowrank', 'auto', but got {collapse_1x1!r}")
    if timer is not None and not callable(timer):
        raise TypeError(f"timer must be callable ({{form: fn}} -> {{form: seconds}}), but got {type(timer).__name__}")
    if example_input is not None and not isinstance(example_input, Tensor | tuple | list):
        raise TypeError(f"example_input must be a Tensor or a tuple of the model's positional arguments, but got "
                        f"{type(example_input).__name__}")
    if not (collapse_hetconv is True or collapse_hetconv is False
            or (isinstance(collapse_hetconv, str) and collapse_hetconv == "auto")):
        raise ValueError(f"collapse_hetconv must be one of True, False, 'auto', but got {collapse_hetconv!r}")
    for opt, val in (("collapse_1x1", collapse_1x1), ("collapse_hetconv", collapse_hetconv)):
        if val == "auto" and example_input is None:
            raise ValueError(f"{opt}='auto' needs example_input (a batch like the one the model will run)")
    args = (fold_bn, fold_shuffle, collapse_1x1, collapse_hetconv, example_input, check, return_report, timer)
    with torch.no_grad():
        try:
            return _deploy(model, *args, inplace=inplace, per_pass=inplace)
        except CheckFailed as failed:
            # Which pass? Redo the rewrite on a fresh copy of the original, checking after every pass.
            _deploy(model, *args, inplace=False, per_pass=True)
            raise RuntimeError(f"{failed}; no single rewrite reproduces it: please report it") from failed


def _deploy(
    model: nn.Module,
    fold_bn: bool,
    fold_shuffle: bool,
    collapse_1x1: bool | str,
    collapse_hetconv: bool | str,
    example_input: Any,
    check: bool,
    return_report: bool,
    timer: Timer | None,
    *,
    inplace: bool,
    per_pass: bool,
) -> nn.Module | tuple[nn.Module, DeployReport]:
    model = model if inplace else _deepcopy(model)
    model.eval()
    report = DeployReport()
    example: tuple[Any, ...] | None = None
    ref = None
    if example_input is not None:
        example = tuple(example_input) if isinstance(example_input, tuple | list) else (example_input,)
        out = _run_example(model, example)  # also without check: the passes trace and time on it
        ref = out if check else None
    else:
        try:  # also without check: the shuffle pass verifies channel counts on the example's shapes
            x, out = build_example(model)
            example, ref = (x,), (out if check else None)
        except ValueError:
            if check:
                raise
    report.example_input_shapes = [tuple(t.shape) for t in example or () if isinstance(t, Tensor)]
    checker = Checker(model, example, ref, per_pass)
    if collapse_hetconv is not False:
        model = _collapse_hetconv(model, collapse_hetconv, example, report, timer)
        checker.model = model
        checker.after("collapse_hetconv", "collapse_hetconv=False")
    out = _run_passes(model, fold_bn, fold_shuffle, collapse_1x1, example, example_input, checker, report, timer)
    checker.final()
    report.max_error = checker.errors
    out.requires_grad_(False)
    out.eval()  # a bare module's replacement is built fresh (in training mode, as every new nn.Module)
    if not getattr(out, "_compconv_eval_only", False):
        out._compconv_eval_only = True
        out.register_forward_pre_hook(_refuse_training)
    return (out, report) if return_report else out


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"shape {tuple(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}, device {t.device}"
    return type(t).__name__


def _run_example(model: nn.Module, example: tuple[Any, ...]) -> list[Any]:
    """``run_model(model, example)``; when the model cannot run it, an error naming ``example_input`` (its
    shape, dtype and device) and what the model expects, instead of the raw error from deep inside."""
    try:
        return run_model(model, example)
    except Exception as e:
        from compconv.deploy.check import _first_conv

        given = "; ".join(_describe(t) for t in example) or "no arguments"
        p = next(model.parameters(), None)
        conv = _first_conv(model)
        want_dtype = p.dtype if p is not None and p.is_floating_point() else None
        want = (f"a batch (N, {conv.in_channels}, H, W)" if conv is not None else "a batch the model accepts")
        if want_dtype is not None:
            want += f" of dtype {str(want_dtype).replace('torch.', '')} on {p.device}"  # type: ignore[union-attr]
        tensors = [t for t in example if isinstance(t, Tensor)]
        wrong_dtype = want_dtype is not None and any(t.dtype != want_dtype for t in tensors)
        raise (TypeError if wrong_dtype else ValueError)(
            f"example_input ({given}) does not run through {type(model).__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the model expects {want}") from e


def _refuse_training(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of a deployed model: its BNs are folded away, so training mode would compute garbage."""
    if module.training:
        raise RuntimeError(
            f"this {type(module).__name__} was returned by compconv.deploy and is eval-only (BatchNorms folded "
            "into the convs, weights frozen); call .eval() before running it, or train the model before deploy"
        )


def _deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies modules with the hook-based weight/spectral norm.

    Their computed weight is a non-leaf tensor after a forward with autograd on, which deepcopy refuses;
    the hook recomputes it before every forward, so the copy takes it detached.
    """
    from compconv.deploy.bn import norm_hooks

    saved = []
    for m in model.modules():
        for hook in norm_hooks(m):
            w = getattr(m, hook.name)  # type: ignore[attr-defined]
            if isinstance(w, Tensor) and not w.is_leaf:
                saved.append((m, hook.name, w))  # type: ignore[attr-defined]
                setattr(m, hook.name, w.detach())  # type: ignore[attr-defined]
    try:
        return copy.deepcopy(model)
    finally:
        for m, name, w in saved:
            setattr(m, name, w)


def _run_passes(
    model: nn.Module,
    fold_bn: bool,
    fold_shuffle: bool,
    collapse_1x1: bool | str,
    example: tuple[Any, ...] | None,
    example_input: Any,
    check: Checker,
    report: DeployReport,
    timer: Timer | None = None,
) -> nn.Module:
    if isinstance(model, CompConv2d):  # a bare module: nothing around it to fold
        holder = nn.Sequential(model)
        report.compconv = deploy_compconvs(holder, {})
        check.model = holder
        check.after("compconv", "check=False")
        if collapse_1x1 is not False:
            _collapse(holder, collapse_1x1, example_input, report, timer)
            check.after("collapse_1x1", "collapse_1x1=False")
        return holder[0]
    facts = GraphFacts.build(model, example)
    report.trace_error = facts.trace_error
    if facts.graph is None:
        warnings.warn(
            f"deploy: torch.fx could not trace {type(model).__name__} ({facts.trace_error}); folding only "
            "conv/BN pairs adjacent in nn.Sequential containers (confirmed on the example input), no "
            "shuffle folding",
            stacklevel=4,
        )
    # 1) BN into plain convs; the CompConv pairs are folded by the next pass.
    plan = plan_bn_folds(facts) if fold_bn else BNPlan()
    report.folded_bn, for_compconv = fold_plain_convs(model, plan)
    report.kept_bn = plan.kept
    check.after("fold_bn", "fold_bn=False")
    # 2) CompConv2d (+BN) -> DeployedCompConv2d.
    comp_pairs = [(c, b) for c, b in plan.pairs if id(model.get_submodule(c)) in for_compconv]
    report.compconv = deploy_compconvs(model, for_compconv)
    report.folded_bn += comp_pairs
    check.after("compconv", "fold_bn=False")
    if collapse_1x1 is True:
        _collapse(model, collapse_1x1, example_input, report, timer)
        check.after("collapse_1x1", "collapse_1x1=False")
    # 3) The shuffle into the neighbours.
    if fold_shuffle and facts.graph is not None:
        res = _fold_shuffles(facts)
        check.after("fold_shuffle", "fold_shuffle=False")
    else:
        res = ShuffleResult()
        why = "fold_shuffle=False" if not fold_shuffle else "torch.fx could not trace the model"
        report_unvisited(model, res, why)
    report.folded_shuffles, report.kept_shuffles = res.folded, res.kept
    if collapse_1x1 in ("auto", "lowrank"):  # last: built from (and timed on) the layers with shuffles folded
        _collapse(model, collapse_1x1, example_input, report, timer)
        check.after("collapse_1x1", "collapse_1x1=False")
    after_conv = [n for n in plan.after_conv if n in plan.kept]
    if after_conv:
        shown = "; ".join(f"{n}: {plan.kept[n]}" for n in after_conv[:5])
        more = f" (and {len(after_conv) - 5} more)" if len(after_conv) > 5 else ""
        warnings.warn(
            f"deploy: {len(after_conv)} BatchNorm2d after a conv kept unfolded in {type(model).__name__}: "
            f"{shown}{more}; deploy(..., return_report=True) lists every decision",
            stacklevel=4,
        )
    return model


def _collapse_hetconv(model: nn.Module, how: bool | str, example: tuple[Any, ...] | None, report: DeployReport,
                      timer: Timer | None) -> nn.Module:
    """Pass 0: HetConv layers into their dense conv (``how=True``) or the faster form (``"auto"``), reported;
    a warning names the layers left as they are. Returns the model (a bare HetConv2d comes back as the
    dense conv when that form is kept)."""
    from compconv.layers.hetconv import HetConv2d

    holder = nn.Sequential(model) if isinstance(model, HetConv2d) else model
    kept: dict[str, str] = {}
    if how == "auto":
        assert example is not None  # deploy() refuses "auto" without example_input
        report.hetconv_forms = tune_hetconv(holder, example, timer=timer, kept=kept)
        report.collapsed_hetconv = [r["name"] for r in report.hetconv_forms if r["form"] == "dense"]
    else:
        report.collapsed_hetconv, kept = collapse_all_hetconv(holder, example)
    if holder is not model:  # the bare module's name is "" (as named_modules() calls the root)
        report.collapsed_hetconv = ["" for _ in report.collapsed_hetconv]
        kept = {"" if n == "0" else n: why for n, why in kept.items()}
        for r in report.hetconv_forms:
            r["name"] = ""
    report.kept_hetconv = kept
    if kept:
        shown = "; ".join(f"{n or '(the module)'}: {why}" for n, why in list(kept.items())[:5])
        more = f" (and {len(kept) - 5} more)" if len(kept) > 5 else ""
        warnings.warn(f"deploy: collapse_hetconv={how!r} left {len(kept)} HetConv2d as they are: {shown}{more}",
                      stacklevel=5)
    return holder[0].eval() if holder is not model else model


def _collapse(model: nn.Module, how: bool | str, example_input: Any, report: DeployReport,
              timer: Timer | None) -> None:
    """The 1x1 CompConvs into the form ``how`` asks for (``"auto"``: the fastest, timed), reported."""
    if how == "auto":
        args = tuple(example_input) if isinstance(example_input, tuple | list) else example_input
        rows = tune_pointwise(model, args, timer=timer)
        report.pointwise_forms = rows
        report.collapsed_1x1 = [r["name"] for r in rows if r["form"] == "dense"]
        report.lowrank_1x1 = [r["name"] for r in rows if r["form"] == "lowrank"]
    elif how == "lowrank":
        report.lowrank_1x1 = collapse_all_pointwise(model, "lowrank")
    else:
        report.collapsed_1x1 = collapse_all_pointwise(model, "dense")
