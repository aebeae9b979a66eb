"""What a latency budget times: each module in the form it will run in.

A latency budget (``compress(..., budget_type="latency")``) is a share of the time the user's model takes,
and the user runs a compressed model deployed (:func:`compconv.deploy`: BN folded, CompConv's parts written
in place, its shuffle folded), not as ``convert`` returns it. So by default (``latency_form="deployed"``)
every module the budget times, each layer's dense conv, each candidate and both whole models, is timed in
its deployed forms and the fastest counts:

* ``deploy(module)`` (the default passes);
* for a module holding HetConv layers, also ``deploy(module, collapse_hetconv=True)``: the dense conv a
  HetConv equals, which on CPUs often beats the grouped form despite its larger MACs (docs/compress.md).

``latency_form="converted"`` times the modules as they are (``convert``'s output, the original model as
given), e.g. to compare with :mod:`compconv.hardware_aware`, which times that way.

Per-layer forms are deployed one module at a time, so the passes that work across layers (a BN after the
layer folded into it, the shuffle folded into the next layer) are not in the layer timings; the whole
models are deployed whole, and the report's measured share (``latency_share_measured``) includes them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from compconv.hardware_aware import LayerTimer, time_module

__all__ = ["LATENCY_FORMS", "time_in_form", "timed_forms"]

LATENCY_FORMS = ("deployed", "converted")


def _who(name: str) -> str:
    return f"layer {name!r}" if name else "the whole model"


def timed_forms(name: str, module: nn.Module, example: torch.Tensor, latency_form: str) -> list[tuple[str, nn.Module]]:
    """``[(label, module)]``: the forms ``module`` is timed in (see the module docstring).

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
    if any(isinstance(m, HetConv2d) for m in module.modules()):
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
            raise RuntimeError(f"{_who(name)}: {label} failed while timing it for the latency budget "
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
    p = next(module.parameters(), None)
    kw = {"dtype": p.dtype, "device": p.device} if p is not None and p.is_floating_point() else {}
    example = torch.randn(*input_shapes[0], **kw)
    best: tuple[float, str] | None = None
    for label, form in timed_forms(name, module, example, latency_form):
        t = time_module(name, form, input_shapes, timer)
        if best is None or t < best[0]:
            best = (t, label)
    assert best is not None
    return best
