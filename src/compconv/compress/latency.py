"""What a latency budget times: each module in the form it will run in.

A latency budget (``compress(..., budget_type="latency")``) is a share of the time the user's model takes,
and the user runs a compressed model deployed (:func:`compconv.deploy`: BN folded, CompConv's parts written
in place, its shuffle folded), not as ``convert`` returns it. So by default (``latency_form="deployed"``)
every module the budget times, each layer's dense conv, each candidate and both whole models, is timed in
its deployed forms and the fastest counts:

* ``deploy(module)`` (the default passes);
* for a whole model holding HetConv layers, also ``deploy(model, collapse_hetconv=True)``: the dense convs
  its HetConvs equal, which on CPUs often beat the grouped form despite their larger MACs (docs/compress.md).
  A single layer's HetConv candidate is not timed collapsed: collapsed it *is* the layer's dense conv, timed
  already as "keep", and counting a noisy second timing of it as a saving would trade accuracy for nothing.

``latency_form="converted"`` times the modules as they are (``convert``'s output, the original model as
given), e.g. to compare with :mod:`compconv.hardware_aware`, which times that way.

Per-layer forms are deployed one module at a time, so the passes that work across layers (a BN after the
layer folded into it, the shuffle folded into the next layer) are not in the layer timings; the whole
models are deployed whole, and the report's measured share (``latency_share_measured``) includes them.

That measured share comes from :func:`time_side_by_side`: the original and the compressed model timed in
alternation (``SIDE_BY_SIDE_ROUNDS`` rounds, medians), so a machine that speeds up or slows down while
``compress`` runs (a shared VM: the same model was seen 35% apart minutes later) moves both alike.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from compconv.hardware_aware import LayerTimer, time_module

__all__ = ["LATENCY_FORMS", "SIDE_BY_SIDE_ROUNDS", "time_in_form", "time_side_by_side", "timed_forms"]

LATENCY_FORMS = ("deployed", "converted")
SIDE_BY_SIDE_ROUNDS = 3  # rounds of the final original / compressed timing


def _who(name: str) -> str:
    return f"layer {name!r}" if name else "the whole model"


def timed_forms(name: str, module: nn.Module, example: torch.Tensor, latency_form: str) -> list[tuple[str, nn.Module]]:
    """``[(label, module)]``: the forms ``module`` is timed in (see the module docstring); ``name`` is the
    layer's dotted name, ``""`` for a whole model (the only one also timed with HetConv collapsed).

    ``example`` is an input ``module`` accepts (deploy's equality check runs on it). Raises ``ValueError``
    for an unknown ``latency_form``; ``RuntimeError`` naming the layer when deploying it fails (the message
    says to pass ``latency_form="converted"``).
    """
    if latency_form not in LATENCY_FORMS:
        raise ValueError(f"latency_form must be one of {LATENCY_FORMS}, but got {latency_form!r}")
    if latency_form == "converted":
        return [("converted", module)]
    from compconv.deploy import deploy
    from compconv.layers.hetconv import HetConv2d

    variants: list[tuple[str, dict[str, bool]]] = [("deploy", {})]
    if name == "" and any(isinstance(m, HetConv2d) for m in module.modules()):
        variants.append(("deploy(collapse_hetconv=True)", {"collapse_hetconv": True}))
    out = []
    for label, kw in variants:
        try:
            with warnings.catch_warnings():
                # deploy's warnings (a BN it keeps, a model fx cannot trace) concern what it rewrites; here only
                # the time of whatever form it returns counts, and the rewrite is checked against the original
                warnings.simplefilter("ignore")
                out.append((label, deploy(module, example_input=example, **kw)))
        except Exception as e:
            raise RuntimeError(f"{_who(name)} ({type(module).__name__}): {label} failed while timing it for the "
                               "latency budget "
                               f"({type(e).__name__}: {e}); pass latency_form='converted' to time the modules as "
                               "they are") from e
    return out


def time_in_form(name: str, module: nn.Module, input_shapes: Sequence[Sequence[int]], timer: LayerTimer | None,
                 latency_form: str) -> tuple[float, str]:
    """``(seconds, label)``: the fastest of ``module``'s :func:`timed_forms`, each timed by
    :func:`compconv.hardware_aware.time_module` at ``input_shapes`` (every call summed), and which form it was.

    ``name`` is the layer's dotted name (``""``: the whole model), passed to ``timer``.
    """
    if not input_shapes:
        return time_module(name, module, input_shapes, timer), latency_form  # raises, naming the layer
    example = _example(module, input_shapes[0])
    best: tuple[float, str] | None = None
    for label, form in timed_forms(name, module, example, latency_form):
        t = time_module(name, form, input_shapes, timer)
        if best is None or t < best[0]:
            best = (t, label)
    assert best is not None
    return best


def _example(module: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    p = next(module.parameters(), None)
    kw = {"dtype": p.dtype, "device": p.device} if p is not None and p.is_floating_point() else {}
    return torch.randn(*shape, **kw)


def time_side_by_side(models: dict[str, nn.Module], input_shape: Sequence[int], timer: LayerTimer | None,
                      latency_form: str, rounds: int = SIDE_BY_SIDE_ROUNDS) -> dict[str, tuple[float, str]]:
    """``{key: (seconds, label)}``: each whole model of ``models`` in its fastest :func:`timed_forms` at
    ``input_shape``, all timed round-robin (every form of every model once per round, ``rounds`` rounds) and
    each form's median kept, so slow drift of the machine's speed cancels out of their ratio.

    The timer is called with name ``""`` (the whole model). Raises as :func:`timed_forms` and
    :func:`compconv.hardware_aware.time_module` (a bad timer value), and ``ValueError`` for ``rounds < 1``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, but got {rounds}")
    forms = {k: timed_forms("", m, _example(m, input_shape), latency_form) for k, m in models.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for k, fs in forms.items():
            for label, form in fs:
                times.setdefault((k, label), []).append(time_module("", form, [input_shape], timer))
    out: dict[str, tuple[float, str]] = {}
    for (k, label), ts in times.items():
        med = statistics.median(ts)
        if k not in out or med < out[k][0]:
            out[k] = (med, label)
    return out
