"""Save a converted or compressed model as one file, and rebuild it without repeating ``convert``'s arguments.

    compconv.save(model, "r20_comp.pt", base="cifar_resnet20", conversion=report)
    model = compconv.load("r20_comp.pt")        # builds the base, converts each layer as recorded, loads weights

The file (written atomically: a temporary file in the same folder, then ``os.replace``) is a
``torch.save`` of plain data, read back with ``torch.load(weights_only=True)``:

* ``format`` (``"compconv-model"``) and ``version``;
* ``base``: how to build the unconverted model: a zoo name (``"cifar_resnet20"``), ``"torchvision:NAME"``
  or ``"timm:NAME"`` (built without downloading weights), and ``base_kwargs``; or ``None``, in which case
  ``load(path, model=...)`` needs the unconverted model object;
* ``method`` and ``layers``: ``{layer name: options}`` of every converted layer (from the
  ``ConversionReport`` or ``CompressionReport``);
* ``binary``: ``{layer name: options}`` of every binarized conv (``compconv.binarize``; empty when none),
  redone after the conversion; a file with binary layers is format version 2, so an older compconv that would
  not rebuild them refuses it;
* ``state_dict``: the weights (loaded strictly: a mismatch is an error, not a silent partial load).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FORMAT", "build_base", "load", "save"]

FORMAT = "compconv-model"
VERSION = 2  # 2: may record binarized layers ("binary"); files without them are still written as 1


def _conversion_spec(conversion: Any) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """``(method, {layer: options})`` from a ConversionReport, a CompressionReport or a dict."""
    if conversion is None:
        return None, {}
    from compconv.compress.report import CompressionReport
    from compconv.convert import ConversionReport

    if isinstance(conversion, CompressionReport):
        conversion = conversion.conversion
        if conversion is None:  # nothing was converted (budget 1.0)
            return None, {}
    if isinstance(conversion, ConversionReport):
        return conversion.method, {r.name: dict(r.options) for r in conversion.converted}
    if isinstance(conversion, dict) and "method" in conversion and "layers" in conversion:
        return str(conversion["method"]), {str(k): dict(v) for k, v in conversion["layers"].items()}
    raise TypeError("conversion must be a ConversionReport, a CompressionReport or a dict "
                    f"{{'method': ..., 'layers': {{name: options}}}}, but got {type(conversion).__name__}")


def _plain(v: Any) -> Any:
    """Options as plain data (tuples become lists) so that ``weights_only`` loading accepts them."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    raise TypeError(f"cannot save option value {v!r} ({type(v).__name__}): only numbers, strings, bools, "
                    "None, lists and dicts are recorded")


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    base: str | None = None,
    base_kwargs: dict[str, Any] | None = None,
    conversion: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (weights + how to rebuild it) to ``path`` atomically; returns the path.

    Args:
        model: the converted (or compressed) model; its binarized convs (``compconv.binarize``) are recorded
            from the model itself.
        base: how to build the unconverted model: a zoo name, ``"torchvision:NAME"`` or ``"timm:NAME"``;
            ``None`` records none (then ``load`` needs ``model=``).
        base_kwargs: keyword arguments of that builder (e.g. ``{"num_classes": 10}``).
        conversion: the ``ConversionReport`` / ``CompressionReport`` (or ``{"method", "layers"}``) that
            says which layers were converted with which options; ``None`` for an unconverted model.
        extra: any plain data to keep alongside (e.g. the compression report's ``to_dict()``).

    Raises ``TypeError`` for an unsupported argument type or option value; ``ValueError`` when ``base`` (with
    ``base_kwargs``), converted and binarized as recorded, does not give a model with ``model``'s state_dict
    keys and shapes (so :func:`load` could not rebuild it: a wrong base name or ``num_classes``), naming the
    first differences.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}")
    if base is not None:
        _split_base(base)  # refuse an unknown scheme now, not at load time
    method, layers = _conversion_spec(conversion)
    if base is not None:  # load() rebuilds base + the recorded layers: every compact layer must be recorded
        from compconv.layers.base import CompactConv2d

        compact = [n for n, m in model.named_modules() if isinstance(m, CompactConv2d)]
        inner = {n for c in compact for n, _ in model.get_submodule(c).named_modules(prefix=c) if n != c}
        missing = [n for n in compact if n not in layers and n not in inner]
        if missing:  # a zoo model built compact (comp128_cifar_vgg16): its base makes them itself
            try:
                built = build_base(base, **dict(base_kwargs or {}))
            except (ImportError, TypeError, ValueError):
                built = None  # _check_rebuilds below names why it cannot be built
            if built is not None:
                own = {n for n, m in built.named_modules() if isinstance(m, CompactConv2d)}
                missing = [n for n in missing if n not in own]
        if missing:
            raise ValueError(f"model has compact layers that conversion does not record, so load() could not "
                             f"rebuild them: {missing[:5]}{' ...' if len(missing) > 5 else ''}; pass "
                             "conversion= the ConversionReport / CompressionReport of the call that made them")
    from compconv.binary.transform import binary_spec

    binary = binary_spec(model)  # read from the model itself: binarize() needs no record passed in
    if base is not None:  # a file that load() cannot rebuild must fail now, while the model is still here
        _check_rebuilds(model, base, dict(base_kwargs or {}), method, layers, binary)
    payload = {
        "format": FORMAT,
        "version": VERSION if binary else 1,
        "base": base,
        "base_kwargs": _plain(dict(base_kwargs or {})),
        "method": method,
        "layers": _plain(layers),
        "extra": _plain(dict(extra or {})),
        "binary": _plain(binary),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make the saved model unreadable to others (open() does not)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _split_base(base: str) -> tuple[str, str]:
    if not isinstance(base, str) or not base:
        raise ValueError(f"base must be a model name such as 'cifar_resnet20', 'torchvision:resnet50' or "
                         f"'timm:resnet18', but got {base!r}")
    scheme, sep, name = base.partition(":")
    if not sep:
        return "zoo", base
    if scheme not in ("torchvision", "timm") or not name:
        raise ValueError(f"base {base!r}: the prefix must be 'torchvision:' or 'timm:' (or none for a compconv "
                         "zoo name)")
    return scheme, name


def build_base(base: str, **kwargs: Any) -> nn.Module:
    """Build an unconverted model by name, without weights: zoo name, ``torchvision:NAME`` or ``timm:NAME``.

    Raises ``ValueError`` for an unknown name (listing where to look), ``ImportError`` when timm is missing.
    """
    scheme, name = _split_base(base)
    if scheme == "zoo":
        from compconv.models import get_model

        return get_model(name, **kwargs)
    if scheme == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is the [timm] extra
        raise ImportError(f"base {base!r} needs timm: pip install 'compconv[timm]'") from e
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
    return timm.create_model(name, pretrained=False, **kwargs)


def _rebuild(model: nn.Module, method: str | None, layers: dict[str, dict[str, Any]],
             binary: dict[str, Any] | None) -> nn.Module:
    """Convert ``model`` (the unconverted base, changed in place) and binarize it as recorded."""
    if layers:
        from compconv.compress.candidates import exact_pattern
        from compconv.convert import convert

        convert(model, method, include=[exact_pattern(n) for n in layers], keep_stem=False,
                overrides={exact_pattern(n): dict(o) for n, o in layers.items()})
    if binary:
        from compconv.binary.transform import apply_binarization

        apply_binarization(model, binary)
    return model


def _check_rebuilds(model: nn.Module, base: str, base_kwargs: dict[str, Any], method: str | None,
                    layers: dict[str, dict[str, Any]], binary: dict[str, Any] | None) -> None:
    """``ValueError`` unless base + the recorded conversion has ``model``'s state_dict keys and shapes."""
    import warnings

    what = f"base={base!r}" + (f" with base_kwargs={base_kwargs}" if base_kwargs else "")
    try:
        fresh = build_base(base, **base_kwargs)
    except (ImportError, TypeError, ValueError) as e:
        raise ValueError(f"{what} cannot be built, so load() could not rebuild this model: {e}") from e
    try:
        with warnings.catch_warnings():  # convert's own warnings would repeat at load(); only the fit matters
            warnings.simplefilter("ignore")
            rebuilt = _rebuild(fresh, method, layers, binary).state_dict()
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{what} converted as recorded fails ({e}): is it the model this one was built "
                         "from?") from e
    own = model.state_dict()
    missing = [k for k in own if k not in rebuilt]
    unexpected = [k for k in rebuilt if k not in own]
    shapes = [f"{k}: {tuple(own[k].shape)} here, {tuple(rebuilt[k].shape)} rebuilt" for k in own
              if k in rebuilt and own[k].shape != rebuilt[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {items[:3]}{' ...' if len(items) > 3 else ''}"
                 for label, items in (("keys only in the model:", missing), ("keys only in the rebuilt one:",
                                      unexpected), ("shapes differ:", shapes)) if items]
        raise ValueError(f"{what}, converted as recorded, does not rebuild this model, so load() would fail: "
                         + "; ".join(parts) + ". Pass the base model name (and base_kwargs, e.g. num_classes) "
                         "it was built from")


def load(path: str | os.PathLike[str], *, model: nn.Module | None = None,
         map_location: str | torch.device | None = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save`: build the base (or take ``model``), convert, binarize, load weights.

    ``model``: the unconverted model to convert into (needed when the file records no base; it is
    changed in place). The result is in eval mode. Raises ``FileNotFoundError`` / ``IsADirectoryError`` for a
    path that is not a file, ``CheckpointError`` (a ``ValueError``) naming
    the file for a damaged one (a zip entry failing its CRC-32, a truncated file, non-finite weights),
    ``ValueError`` for a file that is not a compconv save (a training checkpoint: the message says what to use),
    a newer format version, an unknown base, or weights that do not fit the rebuilt model (a wrong ``model``).
    """
    from compconv.train.checkpoint import NotPlainDataError, read_verified

    path = Path(path)
    if path.is_dir():  # a run directory is the usual slip; its checkpoints are not what load reads either
        raise IsADirectoryError(
            f"compconv model file {str(path)!r} is a directory, not a file; compconv.load reads a file written by "
            "compconv.save or compconv compress --out (a training run's directory is read by compconv eval RUN_DIR, "
            "compconv compress --weights and --teacher)")
    # the one integrity-checked loader: CRC of every zip entry, then finite tensors (CheckpointError)
    try:
        payload = read_verified(path, "compconv model file", weights_only=True,
                                map_location="cpu" if map_location is None else map_location)
    except NotPlainDataError:
        raise ValueError(
            f"{path} is not a compconv model file (compconv.save writes tensors and plain data only): it holds "
            "pickled Python objects, as compconv train's checkpoints (checkpoints/*.pt, which store RNG states) "
            "do. Use a run's checkpoint with `compconv eval RUN_DIR` or as --weights / --init / --teacher; in "
            "Python, build the model as the run did and load_state_dict(torch.load(PATH, "
            "weights_only=False)['model']) (only for a file you trust)"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a compconv model file (written by compconv.save); for a plain "
                         "state_dict, build the model and call load_state_dict")
    if int(payload.get("version", 0)) > VERSION:
        raise ValueError(f"{path} has format version {payload['version']}, newer than this compconv's "
                         f"{VERSION}; upgrade compconv")
    given = "the model= given" if model is not None else f"base {payload['base']!r}"
    if model is None:
        if payload["base"] is None:
            raise ValueError(f"{path} records no base model; pass model=<the unconverted model> to load")
        model = build_base(payload["base"], **payload["base_kwargs"])
    try:
        _rebuild(model, payload["method"], payload["layers"], payload.get("binary"))
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, ValueError) as e:
        why = " ".join(str(e).split())[:300]  # load_state_dict lists the keys on later lines
        raise ValueError(f"{path}: {given}, converted as recorded, does not take the file's weights: is it the "
                         f"model the file was saved from? ({type(e).__name__}: {why} ...)") from e
    return model.eval()
