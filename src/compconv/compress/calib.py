"""Calibration data: normalise what the user passes, and capture one layer's input or output.

``calib`` may be a tensor (one batch), an iterable of tensors, an iterable of ``(input, label, ...)``
tuples/lists or a ``DataLoader`` of either; labels are ignored. Batches are materialised once (the
warm start and the search read them many times), so pass a few hundred images, not a dataset.

Capturing runs the model up to the layer and stops there (an exception raised in a forward hook), so
reading an early layer costs a fraction of a forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["as_batches", "capture", "capture_io", "conv_call_order", "split_batches"]


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs."""


def as_batches(calib: Any, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> list[Tensor]:
    """The calibration inputs as a list of ``(N, C, H, W)`` tensors; raises ``TypeError``/``ValueError``."""
    if isinstance(calib, Tensor):
        items: Iterable[Any] = [calib]
    elif isinstance(calib, Iterable):
        items = calib
    else:
        raise TypeError(f"calib must be a tensor, an iterable of tensors or (input, label) pairs, or a DataLoader, "
                        f"but got {type(calib).__name__}")
    out: list[Tensor] = []
    for i, item in enumerate(items):
        x = item[0] if isinstance(item, (tuple, list)) and item else item
        if not isinstance(x, Tensor):
            raise TypeError(f"calib batch {i} must be a tensor or an (input, label) pair, but got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"calib batch {i} must have a batch dimension, e.g. (N, C, H, W), "
                             f"but got {tuple(x.shape)}")
        out.append(x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None))
    if not out:
        raise ValueError("calib yielded no batches; pass at least one batch of inputs")
    return out


def first_non_finite(batches: list[Tensor]) -> int | None:
    """Index of the first floating batch holding NaN or inf, None when all are finite."""
    return next((i for i, x in enumerate(batches) if x.is_floating_point() and not torch.isfinite(x).all()), None)


def split_batches(batches: list[Tensor], held_out: float, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """``(fit, held)``: a seeded random ``held_out`` share of the images (at least one) is held out.

    Images, not batches, are drawn at random: a loader that yields its images in order (an ImageFolder or
    a compconv evaluation loader without shuffling lists them class by class) would otherwise hold out the
    last classes and fit every layer on the others. The images are re-batched at the first batch's size.
    Batches whose images differ in shape are drawn whole instead. Needs >= 2 images.
    """
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), but got {held_out}")
    g = torch.Generator().manual_seed(seed)
    if len({tuple(x.shape[1:]) for x in batches}) > 1:  # cannot concatenate: draw whole batches
        if len(batches) < 2:
            raise ValueError("calib needs at least 2 batches when their image shapes differ")
        k = min(len(batches) - 1, max(1, round(len(batches) * held_out)))
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in sorted(order[k:])], [batches[i] for i in sorted(order[:k])]
    x = torch.cat(batches)
    n = x.shape[0]
    if n < 2:
        raise ValueError("calib needs at least 2 images (some are held out to measure the fit)")
    k = min(n - 1, max(1, round(n * held_out)))
    order = torch.randperm(n, generator=g).to(x.device)
    held_idx, fit_idx = order[:k].sort().values, order[k:].sort().values
    size = max(1, batches[0].shape[0])
    return list(x[fit_idx].split(size)), list(x[held_idx].split(size))


def capture(model: nn.Module, module: nn.Module, batches: list[Tensor], what: str) -> list[Tensor]:
    """``module``'s first input (``what="input"``) or its output (``"output"``) for each batch, no grad.

    The forward pass stops right after the module (later layers do not run). Raises ``ValueError`` when
    the module is not called by ``model``'s forward.
    """
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', but got {what!r}")
    got: list[Tensor] = []

    def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0].detach())
        raise _Stop

    def post(_m: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
        got.append(out.detach())
        raise _Stop

    h = module.register_forward_pre_hook(pre) if what == "input" else module.register_forward_hook(post)
    _stopped_passes(model, module, h, batches, got)
    return got


def _stopped_passes(model: nn.Module, module: nn.Module, handle: Any, batches: list[Tensor],
                    got: list[Tensor]) -> None:
    """Run ``model`` on each batch until ``module``'s hook (``handle``) appends to ``got`` and stops the pass.

    Raises ValueError when a pass ends without the hook firing (the module is not on the forward path).
    """
    try:
        with torch.no_grad():
            for x in batches:
                n = len(got)
                try:
                    model(x)
                except _Stop:
                    pass
                if len(got) != n + 1:
                    raise ValueError(f"{type(module).__name__} is not called in the model's forward pass")
    finally:
        handle.remove()


def capture_io(model: nn.Module, module: nn.Module, batches: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """``(inputs, outputs)`` of ``module`` for each batch, in one (stopped) forward pass per batch."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []

    def post(_m: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        xs.append(args[0].detach())
        ys.append(out.detach())
        raise _Stop

    _stopped_passes(model, module, module.register_forward_hook(post), batches, ys)
    return xs, ys


def conv_call_order(model: nn.Module, x: Tensor, names: Iterable[str]) -> list[str]:
    """``names`` (dotted module names) sorted by when the forward pass over ``x`` first calls them.

    Modules the forward pass never calls come last, in the given order.
    """
    wanted = list(names)
    seen: list[str] = []
    hooks = []
    for name in wanted:
        m = model.get_submodule(name)
        hooks.append(m.register_forward_pre_hook(lambda _m, _a, n=name: seen.append(n) if n not in seen else None))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen + [n for n in wanted if n not in seen]
