"""HetConv's two exact inference forms, and the per-layer choice between them.

A :class:`~compconv.layers.hetconv.HetConv2d` is a linear map equal to one dense ``K x K`` conv whose
kernel is zero off the HetConv pattern (:meth:`~compconv.layers.hetconv.HetConv2d.dense_weight`). So each
HetConv layer can run in either of two exact forms:

- ``"exact"``: the module itself (grouped ``K x K`` + grouped 1x1 over gathered channels: Eq. 4's MACs,
  three kernels and a gather);
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

from compconv.deploy.forms import Timer, _default_timer, _form_seconds, _macs
from compconv.deploy.graph import replace_module, user_hooks
from compconv.layers.hetconv import HetConv2d
from compconv.layers.ops import is_channels_last

__all__ = ["HETCONV_FORMS", "collapse_all_hetconv", "collapse_hetconv", "tune_hetconv"]

HETCONV_FORMS: tuple[str, ...] = ("exact", "dense")


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


def _candidates(model: nn.Module) -> dict[str, HetConv2d]:
    # A user's hook must keep seeing the module it was registered on, so those layers stay as they are.
    return {name: m for name, m in model.named_modules() if isinstance(m, HetConv2d) and not user_hooks(m)}


def collapse_all_hetconv(model: nn.Module) -> list[str]:
    """Replace every HetConv2d of ``model`` (in place; at every name it has) by :func:`collapse_hetconv`.
    Modules with hooks stay. Returns the names replaced."""
    names = []
    for name, mod in _candidates(model).items():
        replace_module(model, mod, collapse_hetconv(mod))
        names.append(name)
    return names


@torch.no_grad()
def tune_hetconv(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...] | list[Any],
    *,
    repeats: int = 5,
    min_time: float = 0.01,
    timer: Timer | None = None,
) -> list[dict[str, Any]]:
    """Give each HetConv2d of ``model`` the faster of its exact forms on its real input, in place.

    Each layer's input is recorded in one eval-mode forward of ``example_input`` (a Tensor, or a tuple/list
    of the model's positional arguments; batch, dtype, device and memory format as in use); the module and
    its dense conv are timed on it (by default interleaved medians of ``repeats``, each at least ``min_time``
    seconds) and the faster is kept. A BatchNorm after the layer is timed in neither form; ``deploy`` folds
    it into the dense form afterwards, so a near-tie kept as ``"exact"`` may still be slower than dense
    (``collapse_hetconv=True`` forces the dense form). Layers with hooks, or not reached by the input, stay.

    Args:
        timer: ``timer({form: fn}) -> {form: seconds per call}`` (NaN: the form failed and is not chosen);
            default :func:`compconv.bench.timing.interleaved_median`. Tests inject a stub.

    Returns one row per layer timed: ``name``, ``input_shape``, ``times_ms`` and ``macs`` (form -> value for
    one call on that input) and ``form`` (the one kept).

    Raises:
        TypeError: ``example_input`` holds no Tensor; the timer does not return a dict.
        ValueError: the timer returns something other than seconds (finite, >= 0) or NaN (layer named).
    """
    args = tuple(example_input) if isinstance(example_input, tuple | list) else (example_input,)
    tensors = [a for a in args if isinstance(a, Tensor)]
    if not tensors:
        raise TypeError(f"example_input must be a Tensor (the model's input) or a tuple of the model's positional "
                        f"arguments holding one, but got {type(example_input).__name__}")
    cands = _candidates(model)
    seen: dict[str, Tensor] = {}

    def record(name: str) -> Any:
        def hook(_m: nn.Module, a: tuple[Any, ...]) -> None:
            seen.setdefault(name, a[0].detach().clone())  # clone keeps the memory format

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in cands.items()]
    was_training = model.training
    try:
        model.eval()(*args)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    time_them = timer or _default_timer(repeats, min_time, str(tensors[0].device))
    rows = []
    for name, mod in cands.items():
        if name not in seen:
            continue
        x = seen[name]
        fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        built: dict[str, nn.Module] = {"exact": mod, "dense": collapse_hetconv(mod).eval().to(memory_format=fmt)}  # type: ignore[call-overload]
        macs = {f: _macs(m, x) for f, m in built.items()}
        secs = _form_seconds(time_them({f: (lambda m=m, x=x: m(x)) for f, m in built.items()}), built, name,
                             "HetConv layer")
        ok = {f: s for f, s in secs.items() if s == s}
        best = min(ok, key=ok.__getitem__) if ok else "exact"
        if best == "dense":
            replace_module(model, mod, built["dense"])
        rows.append(dict(name=name, input_shape=tuple(x.shape), times_ms={f: 1e3 * s for f, s in secs.items()},
                         macs=macs, form=best))
    return rows
