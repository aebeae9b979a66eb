"""Per layer, the fastest exact form: each 1x1 CompConv timed in every form it has, on its real input.

A deployed 1x1 CompConv has three exact forms (equal outputs within float tolerance):

- ``"split"``: the :class:`~compconv.deploy.compconv.DeployedCompConv2d` itself (the fewest MACs; one
  small conv per step and one write per output part);
- ``"dense"``: the one dense 1x1 conv it equals (:func:`~compconv.deploy.compconv.collapse_pointwise`;
  the dense layer's MACs, one GEMM);
- ``"lowrank"``: two dense GEMMs (:class:`~compconv.deploy.lowrank.LowRankPointwise`; MACs between the two).

Which runs fastest depends on the machine, the batch, the widths and the memory format, so
:func:`tune_pointwise` measures them where the model runs and keeps the fastest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from compconv.deploy.compconv import _HOOK_DICTS, DeployedCompConv2d, collapse_pointwise
from compconv.deploy.graph import replace_module
from compconv.deploy.lowrank import LowRankPointwise
from compconv.layers.ops import is_channels_last

__all__ = ["POINTWISE_FORMS", "Timer", "tune_pointwise"]

POINTWISE_FORMS: tuple[str, ...] = ("split", "dense", "lowrank")
# A timer takes zero-argument callables by form name and returns seconds per call for each (NaN: failed).
Timer = Callable[[dict[str, Callable[[], Any]]], dict[str, float]]


def _default_timer(repeats: int, min_time: float, device: str) -> Timer:
    from compconv.bench.timing import interleaved_median

    def timer(cands: dict[str, Callable[[], Any]]) -> dict[str, float]:
        res = interleaved_median(cands, repeats=repeats, warmup=1, min_time=min_time, device=device)
        return {n: res[n].median for n in cands}

    return timer


def _macs(mod: nn.Module, x: Tensor) -> int:
    """MACs ``mod(x)`` executes (``FlopCounterMode`` FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with counter:
        mod(x)
    return counter.get_total_flops() // 2


def _example_args(example_input: Any) -> tuple[tuple[Any, ...], Tensor]:
    """``example_input`` as the model's positional arguments, and the first tensor among them (its device is
    where timing happens). Raises ``TypeError`` when it holds no Tensor."""
    args = tuple(example_input) if isinstance(example_input, tuple | list) else (example_input,)
    tensors = [a for a in args if isinstance(a, Tensor)]
    if not tensors:
        raise TypeError(f"example_input must be a Tensor (the model's input) or a tuple of the model's positional "
                        f"arguments holding one, but got {type(example_input).__name__}")
    return args, tensors[0]


def _form_seconds(secs: Any, built: dict[str, nn.Module], name: str, kind: str = "1x1 layer") -> dict[str, float]:
    """The timer's answer for layer ``name``, checked: seconds (finite, >= 0) or NaN (failed) per form."""
    if not isinstance(secs, Mapping):
        raise TypeError(f"timer returned {type(secs).__name__} for {kind} {name!r}: it must return "
                        f"{{form: seconds per call}} for the forms it was given ({', '.join(built)})")
    out: dict[str, float] = {}
    for f in built:
        t = secs.get(f, float("nan"))
        if isinstance(t, bool) or not isinstance(t, int | float) or not (t != t or 0 <= t < float("inf")):
            raise ValueError(f"timer returned {t!r} for form {f!r} of {kind} {name!r}: it must return seconds "
                             "per call (a finite number >= 0, or NaN for a form that failed)")
        out[f] = float(t)
    return out


@torch.no_grad()
def tune_pointwise(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...] | list[Any],
    *,
    repeats: int = 5,
    min_time: float = 0.01,
    forms: Sequence[str] = POINTWISE_FORMS,
    timer: Timer | None = None,
) -> list[dict[str, Any]]:
    """Give each 1x1 ``DeployedCompConv2d`` of a deployed ``model`` its fastest exact form, in place.

    Every 1x1 CompConv's input is recorded in one forward pass of ``example_input`` (a Tensor, or a tuple
    or list of the model's positional arguments, as :func:`compconv.deploy` takes it; shape, dtype, device
    and memory format as in use); each of ``forms`` (see the module docstring) is built and timed on that
    input (by default interleaved, median of ``repeats``, each repeat at least ``min_time`` seconds), and
    the fastest replaces the module (``"split"`` keeps it). ``"lowrank"`` is not tried where it executes
    no fewer MACs than ``"dense"`` (d = 1 with ``C_in <= C_out``: the dense GEMM does that work at once).
    Timings are eager: under ``torch.compile`` the balance can differ (measure the whole model). Modules
    with hooks are left as they are.

    Args:
        timer: ``timer({form: fn}) -> {form: seconds per call}`` (NaN: the form failed; it is not chosen;
            a form it leaves out counts as failed); default: :func:`compconv.bench.timing.interleaved_median`.
            Tests inject a stub.

    Returns one row per 1x1 CompConv reached: ``name``, ``input_shape``, ``times_ms`` (form -> ms),
    ``macs`` (form -> MACs of one call on that input), ``form`` (the one kept), and as before
    ``split_ms``, ``dense_ms`` (NaN if not timed) and ``collapsed`` (the dense form was kept).

    Raises:
        TypeError: ``example_input`` is neither a Tensor nor a tuple/list holding one; the timer does not
            return a dict.
        ValueError: ``forms`` names an unknown form or leaves out ``"split"``; the timer returns something
            other than seconds (a finite number >= 0) or NaN for a form (the layer named).
    """
    args, first = _example_args(example_input)
    forms = tuple(forms)
    bad = [f for f in forms if f not in POINTWISE_FORMS]
    if bad or "split" not in forms:
        raise ValueError(f"forms must be a subset of {POINTWISE_FORMS} including 'split', but got {forms!r}")
    time_them = timer or _default_timer(repeats, min_time, str(first.device))
    cands = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, DeployedCompConv2d) and m.kernel_size == (1, 1) and m.padding == (0, 0)
        and m.dilation == (1, 1)
        and not any(getattr(m, a) for a in _HOOK_DICTS)  # a user's hook must keep seeing this module
    }
    seen: dict[str, Tensor] = {}

    def record(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(name, args[0].detach().clone())  # clone keeps the memory format

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in cands.items()]
    try:
        model(*args)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, mod in cands.items():
        if name not in seen:  # not reached by this input
            continue
        x = seen[name]
        fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        built: dict[str, nn.Module] = {"split": mod}
        if "dense" in forms:
            built["dense"] = collapse_pointwise(mod).to(memory_format=fmt)  # type: ignore[union-attr,call-overload]
        if "lowrank" in forms:
            built["lowrank"] = LowRankPointwise.from_deployed(mod)  # type: ignore[assignment]
        macs = {f: _macs(m, x) for f, m in built.items()}
        if "lowrank" in built and "dense" in built and macs["lowrank"] >= macs["dense"]:
            del built["lowrank"], macs["lowrank"]  # no fewer MACs than the one dense GEMM (d = 1, C_in ~ C_out)
        secs = _form_seconds(time_them({f: (lambda m=m, x=x: m(x)) for f, m in built.items()}), built, name)
        ok = {f: s for f, s in secs.items() if s == s}
        best = min(ok, key=ok.__getitem__) if ok else "split"
        if best != "split":
            replace_module(model, mod, built[best])
        times = {f: 1e3 * secs.get(f, float("nan")) for f in built}
        rows.append(
            dict(
                name=name,
                input_shape=tuple(x.shape),
                times_ms=times,
                macs=macs,
                form=best,
                split_ms=times["split"],
                dense_ms=times.get("dense", float("nan")),
                collapsed=best == "dense",
            )
        )
    return rows
