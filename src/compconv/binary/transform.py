"""``binarize(model)``: XNOR-Net binarization of a model's convolutions, in place, with a per-layer report.

    model = compconv.binarize(compconv.get_model("cifar_vgg16"))                        # Bin-VGG16
    model = compconv.binarize(compconv.convert(compconv.get_model("cifar_vgg16"), "compconv", c0=128))  # Bin-Comp
    model, report = compconv.binarize(model, return_report=True); print(report)

Every 2-D convolution (``nn.Conv2d`` and compconv's ``PadAnyConv2d`` / ``DepthwiseConv2d``) is replaced by a
:class:`~compconv.binary.conv.BinaryConv2d` wrapping it: binary weights with one real scale per filter, binary
inputs behind a BatchNorm (XNOR-Net's ``BN -> sign -> binary conv`` order). The walk goes *into* compact convs,
so a CompConv2d's ``W_i`` convs and depthwise tail, a Ghost module's primary and cheap convs, HetConv's grouped
``K x K`` and ``1 x 1`` convs (``impl="exact"``), SlimConv's convs (not its SE gate's 1x1 convs: rule 4b) and
XSepConv's three depthwise convs are binarized one by one; their identity slices, concatenations, channel
shuffles, gathers and sums are not multiplies and stay as they are. So Bin-Comp is
``binarize(convert(model, "compconv"))``; converting after binarizing is refused by ``convert``.

Rules, in the order they decide each layer (the report says which one did):

1. ``nn.Linear`` -> kept: XNOR-Net keeps the last (classifier) layer real; ``binarize`` binarizes convolutions.
2. the stem (the first conv layer registered in the model, all of it if it is a compact conv) -> kept when
   ``keep_stem`` (XNOR-Net keeps the first layer real: its input is the image, 3 channels);
3. the classifier (the last conv/linear layer registered, when it is a conv) -> kept when ``keep_classifier``;
4. ``keep`` matches -> kept;
4b. a squeeze-excitation gate's 1x1 conv (on a globally pooled 1x1 map: a fully connected layer, as rule 1)
   -> kept when ``keep_se`` (default True); see :func:`_se_gate_convs` for how they are recognised;
5. a module that counts itself for ``compconv.profile`` (HetConv ``impl="masked"/"dense"``, which applies its
   own weight tensors with ``F.conv2d``) -> kept whole, with the reason;
6. not a 2-D conv, a conv subclass whose ``forward`` may differ (timm ``StdConv2d``, QAT convs, ...), a
   parametrized or hooked conv, an uninitialised lazy conv -> kept, with the reason;
7. otherwise -> binarized.

Registration order is not always forward order (a model may register its head first): check the report's
stem and classifier rows, or name layers with ``keep``. A model with nothing to binarize, a ``keep`` selector
that matches no layer, or an already binarized model is an error (never a silent no-op).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from compconv.binary.conv import BinaryConv2d, check_flag
from compconv.binary.report import BinarizationReport, LayerBinarization

__all__ = ["apply_binarization", "binarize", "binary_layers", "binary_spec", "spec_difference"]

Selector = str | nn.Module | type | Callable[[str, nn.Module], bool]
_OPTIONS = ("keep", "keep_stem", "keep_classifier", "keep_se", "input_bn", "input_scale", "return_report", "verbose")
_LAYER_OPTIONS = ("input_bn", "input_scale")
_LAYER_DEFAULTS = {"input_bn": True, "input_scale": False}  # BinaryConv2d's and binarize's defaults


@dataclass
class _Layer:
    """One conv / linear module object: every name and (parent, attribute) it is registered at."""

    module: nn.Module
    unit: str  # the model-level layer it belongs to (a compact conv, or itself)
    unit_index: int
    names: list[str] = field(default_factory=list)
    sites: list[tuple[nn.Module, str]] = field(default_factory=list)
    self_counting: bool = False


def binary_layers(model: nn.Module) -> list[str]:
    """Names of the ``BinaryConv2d`` modules of ``model`` (first name of each), in registration order."""
    return [n for n, m in model.named_modules() if isinstance(m, BinaryConv2d)]


def binary_spec(model: nn.Module) -> dict[str, dict[str, bool]]:
    """``{name: options}`` of every ``BinaryConv2d`` in ``model``: what :func:`apply_binarization` rebuilds."""
    return {n: m.options() for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}


def spec_difference(recorded: dict[str, dict[str, Any]], model: nn.Module) -> str:
    """'' when ``model``'s binarized layers and their options are the ``recorded`` ones, else the first difference.

    The options (``input_scale`` above all: ``K`` has no tensor) are not in a state_dict, so weights that load
    without error can still run under other options; callers that load a binarized file's weights into a
    model binarized otherwise check this.
    """
    own = binary_spec(model)
    for name, opts in recorded.items():
        want = {**_LAYER_DEFAULTS, **{k: bool(v) for k, v in opts.items()}}
        if name not in own:
            return f"layer {name!r} is binarized in the file, not in the model"
        if own[name] != want:
            return f"layer {name!r} has {want} in the file, {own[name]} in the model"
    extra = [n for n in own if n not in recorded]
    return f"layer {extra[0]!r} is binarized in the model, not in the file" if extra else ""


def _is_unit(m: nn.Module) -> bool:
    from compconv.layers.base import CompactConv2d

    return isinstance(m, _ConvNd | CompactConv2d | nn.Linear)


def _self_counting(m: nn.Module) -> bool:
    return callable(getattr(m, "count_macs", None)) and not isinstance(m, BinaryConv2d)


def _find_layers(model: nn.Module) -> tuple[list[_Layer], dict[int, list[str]], int]:
    """Every conv and linear layer (into compact convs) by module object; names of every module; unit count."""
    layers: dict[int, _Layer] = {}
    names_of: dict[int, list[str]] = {id(model): [""]}
    units: dict[int, int] = {}

    def walk(parent: nn.Module, prefix: str, unit: tuple[str, int] | None) -> None:
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            names_of.setdefault(id(child), []).append(name)
            here = unit
            is_layer = isinstance(child, _ConvNd | nn.Linear) or _self_counting(child)
            if here is None and (is_layer or _is_unit(child)):
                here = (name, units.setdefault(id(child), len(units)))
            if is_layer:
                assert here is not None
                lay = layers.setdefault(id(child), _Layer(child, here[0], here[1], self_counting=_self_counting(child)))
                lay.names.append(name)
                lay.sites.append((parent, attr))
                continue  # a conv's children (parametrizations) and a self-counting module's are not layers
            walk(child, name, here)

    walk(model, "", None)
    return list(layers.values()), names_of, len(units)


def _as_list(sel: Selector | Iterable[Selector] | None) -> list[Selector]:
    kinds = "a str pattern, an nn.Module, a module type or a callable (name, module) -> bool"
    if sel is None:
        return []
    if isinstance(sel, str | nn.Module | type) or (callable(sel) and not isinstance(sel, list | tuple | set)):
        out: list[Any] = [sel]
    elif isinstance(sel, Iterable):
        out = list(sel)
        if not out:
            raise ValueError(
                "keep=[] selects nothing; pass keep=None (the default) to keep only the stem, the "
                "classifier and the layers binarize cannot binarize, or list selectors"
            )
    else:
        raise TypeError(f"keep must be {kinds}, or a list of them, but got {type(sel).__name__} {sel!r}")
    for s in out:
        if not (isinstance(s, str | nn.Module | type) or callable(s)):
            raise TypeError(f"keep selectors must be {kinds}, but got {type(s).__name__} {s!r}")
    return out


def _matches(sel: Selector, lay: _Layer, model: nn.Module, names_of: dict[int, list[str]]) -> bool:
    unit_mod = model.get_submodule(lay.unit) if lay.unit else model
    if isinstance(sel, str):
        return any(fnmatch.fnmatchcase(n, sel) for n in [*lay.names, lay.unit])
    if isinstance(sel, nn.Module):
        roots = names_of.get(id(sel), [])
        return any(r == "" or n == r or n.startswith(r + ".") for r in roots for n in lay.names)
    if isinstance(sel, type):
        return isinstance(lay.module, sel) or isinstance(unit_mod, sel)
    try:
        return any(bool(sel(n, lay.module)) for n in lay.names)
    except TypeError as e:
        raise TypeError(
            f"keep selector {sel!r} raised TypeError ({e}); a callable selector is called as sel(name, module) -> bool"
        ) from e


def _why_not(m: nn.Module) -> str:
    """'' when ``m`` can be binarized, else the report's reason."""
    from compconv.eligibility import _hook_kinds
    from compconv.layers.ops import DepthwiseConv2d, PadAnyConv2d

    if isinstance(m, nn.Linear):
        return (
            "nn.Linear: stays real (XNOR-Net keeps the last, classifier layer in full precision; binarize "
            "binarizes convolutions)"
        )
    if _self_counting(m):
        return (
            f"{type(m).__name__} applies its own weight tensors with F.conv2d (a self-counting module, e.g. "
            "HetConv impl='masked'/'dense'): no nn.Conv2d to binarize; use HetConv impl='exact'"
        )
    if not isinstance(m, nn.Conv2d):
        return f"{type(m).__name__}: only 2-D convolutions (nn.Conv2d) are binarized"
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():  # type: ignore[attr-defined]
        return f"uninitialised {type(m).__name__}: run the model once before binarizing"
    if type(m) not in (nn.Conv2d, PadAnyConv2d, DepthwiseConv2d):
        return (
            f"{type(m).__module__}.{type(m).__qualname__} is not a plain nn.Conv2d (its forward may differ, "
            "e.g. weight standardisation or fake-quant); only plain convs are binarized"
        )
    if parametrize.is_parametrized(m):
        return "parametrized conv: binarizing would drop how its weight is made"
    own = {n for n, _ in m.named_parameters(recurse=False)}
    if not own <= {"weight", "bias"}:
        return f"conv with parameters {sorted(own)} (legacy weight_norm / spectral_norm?): its weight is made in a hook"
    hooks = _hook_kinds(m)
    if hooks:
        return f"conv with {'; '.join(hooks)}: the binary conv would not run them"
    return ""


# Squeeze-excitation blocks recognised by class name (no import of timm needed): torchvision's
# SqueezeExcitation (MobileNetV3, EfficientNet, RegNet), timm's SqueezeExcite / SEModule / EffectiveSEModule /
# EffectiveSqueezeExcite / SqueezeExciteCl, and the usual names of hand-written ones.
_SE_TYPE_NAMES = frozenset({
    "SqueezeExcitation", "SqueezeExcite", "SqueezeExciteCl", "SEModule", "EffectiveSEModule",
    "EffectiveSqueezeExcite", "SELayer", "SEBlock", "SqueezeExcitationBlock",
})
_SE_REASON = (
    "squeeze-excitation gate: a 1x1 conv on a globally pooled 1x1 map is a fully connected layer, kept real "
    "like nn.Linear (XNOR-Net binarizes convolutions; a binary conv's input BN on a 1x1 map also fails at "
    "batch 1 in training; keep_se=True)"
)


def _is_1x1(m: nn.Module) -> bool:
    """A 1x1 conv without padding (on a 1x1 map its output is 1x1 too)."""
    if not isinstance(m, nn.Conv2d) or tuple(m.kernel_size) != (1, 1):
        return False
    pad = m.padding
    return pad == "valid" or (not isinstance(pad, str) and tuple(pad) == (0, 0))


def _se_gate_convs(model: nn.Module) -> set[int]:
    """ids of the 1x1 convs that gate a squeeze-excitation block (they see a globally pooled 1x1 map).

    Found without a forward, two ways: every 1x1 conv inside a module of a recognised SE class
    (``_SE_TYPE_NAMES``); and, in an ``nn.Sequential``, the 1x1 convs that follow an
    ``AdaptiveAvg/MaxPool2d(1)`` with only per-element modules (BN, activations, dropout) and 1x1 convs between
    (SlimConv's gate and hand-written ``Sequential(pool, conv, ..., sigmoid)`` gates).
    """
    out: set[int] = set()
    per_element = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
                   nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.PReLU, nn.Dropout, nn.Identity,
                   nn.GroupNorm)
    for m in model.modules():
        if type(m).__name__ in _SE_TYPE_NAMES:
            out.update(id(c) for c in m.modules() if _is_1x1(c))
        elif isinstance(m, nn.Sequential):
            pooled = False
            for c in m:
                if isinstance(c, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
                    size = c.output_size
                    pooled = size in (1, (1, 1), [1, 1])
                elif pooled and _is_1x1(c):
                    out.add(id(c))
                elif not (pooled and isinstance(c, per_element)):
                    pooled = False
    return out


def binarize(
    model: nn.Module,
    *,
    keep: Selector | Iterable[Selector] | None = None,
    keep_stem: bool = True,
    keep_classifier: bool = True,
    keep_se: bool = True,
    input_bn: bool = True,
    input_scale: bool = False,
    return_report: bool = False,
    verbose: bool = False,
    **unknown: Any,
) -> nn.Module | tuple[nn.Module, BinarizationReport]:
    """Binarize ``model``'s convolutions with XNOR-Net (Rastegari et al., ECCV 2016), in place.

    Each binarized conv becomes a :class:`~compconv.binary.conv.BinaryConv2d` around it (its weight is kept as
    the real-valued latent weight the optimiser trains; state_dict keys gain ``.conv`` and ``.bn``). Train the
    result as usual: the forward uses ``alpha sign(W)`` and ``sign(BN(x))``, the backward the clipped
    straight-through estimator.

    Args:
        model: any ``nn.Module`` (vanilla or converted by :func:`compconv.convert`).
        keep: layers to keep in full precision besides the default ones: fnmatch patterns of dotted names
            (a conv's name or the name of the compact conv it belongs to: ``"layer3.*"``, ``"*.se.*"``),
            module objects (everything inside), module types (``compconv.GhostConv2d`` keeps every Ghost
            module's convs) or callables ``(name, module) -> bool``.
        keep_stem: keep the first conv layer in full precision (XNOR-Net does; default True).
        keep_classifier: keep the last layer in full precision when it is a conv (an ``nn.Linear`` classifier
            always stays real; default True).
        keep_se: keep the 1x1 gate convs of squeeze-excitation blocks in full precision (default True): on a
            globally pooled 1x1 map they are fully connected layers, which binarize keeps real (and a binary
            conv's input BN on a 1x1 map cannot train at batch 1). Recognised by class (torchvision's
            ``SqueezeExcitation``, timm's ``SqueezeExcite`` / ``SEModule`` / ``EffectiveSEModule``, ...) or as the
            1x1 convs after an ``AdaptiveAvgPool2d(1)`` in an ``nn.Sequential`` (SlimConv's gate).
        input_bn: each binary conv owns a ``BatchNorm2d`` on its input, before the sign (default True: a
            ReLU output would otherwise binarize to +1 everywhere).
        input_scale: also apply XNOR-Net's input scale ``K`` (Eq. 11; default False: plain sign activations).
        return_report: return ``(model, BinarizationReport)``.
        verbose: print the report.

    Returns:
        ``model`` (binarized in place), or ``(model, report)``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; a ``keep`` selector of the wrong type.
        ValueError: an unknown argument (named, with the allowed ones) or a non-bool flag; a ``keep`` selector
            that matches no layer; a model already binarized (binarize once); a model returned by
            ``compconv.deploy`` (eval-only: binarize before deploy); a model with nothing to binarize (every layer
            kept: the reasons are listed).
    """
    if unknown:
        bad = next(iter(unknown))
        close = difflib.get_close_matches(bad, _OPTIONS, n=2)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"binarize got an unknown argument {bad!r}; its arguments are {list(_OPTIONS)}{hint}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}")
    for name, v in (
        ("keep_stem", keep_stem),
        ("keep_classifier", keep_classifier),
        ("keep_se", keep_se),
        ("input_bn", input_bn),
        ("input_scale", input_scale),
        ("return_report", return_report),
        ("verbose", verbose),
    ):
        check_flag(name, v)
    deployed = next((n for n, m in model.named_modules() if getattr(m, "_compconv_eval_only", False)), None)
    if deployed is not None:  # folded BNs, frozen weights and a hook refusing train mode: nothing to train
        where = f" (its submodule {deployed!r})" if deployed else ""
        raise ValueError(
            f"model{where} was returned by compconv.deploy and is eval-only (BatchNorms folded into the convs, "
            "training refused): binarize the model before deploy, i.e. the model you passed to compconv.deploy "
            "(a binarized model runs as it is; deploy does not rewrite it)"
        )
    done = binary_layers(model)
    if done:
        raise ValueError(
            f"model is already binarized ({len(done)} BinaryConv2d, e.g. {done[0]!r}); binarize once, "
            "on the full-precision (or converted) model"
        )
    if isinstance(model, _ConvNd):
        raise ValueError(
            f"binarize replaces the convs inside a model, but model is itself a {type(model).__name__};"
            " wrap it (nn.Sequential(conv)) or use compconv.BinaryConv2d(conv)"
        )
    keeps = _as_list(keep)
    layers, names_of, _ = _find_layers(model)
    convs = [lay for lay in layers if not isinstance(lay.module, nn.Linear)]
    hits = {
        id(s): [not isinstance(lay.module, nn.Linear) and _matches(s, lay, model, names_of) for lay in layers]
        for s in keeps
    }  # selectors choose among the convs (a linear layer is always kept)
    unused = [s for s in keeps if not any(hits[id(s)])]
    if unused:
        example = convs[min(1, len(convs) - 1)].names[0] if convs else "features.3"
        all_names = [n for ns in names_of.values() for n in ns if n]
        linear_names = [n for lay in layers if isinstance(lay.module, nn.Linear) for n in lay.names]
        hints = []
        linears = [lay.module for lay in layers if isinstance(lay.module, nn.Linear)]
        for sel in unused:
            if isinstance(sel, type) and any(isinstance(m, sel) for m in linears):
                hints.append(f"{sel.__name__} selects nn.Linear layers: Linear layers are always kept (binarize "
                             "binarizes convs)")
            elif isinstance(sel, nn.Module) and id(sel) not in names_of:
                hints.append(f"the {type(sel).__name__} given is not a submodule of this model (of another "
                             "instance?): select by name, e.g. 'layer3.*'")
            if not isinstance(sel, str):
                continue
            if any(fnmatch.fnmatchcase(n, sel) for n in linear_names):
                hints.append(f"{sel!r} names an nn.Linear: Linear layers are always kept (binarize binarizes convs)")
            elif any(fnmatch.fnmatchcase(n, sel) for n in all_names):
                hints.append(f"{sel!r} names a container, not a conv: use {sel + '.*'!r} to keep the convs inside it")
        shown = [s if isinstance(s, str | type) else f"<{type(s).__name__}>" for s in unused]  # no 20-line reprs
        raise ValueError(f"keep selector(s) matched no layer: {shown!r} (layer names look like {example!r})"
                         + ("; " + "; ".join(hints) if hints else ""))
    stem = min((lay.unit_index for lay in convs), default=None)
    last = max((lay.unit_index for lay in layers), default=None)
    lasts = [lay for lay in layers if lay.unit_index == last]
    if not keep_classifier and lasts and all(isinstance(lay.module, nn.Linear) for lay in lasts):
        raise ValueError(
            f"keep_classifier=False changes nothing here: the last layer registered, {lasts[0].names[0]!r}, is an "
            "nn.Linear, which binarize always keeps real (it binarizes convolutions); drop keep_classifier=False"
        )
    linear_names = [lay.names[0] for lay in layers if isinstance(lay.module, nn.Linear)]
    # registration order is not forward order: a conv registered after the model's Linear head is not its head
    classifier_note = (f" (registration order; the model also has nn.Linear {linear_names[-1]!r}: if that is its "
                       "classifier, pass keep_classifier=False)") if linear_names else ""
    se_gates = _se_gate_convs(model) if keep_se else set()
    rows: list[LayerBinarization] = []
    todo: list[_Layer] = []
    for i, lay in enumerate(layers):
        m = lay.module
        if isinstance(m, nn.Linear):
            reason = _why_not(m)
        elif keep_stem and lay.unit_index == stem:
            reason = "stem: the first conv layer stays real (XNOR-Net keeps the first layer; keep_stem=True)"
        elif keep_classifier and lay.unit_index == last:
            reason = ("classifier: the last layer stays real (XNOR-Net keeps the last layer; keep_classifier=True)"
                      + classifier_note)
        elif any(hits[id(s)][i] for s in keeps):
            reason = "kept (keep=...)"
        elif keep_se and id(m) in se_gates:
            reason = _SE_REASON
        else:
            reason = _why_not(m)
        if not reason:
            todo.append(lay)
        rows.append(
            LayerBinarization(
                name=lay.names[0],
                type=type(m).__name__,
                unit=lay.unit,
                c_in=getattr(m, "in_channels", None),
                c_out=getattr(m, "out_channels", None),
                kernel=tuple(m.kernel_size) if hasattr(m, "kernel_size") else None,  # type: ignore[arg-type]
                groups=getattr(m, "groups", None) if isinstance(m, _ConvNd) else None,
                action="kept" if reason else "binarized",
                reason=reason or "XNOR-Net: sign(BN(x)) conv alpha sign(W)",
                params=sum(
                    0 if isinstance(p, nn.parameter.UninitializedParameter) else p.numel() for p in m.parameters()
                ),
                binary_params=0 if reason else m.weight.numel(),  # type: ignore[operator]
                aliases=lay.names[1:],
            )
        )
    options = {
        "keep_stem": keep_stem,
        "keep_classifier": keep_classifier,
        "keep_se": keep_se,
        "input_bn": input_bn,
        "input_scale": input_scale,
    }
    report = BinarizationReport(rows, options)
    if not todo:
        why: dict[str, int] = {}
        for r in rows:
            why[r.reason] = why.get(r.reason, 0) + 1
        top = "; ".join(f"{c} x {w}" for w, c in sorted(why.items(), key=lambda kv: -kv[1])[:3])
        raise ValueError(
            f"binarize found nothing to binarize in {type(model).__name__}: "
            + (f"{len(rows)} layer(s), all kept ({top})" if rows else "it has no conv layer")
        )
    for lay in todo:
        new = BinaryConv2d(lay.module, input_bn=input_bn, input_scale=input_scale)  # type: ignore[arg-type]
        for parent, attr in lay.sites:
            setattr(parent, attr, new)
    if verbose:
        print(report)
    return (model, report) if return_report else model


def apply_binarization(model: nn.Module, spec: dict[str, dict[str, Any]]) -> nn.Module:
    """Binarize exactly the convs named in ``spec`` (``{name: {"input_bn": .., "input_scale": ..}}``), in place.

    What ``compconv.load`` (and a training run's rebuild) use to redo a recorded :func:`binarize`; a conv
    registered under several names is replaced at each. Raises ``ValueError`` naming a layer that is missing,
    not an ``nn.Conv2d``, or an unknown option.
    """
    sites: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                sites.setdefault(id(child), []).append((parent, attr))
    for name, opts in spec.items():
        bad = [k for k in opts if k not in _LAYER_OPTIONS]
        if bad:
            raise ValueError(f"binarized layer {name!r}: unknown option {bad[0]!r}; allowed: {list(_LAYER_OPTIONS)}")
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"binarized layer {name!r} is not in the model (a file written for another architecture?)"
            ) from None
        want = {**_LAYER_DEFAULTS, **{k: bool(v) for k, v in opts.items()}}
        if isinstance(m, BinaryConv2d):  # an alias of a conv binarized under another name, or a binarized model
            if m.options() != want:  # its options are not in the state_dict (K has no tensor): loading would
                raise ValueError(   # silently compute something else
                    f"binarized layer {name!r} is already a BinaryConv2d with {m.options()} in this model, but the "
                    f"record says {want}; pass the model before it was converted and binarized"
                )
            continue
        if not isinstance(m, nn.Conv2d):
            raise ValueError(f"binarized layer {name!r} is a {type(m).__name__} in this model, not an nn.Conv2d")
        new = BinaryConv2d(m, **want)
        for parent, attr in sites.get(id(m), []):
            setattr(parent, attr, new)
    return model
