"""Per-layer candidates: each method's hyper-parameter ladder and each candidate's exact cost.

For every convertible ``nn.Conv2d`` the ladder lists the options ``compress`` may choose, cheapest last;
``"keep"`` (the trained dense conv) is always the first candidate:

=========  ======================================================================================
method     ladder (only values the layer can take exactly; a value the method would change is left out)
=========  ======================================================================================
compconv   ``depth`` 1, 2, 3 (a depth ``resolve_hparams`` would lower is not offered)
ghost      ``ratio`` 2, 3, 4, 6, 8 (``ratio < C_out``)
hetconv    ``part`` = every divisor > 1 of ``gcd(C_in, C_out)`` (the exact implementation's allowed values)
slimconv   ``split`` 2, 3, 4 (``C_in >= 2 split``)
xsepconv   on (the method's defaults); depthwise convs only
=========  ======================================================================================

Costs are counted, not estimated: the candidate module is built for the layer and run through
:func:`compconv.profile` at the layer's input shape (batch 1), so params and MACs are exactly what
``convert`` would produce (MACs = multiply-accumulates of conv and linear ops, per image).

For a latency budget each candidate's ``latency`` is measured instead: the same module in the form it will
run in (deployed by default, :mod:`compconv.compress.latency`), in eval mode under ``torch.no_grad``, timed
by a ``timer(name, module, x) -> seconds`` (:mod:`compconv.hardware_aware`) on random inputs of the shape of
each call of the layer at ``input_size`` (batch ``N`` as given; see :func:`call_shapes`), the calls summed.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from compconv.compress.latency import time_in_form
from compconv.convert import _run as forward_once  # one eval-mode forward on zeros
from compconv.hardware_aware import LayerTimer
from compconv.layers.base import CompactConv2d, get_method
from compconv.profile import profile

__all__ = ["Candidate", "LayerCandidates", "call_shapes", "find_layers", "layer_candidates", "option_ladder"]

GHOST_RATIOS: tuple[int, ...] = (2, 3, 4, 6, 8)
SLIM_SPLITS: tuple[int, ...] = (2, 3, 4)
COMPCONV_DEPTHS: tuple[int, ...] = (1, 2, 3)


@dataclass
class Candidate:
    """One choice for one layer: ``options`` for the method (``None`` = keep the dense conv) and its cost.

    ``params`` counts every parameter of the layer's module; ``macs`` is per image at the layer's input
    shape; ``latency`` is seconds per forward of the model spent in the module, at the layer's input
    shape(s) with the deployment batch, every call summed (``None`` unless timed: ``budget_type="latency"``).
    ``label`` is short and readable (``"keep"``, ``"depth=2"``, ``"ratio=3"``).
    """

    label: str
    options: dict[str, Any] | None
    params: int
    macs: int
    latency: float | None = None


@dataclass
class LayerCandidates:
    """A convertible layer: its name, input shape ``(1, C, H, W)`` and candidates (``[0]`` is keep)."""

    name: str
    in_shape: tuple[int, ...]
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def keep(self) -> Candidate:
        return self.candidates[0]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def option_ladder(method: str, conv: nn.Conv2d) -> list[dict[str, Any]]:
    """The method's options for ``conv``, least compressing first (keep is not in the list).

    Raises ``ValueError`` for a method without a built-in ladder (pass ``ladder=`` to ``compress``).
    """
    if method == "compconv":
        return [{"depth": d} for d in COMPCONV_DEPTHS]
    if method == "ghost":
        return [{"ratio": r} for r in GHOST_RATIOS if r < conv.out_channels]
    if method == "hetconv":
        return [{"part": p} for p in _divisors(math.gcd(conv.in_channels, conv.out_channels)) if p > 1]
    if method == "slimconv":
        return [{"split": s} for s in SLIM_SPLITS if conv.in_channels >= 2 * s]
    if method == "xsepconv":
        return [{}]
    raise ValueError(f"no built-in option ladder for method {method!r} (built-in: compconv, ghost, hetconv, "
                     "slimconv, xsepconv); pass ladder=[{option: value}, ...] to compress")


def _label(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "on"


def _module_cost(module: nn.Module, in_shape: Sequence[int]) -> tuple[int, int]:
    prof = profile(module, tuple(in_shape))
    return prof.total_params, prof.total_macs


def _escape(name: str) -> str:
    """An fnmatch pattern that matches exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def find_layers(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    keep_stem: bool = True,
    exclude: str | Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, tuple[int, ...]]:
    """``{name: input shape (1, C, H, W)}`` of the ``nn.Conv2d`` layers ``compress`` may change, in call order.

    Convs inside a compact conv are parts, not candidates; the first conv (the stem) is left out when
    ``keep_stem``; ``exclude`` takes fnmatch patterns of dotted names or a callable ``(name, module)``.
    Layers the forward pass at ``input_size`` does not call are left out.
    """
    inner: set[str] = set()
    named = list(model.named_modules())
    for name, m in named:
        if isinstance(m, CompactConv2d):
            inner |= {n for n, _ in m.named_modules(prefix=name) if n != name}
    convs = [(n, m) for n, m in named if n and isinstance(m, nn.Conv2d) and n not in inner]
    if not convs:
        raise ValueError("model has no nn.Conv2d layers to compress")
    pats = [exclude] if isinstance(exclude, str) else ([] if exclude is None or callable(exclude) else list(exclude))
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    hooks = []
    for name, m in convs:
        def hook(_m: nn.Module, args: tuple[Any, ...], n: str = name) -> None:
            if n not in shapes:
                shapes[n] = (1, *args[0].shape[1:])
                order.append(n)
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        forward_once(model, input_size)
    finally:
        for h in hooks:
            h.remove()
    stem = convs[0][0]
    out: dict[str, tuple[int, ...]] = {}
    for name in order:
        mod = model.get_submodule(name)
        if keep_stem and name == stem:
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in pats):
            continue
        if callable(exclude) and exclude(name, mod):
            continue
        out[name] = shapes[name]
    return out


def call_shapes(model: nn.Module, input_size: Sequence[int], names: Iterable[str]) -> dict[str, list[tuple[int, ...]]]:
    """``{name: [input shape of each call]}`` of the modules ``names`` in one forward at ``input_size``.

    The shapes keep the batch of ``input_size`` (unlike :func:`find_layers`'s ``(1, C, H, W)``); a module
    called twice has two entries; a module the forward does not reach has none.
    """
    out: dict[str, list[tuple[int, ...]]] = {n: [] for n in names}
    hooks = []
    for name in out:
        def hook(_m: nn.Module, args: tuple[Any, ...], n: str = name) -> None:
            out[n].append(tuple(args[0].shape))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        forward_once(model, input_size)
    finally:
        for h in hooks:
            h.remove()
    return out


def layer_candidates(
    model: nn.Module,
    method: str,
    layers: dict[str, tuple[int, ...]],
    *,
    ladder: list[dict[str, Any]] | None = None,
    method_options: dict[str, Any] | None = None,
    latency_shapes: dict[str, list[tuple[int, ...]]] | None = None,
    timer: LayerTimer | None = None,
    mac_shapes: dict[str, list[tuple[int, ...]]] | None = None,
    latency_form: str = "deployed",
) -> list[LayerCandidates]:
    """The candidates of each layer in ``layers`` (``{name: input shape}``, from :func:`find_layers`).

    A layer with no candidate besides keep is left out. ``method_options`` (e.g. CompConv's
    ``width_multiple``) are added to every candidate's options. With ``latency_shapes`` (``{name: [input
    shape of each call]}``, from :func:`call_shapes`) every candidate (keep: the dense conv) is also timed
    with ``timer`` (default :func:`compconv.hardware_aware.benchmark_timer`) in its ``latency_form``
    (:mod:`compconv.compress.latency`: the fastest deployed form, or as built) and gets its ``latency``;
    ``ValueError`` (naming the layer) if the timer returns a non-finite or negative value. ``mac_shapes``
    (``{name: [(1, C, H, W) of each call]}``, :func:`call_shapes` at batch 1) makes each candidate's MACs
    the sum over every call of the layer in one forward (a conv shared by several inputs, e.g. a detection
    head run on every pyramid level, costs once per call); without it, one call at ``layers[name]``.
    """
    cls = get_method(method)

    def cost(mod: nn.Module, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
        calls = (mac_shapes or {}).get(name) or [shape]
        params = _module_cost(mod, calls[0])[0]
        return params, sum(_module_cost(mod, s)[1] for s in calls)

    base = dict(method_options or {})
    out: list[LayerCandidates] = []
    for name, shape in layers.items():
        conv = model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        params, macs = cost(conv, name, shape)
        shapes = latency_shapes.get(name) if latency_shapes is not None else None
        if latency_shapes is not None and not shapes:
            raise ValueError(f"layer {name!r}: no input shapes to time it on (the forward did not reach it)")
        lc = LayerCandidates(name, shape, [Candidate("keep", None, params, macs)])
        for opts in ladder if ladder is not None else option_ladder(method, conv):
            full = {**base, **opts}
            resolved, note = cls.resolve_hparams(conv, **full)
            if note and method == "compconv":  # a lowered depth duplicates a smaller candidate
                continue
            if cls.ineligible_reason(conv, **resolved) is not None:
                continue
            mod = cls.from_conv(conv, **resolved)
            p, m = cost(mod, name, shape)
            lat = time_in_form(name, mod, shapes, timer, latency_form)[0] if shapes else None
            lc.candidates.append(Candidate(_label(opts), dict(full), p, m, lat))
        if len(lc.candidates) > 1:
            if shapes:
                lc.keep.latency = time_in_form(name, conv, shapes, timer, latency_form)[0]
            out.append(lc)
    return out


def exact_pattern(name: str) -> str:
    """Public alias of the escaping used for ``convert``'s per-layer ``overrides`` keys."""
    return _escape(name)
