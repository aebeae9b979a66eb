"""Plug-and-play conversion: swap a model's ``nn.Conv2d`` layers for a compact convolution, in place.

    model = torchvision.models.resnet50()
    model, report = compconv.convert(model, "compconv", c0=128, return_report=True)
    print(report)

``convert`` first decides everything, then swaps: the method's options, every selector and override are
checked, the model is traced (when ``input_size`` is given) and every replacement is built before the
first layer is touched, so an error leaves the model as it was.

A conv layer is one module *object*: a conv registered under two names (an alias attribute and the
``nn.Sequential`` that runs it, or a conv shared by two parents) is one layer, replaced at every name by
one shared replacement. Rules, in the order they are applied to every layer (the report says which one
decided):

0. already a compact conv -> kept ("already converted"): converting twice is a no-op with a report;
1. ``exclude`` matches -> kept ("excluded");
2. the stem (the first conv layer registered in the model) -> kept when ``keep_stem`` (the paper keeps Conv1);
3. ``include`` given and does not match -> kept ("not included");
4. not a plain ``nn.Conv2d`` -> kept with the reason (``compconv.eligibility``: subclasses, parametrized
   convs, hooks, uninitialised lazy convs; timm ``Conv2dSame`` is converted where its padding is exact);
5. 1x1 convs -> kept when ``convert_1x1=False``;
6. per-layer ``overrides`` update the method options (first matching selector wins);
7. the method adapts its options to the layer (``resolve_hparams``: e.g. CompConv picks d by Eq. 6 and
   lowers it when the layer is too narrow), then says whether it can replace it (``ineligible_reason``:
   e.g. CompConv keeps depthwise/grouped convs);
8. ``hardware_aware=True``: the replacement is timed against the dense conv at ``input_size`` on this
   machine and the layer kept when it is not faster ("kept (hardware_aware): compact X ms >= dense Y ms");
   then the whole converted model against its source, reverting the least-gaining layers while it is slower
   ("kept (hardware_aware, whole model): ...", ``hardware_aware.whole_model_guard``).

``include`` / ``exclude`` / ``overrides`` keys accept fnmatch patterns of dotted module names (any name of
a layer), module objects (a module and its children), module types, or callables ``(name, module) ->
bool``; a selector that matches no conv layer is an error (a typo must not silently convert nothing).
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from compconv.conversion_report import ConversionReport, LayerChange
from compconv.eligibility import plain_conv_view
from compconv.layers.base import CompactConv2d, get_method
from compconv.options import check_bool, merge_options

__all__ = ["ConversionReport", "LayerChange", "check_options", "convert"]

Selector = str | nn.Module | type | Callable[[str, nn.Module], bool]
# convert()'s own keyword arguments (get_model's method_options may carry them next to the method's options)
CONVERT_ARGS = ("include", "exclude", "overrides", "keep_stem", "convert_1x1", "input_size", "return_report",
                "verbose", "hardware_aware", "timer")


@dataclass
class _Layer:
    """One conv module object and every place it is registered: ``names[i]`` is ``sites[i] = (parent, attr)``."""

    module: nn.Module
    names: list[str] = field(default_factory=list)
    sites: list[tuple[nn.Module, str]] = field(default_factory=list)
    calls: list[tuple[torch.Size, torch.Size]] = field(default_factory=list)  # (input, output) per call


@dataclass
class _Decision:
    layer: _Layer
    opts: dict[str, Any]
    reason: str = ""  # non-empty: kept
    note: str = ""
    new: nn.Module | None = None
    overridden: set[str] = field(default_factory=set)  # option names this layer's override set
    times: tuple[float, float] | None = None  # hardware_aware: (dense, compact) seconds per forward


def check_options(method: str, options: dict[str, Any]) -> None:
    """Check ``method``'s options (and ``convert``'s own keyword arguments among them) without a model.

    Raises ``ValueError`` naming an unknown option (with the allowed names and close matches) or a value
    outside the method's range, as ``convert`` does before it touches a model.
    """
    cls = get_method(method)
    cls.validate_options({k: v for k, v in options.items() if k not in CONVERT_ARGS})
    if "overrides" in options:
        _check_overrides(method, cls, options["overrides"], {k: v for k, v in options.items()
                                                             if k not in CONVERT_ARGS})


def _check_overrides(method: str, cls: type[CompactConv2d], overrides: Any,
                     options: dict[str, Any]) -> list[tuple[Selector, dict[str, Any]]]:
    if not isinstance(overrides or {}, dict):
        raise TypeError(f"overrides must be a dict {{selector: {{option: value}}}}, but got {type(overrides).__name__}")
    items = list((overrides or {}).items())
    for sel, ov in items:
        if not isinstance(ov, dict):
            raise TypeError(f"overrides[{sel!r}] must be a dict of options, but got {ov!r}")
        whole = [k for k in ov if k in CONVERT_ARGS]
        if whole:  # a whole-model argument in a per-layer dict would be silently ignored: say so
            raise ValueError(f"overrides[{sel!r}]: {whole[0]!r} is an argument of convert() for the whole "
                             f"model, not a per-layer option; per-layer overrides take the method's options "
                             f"(and depth_from); use include / exclude to choose layers")
        try:
            cls.validate_options(merge_options(method, options, ov))
        except ValueError as e:
            raise ValueError(f"overrides[{sel!r}]: {e}") from None
    return items


def _check_input_size(input_size: Any) -> tuple[int, ...] | None:
    if input_size is None:
        return None
    ok = isinstance(input_size, (tuple, list, torch.Size)) and len(input_size) == 4 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in input_size)
    if not ok:
        raise ValueError(f"input_size must be 4 positive ints (N, C, H, W) like (1, 3, 224, 224), "
                         f"but got {input_size!r}")
    return tuple(input_size)


_SELECTOR_TYPES = "a str pattern, an nn.Module, a module type or a callable (name, module) -> bool"


def _as_list(arg: str, sel: Selector | Iterable[Selector] | None) -> list[Selector]:
    """``include`` / ``exclude`` as a list of selectors; a wrong type or an empty list is an error."""
    if sel is None:
        return []
    if isinstance(sel, (bytes, bytearray, dict)):  # iterable, but of ints / keys: never what was meant
        raise TypeError(f"{arg} must be {_SELECTOR_TYPES}, or a list of them, but got {type(sel).__name__} {sel!r}")
    if isinstance(sel, (str, nn.Module, type)) or callable(sel) and not isinstance(sel, (list, tuple, set)):
        out = [sel]
    elif isinstance(sel, Iterable):
        out = list(sel)
        if not out:  # [] is not None: converting everything would silently ignore the argument
            raise ValueError(f"{arg}=[] selects nothing; pass {arg}=None (the default) for "
                             f"{'every layer' if arg == 'include' else 'no exclusion'}, or list selectors")
    else:
        raise TypeError(f"{arg} must be {_SELECTOR_TYPES}, or a list of them, but got "
                        f"{type(sel).__name__} {sel!r}")
    for s in out:
        if not (isinstance(s, (str, nn.Module, type)) or callable(s)):
            raise TypeError(f"{arg} selectors must be {_SELECTOR_TYPES}, but got {type(s).__name__} {s!r}")
    return out  # type: ignore[return-value]


def _find_layers(model: nn.Module) -> tuple[list[_Layer], dict[int, list[str]]]:
    """Every conv layer (plain convs and compact convs, not the parts of a compact conv), by module object.

    Also returns every module's names (``id -> names``), for module-object selectors.
    """
    layers: dict[int, _Layer] = {}
    names_of: dict[int, list[str]] = {id(model): [""]}

    def walk(parent: nn.Module, prefix: str) -> None:
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            names_of.setdefault(id(child), []).append(name)
            if isinstance(child, (nn.Conv2d, CompactConv2d)):
                lay = layers.setdefault(id(child), _Layer(child))
                lay.names.append(name)
                lay.sites.append((parent, attr))
                continue  # a conv's children (parametrizations, a compact conv's parts) are not layers
            walk(child, name)

    walk(model, "")
    return list(layers.values()), names_of


def _matches(sel: Selector, layer: _Layer, names_of: dict[int, list[str]]) -> bool:
    return selector_matches(sel, layer.names, layer.module, names_of)


def selector_matches(sel: Selector, names: Sequence[str], module: nn.Module, names_of: dict[int, list[str]],
                     arg: str = "include/exclude/overrides") -> bool:
    """Whether selector ``sel`` picks the conv ``module`` reached under ``names``.

    A str is an fnmatch pattern of a name; an ``nn.Module`` picks the convs inside it (``names_of``: every
    module's names, ``id -> names``, as ``model.named_modules(remove_duplicate=False)`` gives them); a type
    picks its instances; a callable is called as ``sel(name, module) -> bool``. Shared by ``convert`` and
    ``compress`` so both read selectors alike.
    """
    if isinstance(sel, str):
        return any(fnmatch.fnmatchcase(n, sel) for n in names)
    if isinstance(sel, nn.Module):
        roots = names_of.get(id(sel), [])
        return any(r == "" or n == r or n.startswith(r + ".") for r in roots for n in names)
    if isinstance(sel, type):  # before callable: a class is callable, and Conv2d(name, module) would build one
        return isinstance(module, sel)
    if callable(sel):
        try:
            return any(bool(sel(n, module)) for n in names)
        except TypeError as e:  # most often a selector that does not take (name, module)
            raise TypeError(f"selector {sel!r} raised TypeError ({e}); a callable {arg} "
                            f"selector is called as sel(name, module) -> bool") from e
    raise TypeError(f"{arg} selectors must be str, nn.Module, type or callable, but got {sel!r}")


def _trace(model: nn.Module, layers: list[_Layer], input_size: Sequence[int]) -> None:
    """Record every call's input and output shape of every layer, for one forward at ``input_size``."""
    hooks = []

    def record(lay: _Layer) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if inp and isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor):
                lay.calls.append((inp[0].shape, out.shape))  # a hook must return None (else it replaces out)

        return hook

    for lay in layers:
        lay.calls.clear()
        hooks.append(lay.module.register_forward_hook(record(lay)))
    try:
        _run(model, input_size)
    except Exception as e:
        raise ValueError(f"the model's forward at input_size={tuple(input_size)} failed before any layer was "
                         f"swapped ({type(e).__name__}: {e}); the model is unchanged") from e
    finally:
        for h in hooks:
            h.remove()


def _run(model: nn.Module, input_size: Sequence[int]) -> None:
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else None
    x = torch.zeros(*input_size, device=p.device if p is not None else None, dtype=dtype)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)


def _per_image(shape: torch.Size) -> tuple[int, ...]:
    return (1, *shape[1:]) if len(shape) == 4 else tuple(shape)


def _conv_macs(conv: nn.Conv2d, out_shape: torch.Size) -> int:
    """``H_out W_out C_out (C_in / groups) k_h k_w`` per image, from the recorded output shape."""
    kh, kw = conv.kernel_size
    return math.prod(_per_image(out_shape)) * (conv.in_channels // conv.groups) * kh * kw


def _module_macs(module: nn.Module, in_shape: torch.Size, cache: dict[tuple[int, tuple[int, ...]], int]) -> int:
    from compconv.profile import profile

    key = (id(module), _per_image(in_shape))
    if key not in cache:
        cache[key] = profile(module, key[1]).total_macs
    return cache[key]


def _swap(sites: list[tuple[nn.Module, str]], new: nn.Module) -> None:
    for parent, attr in sites:
        setattr(parent, attr, new)


def convert(
    model: nn.Module,
    method: str = "compconv",
    *,
    include: Selector | Iterable[Selector] | None = None,
    exclude: Selector | Iterable[Selector] | None = None,
    overrides: dict[Any, dict[str, Any]] | None = None,
    keep_stem: bool = True,
    convert_1x1: bool = True,
    input_size: Sequence[int] | None = None,
    return_report: bool = False,
    verbose: bool = False,
    hardware_aware: bool = False,
    timer: Callable[[str, nn.Module, torch.Tensor], float] | None = None,
    **method_options: Any,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace the eligible ``nn.Conv2d`` layers of ``model`` by ``method``'s module, in place.

    Args:
        model: any ``nn.Module``; its own type is kept (layers are swapped inside it).
        method: a registered method name (``compconv.list_methods()``).
        include, exclude: selectors (see the module docstring); ``exclude`` wins.
        overrides: ``{selector: {option: value}}`` per-layer method options (e.g. ``{"layer4.*": {"depth": 3}}``);
            setting ``depth`` replaces a global ``c0`` there (and ``c0`` a ``depth``; SlimConv: ``split``/``k``).
        keep_stem: keep the model's first conv (the paper keeps Conv1; a 3-channel input also cannot feed
            CompConv's identity slices).
        convert_1x1: also convert 1x1 convs (the paper converts "all convolutions" of ResNet-50).
        input_size: ``(N, C, H, W)``, e.g. ``(1, 3, 224, 224)``. When given, the report has per-layer MACs
            (per image, every call summed) and, after the swap, every converted layer's output shape is
            checked against the original's.
        return_report: return ``(model, ConversionReport)`` instead of the model.
        verbose: print the report.
        hardware_aware: time each layer to be converted against its dense conv on this machine at
            ``input_size`` (required) and keep the layers whose compact form is not faster; the report gives
            both timings (``compconv.hardware_aware``). Layers are timed on the model's device, in its dtype
            and in its weights' memory format (``model.to(memory_format=torch.channels_last)``: channels_last
            inputs; ``compconv.hardware_aware.model_memory_format``), so move the model where and as it will
            run first; a model on the meta device is refused. Then the whole converted model is timed
            against its source and, while it is slower, its least-gaining layers are reverted (bisection).
        timer: ``timer(name, module, x) -> seconds per call`` for ``hardware_aware`` (default
            ``torch.utils.benchmark``'s ``blocked_autorange`` median); called with ``name=""`` for the whole
            model (e.g. deploy and compile it there to judge the model as it will run); tests pass a stub.
        **method_options: the method's hyper-parameters (CompConv: ``c0``, ``depth``, ``identity``, ...,
            plus ``depth_from="c_in" | "c_out" | "block"``, see ``docs/compconv.md``).

    Returns:
        ``model`` (converted in place), or ``(model, report)``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; a selector or override has the wrong type.
        ValueError: an unknown method or option, an option value outside the method's range, a selector
            that matches no conv layer, a model with no conv layer, a binarized model (convert, then
            ``binarize``), a bad ``input_size``, ``hardware_aware`` on a meta-device model, a timer that
            returns no finite seconds >= 0, or (after the
            swap, which is then undone) a converted layer whose output shape differs from the original's.
        TypeError, RuntimeError: the ``hardware_aware`` timer raised (naming the layer and its signature).

    Warns:
        UserWarning: when no layer was converted, or when the conversion raises the conv layers' params or
        (with ``input_size``) MACs; the message gives the totals before -> after.
    """
    # -- 1. every argument, before the model is looked at -------------------------------------------
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}")
    from compconv.binary.transform import binary_layers

    binary = binary_layers(model)
    if binary:  # the walk would swap a binary conv's latent conv for a compact one, which it cannot run
        raise ValueError(f"model is binarized ({len(binary)} BinaryConv2d, e.g. {binary[0]!r}): convert first, "
                         f"then binarize (Bin-Comp = compconv.binarize(compconv.convert(model, {method!r})))")
    cls = get_method(method)
    cls.validate_options(method_options)
    override_items = _check_overrides(method, cls, overrides, method_options)
    check_bool("keep_stem", keep_stem)
    check_bool("convert_1x1", convert_1x1)
    size = _check_input_size(input_size)
    check_bool("hardware_aware", hardware_aware)
    if hardware_aware and size is None:
        raise ValueError("hardware_aware=True times every layer at input_size, which is missing: pass "
                         "input_size=(N, C, H, W), e.g. (1, 3, 224, 224)")
    if timer is not None and (not callable(timer) or not hardware_aware):
        raise (TypeError if not callable(timer) else ValueError)(
            f"timer must be a callable timer(name, module, x) -> seconds, used with hardware_aware=True, "
            f"but got timer={timer!r} with hardware_aware={hardware_aware}")
    if hardware_aware and any(not is_lazy(t) and t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError("hardware_aware=True times every layer on this machine, but the model is on the meta "
                         "device (its weights hold no data, so nothing can run): move it to the device it will "
                         "run on (e.g. model.to_empty(device='cpu') and load its weights) first, or convert "
                         "without hardware_aware")
    opts_global = dict(method_options)
    includes, excludes = _as_list("include", include), _as_list("exclude", exclude)

    # -- 2. the layers and every selector's matches (an unmatched selector is an error) -------------
    layers, names_of = _find_layers(model)
    if not layers:
        if isinstance(model, (nn.Conv2d, CompactConv2d)):
            raise ValueError(f"convert swaps the conv layers inside a model, but model is itself a "
                             f"{type(model).__name__}; wrap it (nn.Sequential(conv)) or use "
                             f"get_method({method!r}).from_conv(conv)")
        raise ValueError("model has no nn.Conv2d layers to convert")
    selectors = [*includes, *excludes, *(k for k, _ in override_items)]
    hits = {id(s): [_matches(s, lay, names_of) for lay in layers] for s in selectors}
    unused: list[Selector] = []
    for s_ in selectors:  # a name in both include and overrides is one unmatched selector, listed once
        if not any(hits[id(s_)]) and not any(s_ is u or (isinstance(s_, str) and s_ == u) for u in unused):
            unused.append(s_)
    if unused:
        more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
        raise ValueError(f"include/exclude/overrides selector(s) matched no conv layer: {unused[:8]!r}{more} "
                         f"(conv names look like {layers[min(1, len(layers) - 1)].names[0]!r})")

    # -- 3. trace, then decide every layer and build every replacement ------------------------------
    if size is not None:
        _trace(model, layers, size)
    decisions = [_decide(i, lay, model, cls, method, opts_global, includes, excludes,
                         override_items, hits, keep_stem, convert_1x1) for i, lay in enumerate(layers)]
    from compconv.hardware_aware import judge_timed, model_memory_format, time_module

    layout = model_memory_format(model)
    if layout == torch.channels_last:  # replacements follow the model's layout (and are timed in it)
        for d in decisions:
            if d.new is not None:
                d.new.to(memory_format=layout)  # type: ignore[call-overload]
    if hardware_aware:  # keep every layer whose compact form is not faster here (both timings reported)
        for d in (d for d in decisions if d.new is not None):
            keep, text, d.times = judge_timed(d.layer.names[0], d.layer.module, d.new,
                                              [i for i, _ in d.layer.calls], timer, memory_format=layout)
            if keep:
                d.reason, d.new = text, None
            else:
                d.note = "; ".join(x for x in (d.note, text) if x)

    # -- 4. apply, run the method's network-level steps, check the output shapes (undo on failure) --
    todo = [d for d in decisions if d.new is not None]
    t_source = time_module("", model, [size], timer, memory_format=layout) if hardware_aware and todo else None
    try:
        for d in todo:
            _swap(d.layer.sites, d.new)  # type: ignore[arg-type]
        if todo:
            cls.finalize_conversion(model, [d.layer.names[0] for d in todo], **method_options,
                                    layer_options={d.layer.names[0]: d.overridden for d in todo})
        if size is not None and todo:
            _check_shapes(model, todo, size)
        if t_source is not None:  # -- 5. the whole model must not be slower than its source either
            _whole_model_guard(model, cls, method_options, todo, size, timer, layout, t_source)
    except BaseException:
        for d in todo:
            _swap(d.layer.sites, d.layer.module)
        raise

    report = _report(method, decisions, size)
    _warn_if_pointless(report, method)
    if verbose:
        print(report)
    return (model, report) if return_report else model


def _whole_model_guard(model: nn.Module, cls: type[CompactConv2d], method_options: dict[str, Any],
                       todo: list[_Decision], size: tuple[int, ...], timer: Any, layout: torch.memory_format,
                       t_source: float) -> None:
    """Revert the least-gaining layers while the converted model is slower than its source (whole-model
    timings, ``hardware_aware.whole_model_guard``); reverted layers are reported as kept with the timings."""
    from compconv.hardware_aware import whole_model_guard

    def gain(d: _Decision) -> float:  # relative time saved by the layer's compact form
        return 0.0 if not d.times or d.times[0] <= 0 else (d.times[0] - d.times[1]) / d.times[0]

    # layers the forward does not reach at input_size (not timed) cost nothing there: never reverted
    order = sorted((d for d in todo if d.times is not None), key=gain)

    def set_converted(k: int) -> None:  # the first k of ``order`` back to their dense convs
        for i, d in enumerate(order):
            _swap(d.layer.sites, d.layer.module if i < k else d.new)  # type: ignore[arg-type]
        reverted = {id(d) for d in order[:k]}
        kept = [d for d in todo if id(d) not in reverted]
        if kept:
            cls.finalize_conversion(model, [d.layer.names[0] for d in kept], **method_options,
                                    layer_options={d.layer.names[0]: d.overridden for d in kept})

    k, t_conv, t_final = whole_model_guard(model, size, [(d.layer.names[0], gain(d)) for d in order],
                                           set_converted, t_source, timer, memory_format=layout)
    ms = lambda t: f"{1e3 * t:.3g} ms"  # noqa: E731
    for d in order[:k]:
        d.reason = (f"kept (hardware_aware, whole model): converted model {ms(t_conv)} > source {ms(t_source)}; "
                    f"reverting the {k} least-gaining layer(s) gives {ms(t_final)}"
                    + (f" ({d.note})" if d.note else ""))
        d.new = None
    todo[:] = [d for d in todo if d.new is not None]


def _decide(index: int, lay: _Layer, model: nn.Module, cls: type[CompactConv2d], method: str,
            opts_global: dict[str, Any], includes: list[Selector], excludes: list[Selector],
            override_items: list[tuple[Selector, dict[str, Any]]], hits: dict[int, list[bool]],
            keep_stem: bool, convert_1x1: bool) -> _Decision:
    """What happens to one layer (rules 0-7 of the module docstring); builds the replacement, swaps nothing."""
    m = lay.module
    opts = dict(opts_global)
    overridden: set[str] = set()
    for sel, ov in override_items:
        if hits[id(sel)][index]:
            opts = merge_options(method, opts, ov)
            overridden = set(ov)
            break
    depth_from = opts.pop("depth_from", "c_in")  # the converter's option, per layer: not the module's
    d = _Decision(lay, opts, overridden=overridden)
    if isinstance(m, CompactConv2d):
        d.reason = f"already converted ({type(m).__name__})"
    elif any(hits[id(s)][index] for s in excludes):
        d.reason = "excluded"
    elif keep_stem and index == 0:
        d.reason = "stem conv (keep_stem=True)"
    elif includes and not any(hits[id(s)][index] for s in includes):
        d.reason = "not included"
    if d.reason:
        return d
    view, why = plain_conv_view(m)
    if view is None:
        d.reason = why
        return d
    d.note = why
    if not convert_1x1 and view.kernel_size == (1, 1):
        d.reason = "1x1 conv (convert_1x1=False)"
        return d
    if method == "compconv" and depth_from != "c_in" and opts.get("depth") is None:
        opts["depth_channels"] = _depth_channels(model, lay.names[0], view, depth_from)
    opts, note = cls.resolve_hparams(view, **opts)
    d.opts = opts
    d.note = "; ".join(x for x in (d.note, note) if x)
    why_not = cls.ineligible_reason(view, **opts)
    if why_not:
        d.reason = why_not
        return d
    new = cls.from_conv(view, **opts)
    new.train(m.training)
    d.new = new
    return d


def _check_shapes(model: nn.Module, todo: list[_Decision], size: Sequence[int]) -> None:
    """One forward with the replacements in place: each must give the original's output shape at every call."""
    seen: dict[int, list[torch.Size]] = {id(d.new): [] for d in todo}
    hooks = []
    for d in todo:
        def hook(mod: nn.Module, inp: Any, out: Any, key: int = id(d.new)) -> None:
            seen[key].append(out.shape if isinstance(out, torch.Tensor) else None)

        hooks.append(d.new.register_forward_hook(hook))  # type: ignore[union-attr]
    failure: Exception | None = None
    try:
        _run(model, size)
    except Exception as e:  # a wrong shape often surfaces downstream (a residual add): name the layer first
        failure = e
    finally:
        for h in hooks:
            h.remove()
    for d in todo:
        after = seen[id(d.new)]
        before = [o for _, o in d.layer.calls][: len(after) if failure is not None else None]
        if before != after:
            raise ValueError(
                f"layer {d.layer.names[0]!r}: the {type(d.new).__name__} gives output shape(s) "
                f"{[tuple(s) for s in after]} where the original gave {[tuple(s) for s in before]} at "
                f"input_size={tuple(size)}; the model was restored (exclude this layer to convert the rest)"
            ) from failure
    if failure is not None:
        raise ValueError(f"the converted model's forward at input_size={tuple(size)} failed ({failure}); the "
                         "model was restored. Exclude the layers involved or report a bug") from failure


def _report(method: str, decisions: list[_Decision], size: tuple[int, ...] | None) -> ConversionReport:
    cache: dict[tuple[int, tuple[int, ...]], int] = {}
    records = []
    for d in decisions:
        m, lay = d.layer.module, d.layer
        params = _count_params(m)
        rec = LayerChange(
            name=lay.names[0], c_in=m.in_channels, c_out=m.out_channels,  # type: ignore[arg-type]
            kernel=tuple(m.kernel_size), stride=tuple(m.stride),  # type: ignore[arg-type]
            groups=int(getattr(m, "groups", 1)), action="kept", reason=d.reason, method=method,
            options={k: v for k, v in d.opts.items() if _jsonable(v)}, params_before=params,
            params_after=params, aliases=lay.names[1:], depth=getattr(m, "depth", None),
            c_prim=getattr(m, "c_prim", None),
        )
        if size is not None:
            rec.calls = len(lay.calls)
            if lay.calls:
                rec.macs_before = sum(_conv_macs(m, o) if isinstance(m, nn.Conv2d) else _module_macs(m, i, cache)
                                      for i, o in lay.calls)
                rec.macs_after = rec.macs_before
        if d.new is not None:
            rec.action, rec.reason = "converted", d.note or "converted"
            rec.params_after = _count_params(d.new)
            rec.depth = getattr(d.new, "depth", None)
            rec.c_prim = getattr(d.new, "c_prim", None)
            if size is not None and lay.calls:
                rec.macs_after = sum(_module_macs(d.new, i, cache) for i, _ in lay.calls)
        records.append(rec)
    return ConversionReport(method, records, size)


def _warn_if_pointless(report: ConversionReport, method: str) -> None:
    """Say loudly when nothing was converted, or when the conversion costs more than the original."""
    t = report.totals()
    n = len(report.layers)
    if not report.converted:
        reasons: dict[str, int] = {}
        for r in report.layers:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        top = "; ".join(f"{c} x {why}" for why, c in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        warnings.warn(f"convert(method={method!r}) converted 0 of {n} conv layers; the model is unchanged "
                      f"(kept: {top})", UserWarning, stacklevel=3)
        return
    params = f"conv params {t['params_before']:,} -> {t['params_after']:,}"
    if t["macs_before"] is not None:  # MACs known: they decide
        grew = [f"conv MACs at {report.input_size} {t['macs_before']:,} -> {t['macs_after']:,}", params]
        worse = t["macs_after"] > t["macs_before"]  # type: ignore[operator]
    else:  # params are the only cost known without input_size
        grew = [params + " (pass input_size to see MACs)"]
        worse = t["params_after"] > t["params_before"]  # type: ignore[operator]
    if worse:
        rows = sorted((r for r in report.converted if r.macs_before is not None),
                      key=lambda r: r.macs_before - r.macs_after)[:3]  # type: ignore[operator]
        worst = ", ".join(f"{r.name} {r.macs_before:,} -> {r.macs_after:,}" for r in rows
                          if r.macs_after > r.macs_before)  # type: ignore[operator]
        warnings.warn(f"convert(method={method!r}) made the model more expensive: {'; '.join(grew)}"
                      + (f" (largest MAC increases: {worst})" if worst else ""), UserWarning, stacklevel=3)


def _count_params(m: nn.Module) -> int:
    fn = getattr(m, "count_params", None)
    if callable(fn):
        return int(fn())
    # an uninitialised lazy parameter has no size yet: it counts 0 (the report says why it was kept)
    return sum(0 if isinstance(p, nn.parameter.UninitializedParameter) else p.numel() for p in m.parameters())


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None), list, tuple))


def _depth_channels(model: nn.Module, name: str, conv: nn.Conv2d, depth_from: str) -> int:
    """The channel count Eq. 6 reads: C_out, or the residual block's width (its ``conv2`` input)."""
    if depth_from == "c_out":
        return conv.out_channels
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):  # nearest enclosing module with a dense conv2 = a ResNet block
        block = model.get_submodule(".".join(parts[:i]))
        c2 = getattr(block, "conv2", None)
        if isinstance(c2, (nn.Conv2d, CompactConv2d)):
            return c2.in_channels
    return conv.in_channels
