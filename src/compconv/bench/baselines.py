"""Dense alternatives at equal MACs: what a user could run instead of a compact model with the same MACs.

For a host model and an input size, two plain dense ``nn.Module``s whose MACs (``compconv.profile``: conv
and linear multiply-accumulates per image) land within ``tolerance`` (default 3%) of a target, usually the
MACs of the converted model:

* ``width``: the host uniformly width-scaled. Hosts with a width knob are rebuilt with scaled widths
  (CIFAR ResNets: every stage width x w; CIFAR VGG: every conv x w; torchvision MobileNetV2:
  ``width_mult=w``; timm MobileNetV3 / EfficientNet: their builders' ``channel_multiplier=w``). A host
  without a width knob (torchvision ResNets, VGG, ...) is thinned with Torch-Pruning at one uniform
  per-layer ratio instead, and the record's ``method`` says so (``torch_pruning_uniform``).
* ``prune``: Torch-Pruning's one-call magnitude pruning (``tp.pruner.BasePruner``, of which
  ``MagnitudePruner`` is the 1.6 alias, with ``tp.importance.MagnitudeImportance(p=1)``, local pruning at one
  ratio for every layer, one step, the classifier ignored). On CIFAR ResNets with option-A shortcuts
  (zero-padded channels, which Torch-Pruning's graph cannot follow) only the inner channels of each block
  are pruned (the residual stream is kept), as Li et al. (2017) pruned CIFAR ResNets.

The width factor or pruning ratio is searched (bisection safeguarded by a power-law step: MACs ~ width^2)
until the MACs are within 1% of the target, or the bracket closes; the closest model found must be within
``tolerance`` or a ``ValueError`` says how close it came. Weights are random (the host's) or magnitude-
selected: these models are for timing, not accuracy.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BASELINE_KINDS", "DenseBaseline", "dense_baselines", "magnitude_pruned", "width_scaled"]

BASELINE_KINDS = ("width", "prune")
# Torch-Pruning importances offered for the prune baseline: L1 filter magnitude (Li et al. 2017) and the
# group L2 norm over every coupled layer (Fang et al. 2023, DepGraph; the criterion of its GroupNormPruner).
IMPORTANCES = ("magnitude", "group_norm")


def _importance(name: str) -> Any:
    import torch_pruning as tp

    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "group_norm":
        return tp.importance.GroupMagnitudeImportance(p=2)
    raise ValueError(f"importance must be one of {IMPORTANCES}, but got {name!r}")
_STOP = 0.01  # the search stops once the MACs are this close to the target (the tolerance is checked after)


@dataclass
class DenseBaseline:
    """How one dense alternative was made and what it costs (MACs per image at ``input_size``)."""

    kind: str  # "width" | "prune"
    method: str  # "width_knob" | "torch_pruning_uniform" | "torch_pruning_magnitude"
    knob: str  # what was searched: "width factor" | "pruning ratio"
    value: float  # the width factor (1 = the host) or the pruning ratio (0 = the host)
    params: int
    macs: int
    target_macs: int
    host_macs: int
    rel_error: float  # macs / target_macs - 1
    evaluations: int
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Building the host and counting
# ---------------------------------------------------------------------------------------------------------
def _host_model(host: str | nn.Module, host_kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(host, nn.Module):
        return copy.deepcopy(host)
    if not isinstance(host, str):
        raise TypeError(f"host must be a model name (zoo, 'torchvision:NAME', 'timm:NAME') or an nn.Module, "
                        f"but got {type(host).__name__}")
    from compconv.serialization import build_base

    return build_base(host, **host_kwargs)


def _macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    from compconv import profile

    return int(profile(model, (1, *input_size[1:])).total_macs)


def _placement(model: nn.Module) -> dict[str, Any]:
    """``{"device", "dtype"}`` of ``model``'s first floating parameter (an empty dict if it has none)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return {"device": p.device, "dtype": p.dtype} if p is not None else {}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check(target_macs: Any, input_size: Any, tolerance: Any) -> tuple[int, ...]:
    if isinstance(target_macs, bool) or not isinstance(target_macs, int) or target_macs <= 0:
        raise ValueError(f"target_macs must be a positive int (MACs per image), but got {target_macs!r}")
    ok = isinstance(input_size, (tuple, list, torch.Size)) and len(input_size) == 4 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in input_size)
    if not ok:
        raise ValueError(f"input_size must be 4 positive ints (N, C, H, W), but got {input_size!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in (0, 1) such as 0.03, but got {tolerance!r}")
    return tuple(input_size)


def _check_target(target: int, host_macs: int) -> None:
    if target > host_macs:
        raise ValueError(f"target_macs {target:,} is above the host's {host_macs:,} MACs per image: a dense "
                         "alternative at equal MACs is a smaller host (pass the converted model's MACs)")


# ---------------------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------------------
def _search(build: Callable[[float], nn.Module], input_size: tuple[int, ...], target: int, host_macs: int,
            lo: float, hi: float, scale: Callable[[float], float], unscale: Callable[[float], float]
            ) -> tuple[nn.Module, float, int, int]:
    """The knob value in ``[lo, hi]`` whose model's MACs come closest to ``target``: ``(model, value, MACs,
    evaluations)``. ``scale(v)`` is the width the knob gives (1 at the host; MACs grow with it), ``unscale``
    its inverse; a step assumes MACs ~ width^2 and falls back to bisection when it leaves the bracket."""
    s_lo, s_hi = sorted((scale(lo), scale(hi)))
    s = math.sqrt(target / host_macs)  # first guess: MACs ~ width^2
    best: tuple[float, nn.Module, float, int] | None = None
    seen: dict[float, int] = {}
    n = 0
    for n in range(1, 25):  # noqa: B007 - n is the evaluation count after the loop
        s = min(max(s, s_lo), s_hi)
        v = unscale(s)
        model = build(v)
        macs = _macs(model, input_size)
        seen[s] = macs
        err = abs(macs / target - 1)
        if best is None or err < best[0]:
            best = (err, model, v, macs)
        if err <= _STOP:
            break
        if macs > target:
            s_hi = s
        else:
            s_lo = s
        if s_hi - s_lo < 1e-4:
            break
        step = s * math.sqrt(target / macs)
        s = step if s_lo < step < s_hi and step not in seen else (s_lo + s_hi) / 2
    assert best is not None
    return best[1], best[2], best[3], n


def _finish(kind: str, method: str, knob: str, model: nn.Module, value: float, macs: int, target: int,
            host_macs: int, evals: int, tolerance: float, note: str) -> tuple[nn.Module, DenseBaseline]:
    rel = macs / target - 1
    if abs(rel) > tolerance:
        raise ValueError(f"the {kind} baseline ({method}) came only within {100 * rel:+.1f}% of target_macs "
                         f"{target:,} (closest: {knob} {value:.4f}, {macs:,} MACs; tolerance "
                         f"{100 * tolerance:.0f}%): the host's channel granularity cannot reach it")
    rec = DenseBaseline(kind, method, knob, value, _params(model), macs, target, host_macs, rel, evals, note)
    return model.eval(), rec


# ---------------------------------------------------------------------------------------------------------
# Width knobs
# ---------------------------------------------------------------------------------------------------------
def _width_knob(host: str | nn.Module, model: nn.Module,
                host_kwargs: dict[str, Any]) -> list[tuple[Callable[[float], nn.Module], str]]:
    """``[(build(width factor), description)]`` for a host with a width knob, finest granularity last; else
    empty."""
    from compconv.models.cifar_resnet import CifarResNet
    from compconv.models.cifar_vgg import CifarVGG

    if isinstance(model, CifarResNet):
        n = len(model.layer1)
        widths = [s[0].conv2.out_channels for s in (model.layer1, model.layer2, model.layer3)]
        classes = model.fc.out_features

        def resnet(w: float) -> nn.Module:
            return CifarResNet(6 * n + 2, num_classes=classes, widths=tuple(max(1, round(w * c)) for c in widths))

        return [(resnet, f"CifarResNet stage widths {widths} x w")]
    if isinstance(model, CifarVGG):
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        cfg = [m.out_channels if isinstance(m, nn.Conv2d) else "M" for m in model.features
               if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
        kw = dict(num_classes=model.classifier.out_features, in_channels=convs[0].in_channels,
                  conv_bias=convs[0].bias is not None)

        def vgg(w: float) -> nn.Module:
            return CifarVGG([v if v == "M" else max(1, round(w * int(v))) for v in cfg], **kw)  # type: ignore[arg-type]

        return [(vgg, "CifarVGG every conv width x w")]
    name = host if isinstance(host, str) else ""
    if name in ("mobilenet_v2", "torchvision:mobilenet_v2"):
        import torchvision

        # torchvision rounds every width to a multiple of 8; where that step is too coarse for the
        # tolerance, finer multiples are tried (the record says which)
        return [(lambda w, r=r: torchvision.models.mobilenet_v2(width_mult=w, round_nearest=r, **host_kwargs),
                 f"torchvision mobilenet_v2(width_mult=w, round_nearest={r}) (last 1280 kept, as torchvision)")
                for r in (8, 4, 2, 1)]
    timm_gens = {"timm:mobilenetv3_large_100": ("mobilenetv3", "_gen_mobilenet_v3"),
                 "timm:efficientnet_b0": ("efficientnet", "_gen_efficientnet")}
    if name in timm_gens:
        try:
            import importlib

            mod, fn = timm_gens[name]
            gen = getattr(importlib.import_module(f"timm.models.{mod}"), fn)
        except (ImportError, AttributeError):  # another timm layout: no knob (Torch-Pruning uniform instead)
            return []
        variant = name.split(":", 1)[1]
        return [(lambda w: gen(variant, channel_multiplier=w, pretrained=False, **host_kwargs),
                 f"timm {fn}({variant!r}, channel_multiplier=w)")]
    return []


def width_scaled(host: str | nn.Module, target_macs: int, input_size: Sequence[int], *,
                 host_kwargs: dict[str, Any] | None = None,
                 tolerance: float = 0.03) -> tuple[nn.Module, DenseBaseline]:
    """The host uniformly width-scaled to ``target_macs`` MACs per image at ``input_size``.

    Args:
        host: a model name (zoo name, ``"torchvision:NAME"``, ``"timm:NAME"``) or an ``nn.Module``
            (CIFAR ResNets and VGGs are recognised by type; other modules have no width knob).
        target_macs: MACs per image to match (e.g. the converted model's); ``0 < target <= host's``.
        input_size: ``(N, C, H, W)``; MACs are counted per image at ``(1, C, H, W)``.
        host_kwargs: the builder's keyword arguments (e.g. ``{"num_classes": 10}``).
        tolerance: the largest accepted ``|MACs / target - 1|``.

    Returns:
        ``(model, record)``: a dense eval-mode model and its ``DenseBaseline`` (``method`` is
        ``"width_knob"`` or, for a host without a width knob, ``"torch_pruning_uniform"``).

    Raises:
        ValueError: a bad target (<= 0 or above the host's MACs), input size or tolerance; a target the
            knob cannot reach within ``tolerance``. TypeError: ``host`` is neither a name nor a module.
    """
    size = _check(target_macs, input_size, tolerance)
    kw = dict(host_kwargs or {})
    model = _host_model(host, kw)
    host_macs = _macs(model, size)
    _check_target(target_macs, host_macs)
    knobs = _width_knob(host, model, kw)
    if not knobs:
        return _prune(model, target_macs, size, host_macs, tolerance, uniform=True)
    place = _placement(model)  # the rebuilt models follow the host's device and dtype
    for i, knob in enumerate(knobs):
        best, w, macs, n = _search(lambda v, b=knob[0]: b(v).to(**place), size, target_macs, host_macs, 0.01, 1.0,
                                   lambda v: v, lambda s: s)
        if abs(macs / target_macs - 1) <= tolerance or i == len(knobs) - 1:
            break
    return _finish("width", "width_knob", "width factor", best, w, macs, target_macs, host_macs, n, tolerance,
                   knob[1])


# ---------------------------------------------------------------------------------------------------------
# Torch-Pruning
# ---------------------------------------------------------------------------------------------------------
def _classifier(model: nn.Module) -> list[nn.Module]:
    get = getattr(model, "get_classifier", None)  # timm
    if callable(get):
        c = get()
        if isinstance(c, nn.Module) and any(True for _ in c.parameters()):
            return [c]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def _residual_stream(model: nn.Module) -> tuple[list[nn.Module], str]:
    """Layers Torch-Pruning must not prune in ``model`` (and why): the option-A residual stream."""
    from compconv.models.cifar_resnet import BasicBlockA, CifarResNet

    if isinstance(model, CifarResNet):
        keep = [model.conv1] + [m.conv2 for m in model.modules() if isinstance(m, BasicBlockA)]
        return keep, ("inner channels of each block only: option-A shortcuts zero-pad channels, which "
                      "Torch-Pruning cannot follow")
    return [], ""


def _prune(model: nn.Module, target: int, size: tuple[int, ...], host_macs: int, tolerance: float, *,
           uniform: bool, importance: str = "magnitude") -> tuple[nn.Module, DenseBaseline]:
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, but got {importance!r}")
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise ImportError("the prune baseline needs Torch-Pruning: pip install 'compconv[prune]' "
                          "(torch-pruning==1.6.1)") from e
    kept, why = _residual_stream(model)
    example = torch.randn(1, *size[1:]).to(**_placement(model))  # Torch-Pruning traces the host on it

    def build(ratio: float) -> nn.Module:
        m = copy.deepcopy(model).eval()
        if ratio <= 0:
            return m
        names = {id(mod): n for n, mod in model.named_modules()}
        ignore = [m.get_submodule(names[id(x)]) for x in _classifier(model) + kept]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning's notes on unwrapped parameters and deprecations
            pruner = tp.pruner.BasePruner(m, example, importance=_importance(importance),
                                          pruning_ratio=ratio, global_pruning=False, iterative_steps=1,
                                          ignored_layers=ignore)
            pruner.step()
        return m

    best, r, macs, n = _search(build, size, target, host_macs, 0.0, 0.95, lambda v: 1 - v, lambda s: 1 - s)
    with torch.no_grad():
        out, ref = best.eval()(example), model.eval()(example)
    if out.shape != ref.shape:
        raise RuntimeError(f"Torch-Pruning changed the output shape {tuple(ref.shape)} -> {tuple(out.shape)}")
    method = "torch_pruning_uniform" if uniform else f"torch_pruning_{importance}"
    crit = "MagnitudeImportance(p=1)" if importance == "magnitude" else "GroupMagnitudeImportance(p=2)"
    note = ("no width knob for this host: Torch-Pruning at one uniform per-layer ratio" if uniform else
            f"tp.pruner.BasePruner (MagnitudePruner), {crit}, local, 1 step, classifier kept")
    return _finish("width" if uniform else "prune", method, "pruning ratio", best, r, macs, target, host_macs,
                   n, tolerance, "; ".join(x for x in (note, why) if x))


def magnitude_pruned(host: str | nn.Module, target_macs: int, input_size: Sequence[int], *,
                     host_kwargs: dict[str, Any] | None = None, tolerance: float = 0.03,
                     importance: str = "magnitude") -> tuple[nn.Module, DenseBaseline]:
    """The host pruned by Torch-Pruning's one-call magnitude pruning to ``target_macs`` MACs per image.

    ``host`` may be a trained model object (it is copied, not changed): the pruned model keeps the
    selected channels' trained weights. ``importance``: ``"magnitude"`` (L1 norm of each filter, Li et al.
    2017) or ``"group_norm"`` (``GroupMagnitudeImportance(p=2)``: the L2 norm over every layer coupled to
    the channel, the criterion of DepGraph's ``GroupNormPruner``, Fang et al. 2023, without its sparse
    training).

    ``tp.pruner.BasePruner`` (``MagnitudePruner`` in Torch-Pruning 1.6 is the same class) with
    ``tp.importance.MagnitudeImportance(p=1)``, ``global_pruning=False`` (one ratio for every layer),
    ``iterative_steps=1``, ``ignored_layers`` = the classifier; the ratio is searched so the MACs land within
    ``tolerance`` of the target. Arguments, returns and errors as :func:`width_scaled`; ``ImportError``
    when torch-pruning is not installed (the ``[prune]`` extra).
    """
    size = _check(target_macs, input_size, tolerance)
    model = _host_model(host, dict(host_kwargs or {}))
    host_macs = _macs(model, size)
    _check_target(target_macs, host_macs)
    return _prune(model, target_macs, size, host_macs, tolerance, uniform=False, importance=importance)


def dense_baselines(host: str | nn.Module, target_macs: int, input_size: Sequence[int], *,
                    kinds: Sequence[str] = BASELINE_KINDS, host_kwargs: dict[str, Any] | None = None,
                    tolerance: float = 0.03) -> dict[str, tuple[nn.Module, DenseBaseline]]:
    """``{kind: (model, record)}`` for each of ``kinds`` (``"width"``, ``"prune"``); see the module docstring."""
    bad = [k for k in kinds if k not in BASELINE_KINDS]
    if bad or isinstance(kinds, str):
        raise ValueError(f"kinds must be a list of {BASELINE_KINDS}, but got {kinds!r}")
    make = {"width": width_scaled, "prune": magnitude_pruned}
    return {k: make[k](host, target_macs, input_size, host_kwargs=host_kwargs, tolerance=tolerance)
            for k in kinds}
