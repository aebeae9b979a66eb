"""Plug-and-play conversion: swap a model's ``nn.Conv2d`` layers for a compact convolution, in place.

    model = torchvision.models.resnet50()
    model, report = compconv.convert(model, "compconv", c0=128, return_report=True)
    print(report)

Rules, in the order they are applied to every ``nn.Conv2d`` (the report says which one decided):

1. ``exclude`` matches -> kept ("excluded");
2. the stem (the first conv registered in the model) -> kept when ``keep_stem`` (the paper keeps Conv1);
3. ``include`` given and does not match -> kept ("not included");
4. 1x1 convs -> kept when ``convert_1x1=False``;
5. per-layer ``overrides`` update the method options (first matching pattern wins);
6. the method adapts its options to the layer (``resolve_hparams``: e.g. CompConv picks d by Eq. 6 and
   lowers it when the layer is too narrow), then says whether it can replace it (``ineligible_reason``:
   e.g. CompConv keeps depthwise/grouped convs).

``include`` / ``exclude`` accept fnmatch patterns of dotted module names, module objects (a module and
its children), module types, or callables ``(name, module) -> bool``; a pattern that matches nothing is
an error (a typo must not silently convert nothing).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from compconv.layers.base import CompactConv2d, get_method

__all__ = ["ConversionReport", "LayerChange", "convert"]

Selector = str | nn.Module | type | Callable[[str, nn.Module], bool]


@dataclass
class LayerChange:
    """What happened to one ``nn.Conv2d``: converted (with the method's choices) or kept, and why.

    ``macs_*`` are per image at ``input_size`` when it was given (else None); ``params_*`` count every
    parameter of the layer before and after.
    """

    name: str
    c_in: int
    c_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    action: str  # "converted" | "kept"
    reason: str
    method: str
    options: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    depth: int | None = None
    c_prim: int | None = None


class ConversionReport:
    """Per-layer record of a conversion, with totals; ``str(report)`` is a readable table."""

    def __init__(self, method: str, layers: list[LayerChange], input_size: tuple[int, ...] | None) -> None:
        self.method = method
        self.layers = layers
        self.input_size = input_size

    @property
    def converted(self) -> list[LayerChange]:
        return [r for r in self.layers if r.action == "converted"]

    @property
    def kept(self) -> list[LayerChange]:
        return [r for r in self.layers if r.action == "kept"]

    def totals(self) -> dict[str, int | None]:
        """Sums over the convolutions (not the whole model: BN, linear layers are not in this report)."""

        def tot(key: str) -> int | None:
            vals = [getattr(r, key) for r in self.layers]
            return None if any(v is None for v in vals) else int(sum(vals))

        return {k: tot(k) for k in ("params_before", "params_after", "macs_before", "macs_after")}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "input_size": list(self.input_size) if self.input_size else None,
            "layers": [asdict(r) for r in self.layers],
            "totals": self.totals(),
        }

    def table(self) -> str:
        has_macs = self.input_size is not None
        head = ["layer", "C_in", "C_out", "k", "s", "action", "d", "C_prim", "params", "->"]
        if has_macs:
            head += ["MACs", "->"]
        head += ["why"]
        rows = []
        for r in self.layers:
            row = [r.name, str(r.c_in), str(r.c_out), "x".join(map(str, r.kernel)), str(r.stride[0]), r.action,
                   "-" if r.depth is None else str(r.depth), "-" if r.c_prim is None else str(r.c_prim),
                   f"{r.params_before:,}", f"{r.params_after:,}"]
            if has_macs:
                row += [f"{r.macs_before:,}", f"{r.macs_after:,}"]
            row += [r.reason]
            rows.append(row)
        widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        t = self.totals()
        summary = (f"method={self.method}: {len(self.converted)} converted, {len(self.kept)} kept; "
                   f"conv params {t['params_before']:,} -> {t['params_after']:,}")
        if has_macs:
            summary += (f"; conv MACs at {tuple(self.input_size or ())} {t['macs_before']:,} -> "
                        f"{t['macs_after']:,} (MACs = multiply-accumulates)")
        return "\n".join(lines + [summary])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"ConversionReport(method={self.method!r}, converted={len(self.converted)}, kept={len(self.kept)})"


def _as_list(sel: Selector | Iterable[Selector] | None) -> list[Selector]:
    if sel is None:
        return []
    if isinstance(sel, (str, nn.Module, type)) or callable(sel) and not isinstance(sel, (list, tuple, set)):
        return [sel]  # type: ignore[list-item]
    return list(sel)  # type: ignore[arg-type]


def _matches(sel: Selector, name: str, module: nn.Module, owners: dict[int, set[str]]) -> bool:
    if isinstance(sel, str):
        return fnmatch.fnmatchcase(name, sel)
    if isinstance(sel, nn.Module):
        return name in owners.get(id(sel), set())
    if isinstance(sel, type):
        return isinstance(module, sel)
    if callable(sel):
        return bool(sel(name, module))
    raise TypeError(f"include/exclude/overrides keys must be str, nn.Module, type or callable, but got {sel!r}")


def _conv_io_shapes(model: nn.Module, input_size: Sequence[int]) -> dict[str, tuple[torch.Size, torch.Size]]:
    """Input and output shapes of every Conv2d for one forward pass at ``input_size`` (eval mode, no grad)."""
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
    hooks = []

    def record(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            shapes.setdefault(name, (inp[0].shape, out.shape))  # a hook must return None (else it replaces out)

        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(record(name)))
    p = next(model.parameters(), None)
    x = torch.zeros(*input_size, device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None else None)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def _layer_macs(module: nn.Module, in_shape: torch.Size) -> int:
    from compconv.profile import profile

    return profile(module, (1, *in_shape[1:])).total_macs


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
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
    **method_options: Any,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace the eligible ``nn.Conv2d`` layers of ``model`` by ``method``'s module, in place.

    Args:
        model: any ``nn.Module``; its own type is kept (layers are swapped inside it).
        method: a registered method name (``compconv.list_methods()``).
        include, exclude: selectors (see the module docstring); ``exclude`` wins.
        overrides: ``{selector: {option: value}}`` per-layer method options (e.g. ``{"layer4.*": {"depth": 3}}``).
        keep_stem: keep the model's first conv (the paper keeps Conv1; a 3-channel input also cannot feed
            CompConv's identity slices).
        convert_1x1: also convert 1x1 convs (the paper converts "all convolutions" of ResNet-50).
        input_size: e.g. ``(1, 3, 224, 224)``; when given the report has per-layer MACs.
        return_report: return ``(model, ConversionReport)`` instead of the model.
        verbose: print the report.
        **method_options: the method's hyper-parameters (CompConv: ``c0``, ``depth``, ``identity``, ...,
            plus ``depth_from="c_in" | "c_out" | "block"``, see ``docs/compconv.md``).

    Returns:
        ``model`` (converted in place), or ``(model, report)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}")
    cls = get_method(method)
    includes, excludes = _as_list(include), _as_list(exclude)
    if not isinstance(overrides or {}, dict):
        raise TypeError(f"overrides must be a dict {{selector: {{option: value}}}}, but got {type(overrides).__name__}")
    override_items = list((overrides or {}).items())
    depth_from = method_options.pop("depth_from", "c_in")
    if depth_from not in ("c_in", "c_out", "block"):
        raise ValueError(f"depth_from must be one of ('c_in', 'c_out', 'block'), but got {depth_from!r}")
    if depth_from != "c_in" and method != "compconv":
        raise ValueError(f"depth_from applies to method='compconv' only, but method={method!r}")

    # Which names each module object "owns" (itself and its children), for module-object selectors.
    owners: dict[int, set[str]] = {}
    named = list(model.named_modules())
    for name, m in named:
        for sub_name, _ in m.named_modules(prefix=name):
            owners.setdefault(id(m), set()).add(sub_name)

    # Convs inside an existing compact conv are its parts, not candidates.
    inner: set[str] = set()
    for name, m in named:
        if isinstance(m, CompactConv2d):
            inner |= {n for n, _ in m.named_modules(prefix=name) if n != name}
    convs = [(n, m) for n, m in named if isinstance(m, nn.Conv2d) and n not in inner and n]
    if not convs:
        raise ValueError("model has no nn.Conv2d layers to convert")
    stem_name = convs[0][0]

    used: dict[int, bool] = {}
    for sel in [*includes, *excludes, *(k for k, _ in override_items)]:
        used[id(sel)] = False

    def hit(sel: Selector, name: str, m: nn.Module) -> bool:
        ok = _matches(sel, name, m, owners)
        if ok:
            used[id(sel)] = True
        return ok

    shapes = _conv_io_shapes(model, input_size) if input_size is not None else {}
    records: list[LayerChange] = []
    for name, conv in convs:
        opts: dict[str, Any] = dict(method_options)
        reason = ""
        excluded = any([hit(s, name, conv) for s in excludes])
        included = not includes or any([hit(s, name, conv) for s in includes])
        for sel, ov in override_items:
            if hit(sel, name, conv):
                if not isinstance(ov, dict):
                    raise TypeError(f"overrides[{sel!r}] must be a dict of options, but got {ov!r}")
                opts.update(ov)
                break
        if excluded:
            reason = "excluded"
        elif keep_stem and name == stem_name:
            reason = "stem conv (keep_stem=True)"
        elif not included:
            reason = "not included"
        elif not convert_1x1 and conv.kernel_size == (1, 1):
            reason = "1x1 conv (convert_1x1=False)"
        note = ""
        if not reason:
            if method == "compconv" and depth_from != "c_in" and opts.get("depth") is None:
                opts["depth_channels"] = _depth_channels(model, name, conv, depth_from)
            opts, note = cls.resolve_hparams(conv, **opts)
            why_not = cls.ineligible_reason(conv, **opts)
            if why_not:
                reason = why_not
        params_before = sum(p.numel() for p in conv.parameters())
        rec = LayerChange(
            name=name, c_in=conv.in_channels, c_out=conv.out_channels, kernel=tuple(conv.kernel_size),
            stride=tuple(conv.stride), groups=conv.groups, action="kept", reason=reason, method=method,
            options={k: v for k, v in opts.items() if _jsonable(v)}, params_before=params_before,
            params_after=params_before,
        )
        if name in shapes:
            rec.macs_before = rec.macs_after = _layer_macs(conv, shapes[name][0])
        if not reason:
            new = cls.from_conv(conv, **opts)
            new.train(conv.training)
            _set_submodule(model, name, new)
            rec.action, rec.reason = "converted", note or "converted"
            rec.params_after = _count_params(new)
            rec.depth = getattr(new, "depth", None)
            rec.c_prim = getattr(new, "c_prim", None)
            if name in shapes:
                rec.macs_after = _layer_macs(new, shapes[name][0])
        records.append(rec)

    converted = [r.name for r in records if r.action == "converted"]
    if converted:
        cls.finalize_conversion(model, converted, **method_options)
    unused = [s for s in [*includes, *excludes, *(k for k, _ in override_items)] if not used[id(s)]]
    if unused:
        raise ValueError(f"include/exclude/overrides selector(s) matched no conv layer: {unused!r} "
                         f"(conv names look like {convs[min(1, len(convs) - 1)][0]!r})")
    report = ConversionReport(method, records, tuple(input_size) if input_size is not None else None)
    if verbose:
        print(report)
    return (model, report) if return_report else model


def _count_params(m: nn.Module) -> int:
    fn = getattr(m, "count_params", None)
    return int(fn()) if callable(fn) else sum(p.numel() for p in m.parameters())


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
        if isinstance(c2, nn.Conv2d):
            return c2.in_channels
        if isinstance(c2, CompactConv2d):
            return c2.in_channels
    return conv.in_channels
