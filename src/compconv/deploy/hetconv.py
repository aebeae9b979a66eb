"""HetConv's two exact inference forms, and the per-layer choice between them.

A :class:`~compconv.layers.hetconv.HetConv2d` is a linear map equal to one dense ``K x K`` conv whose
kernel is zero off the HetConv pattern (:meth:`~compconv.layers.hetconv.HetConv2d.dense_weight`). So each
HetConv layer can run in either of two exact forms:

- ``"hetconv"``: the module as it is (with ``impl="exact"``: a grouped ``K x K`` conv and a grouped 1x1
  conv over gathered channels, Eq. 4's MACs, plus two channel shuffles, a gather and an add);
- ``"dense"``: the one ``nn.Conv2d`` it equals (:func:`collapse_hetconv`; the dense layer's MACs, one
  kernel call, and a BatchNorm after it folds into it).

Which runs faster depends on the machine, batch, widths and memory format (on CPUs the grouped form
often loses: its fewer MACs come in several small kernels), so ``"auto"`` (:func:`tune_hetconv`) times the
two on each layer's real input and keeps the faster. Source: the HetConv paper's Eq. 4 (the MACs) and
the spec's section 1.4 (the exact grouped form).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from compconv.deploy.forms import Timer, _default_timer, _example_args, _form_seconds, _macs
from compconv.deploy.graph import replace_module, user_hooks
from compconv.layers.hetconv import HetConv2d
from compconv.layers.ops import is_channels_last

__all__ = ["HETCONV_FORMS", "collapse_all_hetconv", "collapse_hetconv", "tune_hetconv"]

HETCONV_FORMS: tuple[str, ...] = ("hetconv", "dense")


def collapse_hetconv(mod: HetConv2d) -> nn.Conv2d:
    """The ``nn.Conv2d`` a HetConv layer equals: ``(N, M, kh, kw)`` kernel :meth:`HetConv2d.dense_weight`,
    the same bias, stride, padding (numeric), dilation and padding mode, on the module's device and dtype.

    Its output equals ``mod(x)`` for every input within float rounding; it executes the dense layer's MACs
    (``Ho Wo N M kh kw`` per image) instead of Eq. 4's. Raises ``TypeError`` for anything but a HetConv2d.
    """
    if not isinstance(mod, HetConv2d):
        raise TypeError(f"collapse_hetconv takes a HetConv2d, but got {type(mod).__name__}")
    w = mod.dense_weight().detach()
    conv = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod._pad,  # type: ignore[arg-type]
                     mod.dilation, 1, mod.bias is not None, mod.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
        if mod.bias is not None:
            conv.bias.copy_(mod.bias.detach())  # type: ignore[union-attr]
    return conv.train(mod.training)


def _calls(model: nn.Module, mods: dict[str, HetConv2d], args: tuple[Any, ...]) -> tuple[list[str], dict[str, Any]]:
    """One eval forward of ``args``: the names in ``mods`` in the order they are first called, and each one's
    input tensor (or, for a layer called without a positional input, the string ``"keyword"``)."""
    order: list[str] = []
    seen: dict[str, Any] = {}

    def record(name: str) -> Any:
        def hook(_m: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            if name not in seen:
                order.append(name)
                # clone keeps the memory format; nn.Conv2d takes its input as `input`, HetConv as `x`
                seen[name] = a[0].detach().clone() if a and isinstance(a[0], Tensor) and not kw else "keyword"

        return hook

    hooks = [m.register_forward_pre_hook(record(n), with_kwargs=True) for n, m in mods.items()]
    was_training = model.training
    try:
        model.eval()(*args)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order, seen


KEYWORD_CALL = "called with keyword arguments (nn.Conv2d's forward takes `input`, not `x`)"


def _drop_keyword_calls(ok: dict[str, HetConv2d], seen: dict[str, Any], kept: dict[str, str]) -> None:
    """Move the layers ``_calls`` saw called by keyword from ``ok`` to ``kept`` (with the reason)."""
    for name in [n for n, v in seen.items() if isinstance(v, str) and n in ok]:
        kept[name] = KEYWORD_CALL
        del ok[name]


def _kept_reasons(model: nn.Module) -> tuple[dict[str, HetConv2d], dict[str, str]]:
    """The HetConv layers that may be replaced, and those with hooks, which may not (name -> why)."""
    ok: dict[str, HetConv2d] = {}
    kept: dict[str, str] = {}
    for name, m in model.named_modules():
        if not isinstance(m, HetConv2d):
            continue
        if user_hooks(m):  # a user's hook must keep seeing the module it was registered on
            kept[name] = "has hooks (they must keep seeing this module)"
        else:
            ok[name] = m
    return ok, kept


def collapse_all_hetconv(model: nn.Module, example: tuple[Any, ...] | None = None) -> tuple[list[str], dict[str, str]]:
    """Replace every HetConv2d of ``model`` (in place; at every name it has) by :func:`collapse_hetconv`.

    Layers with hooks, and (seen on ``example``, the model's positional arguments, when given) layers called
    with keyword arguments, stay. Returns the names replaced and ``{name: why}`` of those kept."""
    ok, kept = _kept_reasons(model)
    if example is not None and ok:
        _drop_keyword_calls(ok, _calls(model, ok, example)[1], kept)
    for mod in ok.values():
        replace_module(model, mod, collapse_hetconv(mod))
    return list(ok), kept


@torch.no_grad()
def tune_hetconv(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...] | list[Any],
    *,
    repeats: int = 5,
    min_time: float = 0.01,
    timer: Timer | None = None,
    kept: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Give each HetConv2d of ``model`` the faster of its two exact forms on its real input, in place.

    The layers are decided in the order the model calls them on ``example_input`` (a Tensor, or a tuple/list
    of the model's positional arguments; batch, dtype, device and memory format as in use), each timed on
    the input it gets once the earlier ones are decided (a collapsed layer can change the memory format its
    successors see): ``"hetconv"`` (the module as it is) against ``"dense"`` (:func:`collapse_hetconv`,
    built in its input's memory format), by default interleaved medians of ``repeats`` runs of at least
    ``min_time`` seconds each (eager), and the faster is kept. A BatchNorm after the layer is timed in
    neither form; :func:`compconv.deploy` (``collapse_hetconv="auto"``) runs this before folding BNs, so
    one then folds into each dense form. Run on its own after ``deploy``, the BNs stay unfolded.

    Layers with hooks, called with keyword arguments or not reached by the input stay as they are; with
    ``kept`` (a dict) given, each is added to it with the reason.

    Args:
        timer: ``timer({form: fn}) -> {form: seconds per call}`` (NaN: the form failed and is not chosen);
            default :func:`compconv.bench.timing.interleaved_median`. Tests inject a stub.

    Returns one row per layer timed: ``name``, ``input_shape``, ``times_ms`` and ``macs`` (form -> value for
    one call on that input) and ``form`` (the one kept).

    Raises:
        TypeError: ``example_input`` holds no Tensor; the timer does not return a dict.
        ValueError: the timer returns something other than seconds (finite, >= 0) or NaN (layer named).
    """
    args, first = _example_args(example_input)
    todo, why = _kept_reasons(model)
    time_them = timer or _default_timer(repeats, min_time, str(first.device))
    rows = []
    while todo:
        order, seen = _calls(model, todo, args)  # again after every decision: inputs may have changed
        _drop_keyword_calls(todo, seen, why)
        order = [n for n in order if n in todo]
        if not order:
            for name in todo:
                why[name] = "not reached by example_input"
            break
        name = order[0]
        mod = todo.pop(name)
        x = seen[name]
        fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        built: dict[str, nn.Module] = {"hetconv": mod,
                                       "dense": collapse_hetconv(mod).eval().to(memory_format=fmt)}  # type: ignore[call-overload]
        macs = {f: _macs(m, x) for f, m in built.items()}
        secs = _form_seconds(time_them({f: (lambda m=m, x=x: m(x)) for f, m in built.items()}), built, name,
                             "HetConv layer")
        ok = {f: s for f, s in secs.items() if s == s}
        best = min(ok, key=ok.__getitem__) if ok else "hetconv"
        if best == "dense":
            replace_module(model, mod, built["dense"])
        rows.append(dict(name=name, input_shape=tuple(x.shape), times_ms={f: 1e3 * s for f, s in secs.items()},
                         macs=macs, form=best))
    if kept is not None:
        kept.update(why)
    return rows
