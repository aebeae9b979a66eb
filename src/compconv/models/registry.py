"""The model zoo's registry, as torchvision does it: ``register_model``, ``get_model``, ``list_models``.

Builders are thin typed functions with keyword-only arguments. Converted variants are registered under
their own names (``comp128_resnet50``); ``get_model(name, method=..., **method_options)`` converts any
vanilla model on the fly with ``compconv.convert``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from torch import nn

__all__ = ["get_model", "get_model_builder", "list_models", "register_model"]

BUILDERS: dict[str, Callable[..., nn.Module]] = {}
F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str | None = None) -> Callable[[F], F]:
    """Decorator: register a builder under ``name`` (default: the function's name); duplicates raise."""

    def deco(fn: F) -> F:
        key = name or fn.__name__
        if key in BUILDERS:
            raise ValueError(f"a model named {key!r} is already registered")
        BUILDERS[key] = fn
        return fn

    return deco


def _ensure_builtin_models() -> None:
    import compconv.models  # noqa: F401  (importing the package registers the built-in families)


def _external_builder(name: str) -> Callable[..., nn.Module]:
    """``torchvision:NAME`` / ``timm:NAME``: built without weights (nothing is downloaded)."""
    from compconv.serialization import _split_base, build_base

    scheme, short = _split_base(name)  # checked now, so a typo fails before any data is read
    if scheme == "torchvision":
        import torchvision

        if short not in torchvision.models.list_models():
            close = difflib.get_close_matches(short, torchvision.models.list_models(), n=3)
            hint = f" Did you mean {', '.join(repr(f'torchvision:{c}') for c in close)}?" if close else ""
            raise ValueError(f"unknown torchvision model {short!r}; see torchvision.models.list_models().{hint}")
    else:
        try:
            import timm
        except ImportError as e:  # pragma: no cover - timm is the [timm] extra
            raise ImportError(f"model {name!r} needs timm: pip install 'compconv[timm]'") from e
        if not timm.is_model(short):
            raise ValueError(f"unknown timm model {short!r}; see timm.list_models()")

    def build(**config: Any) -> nn.Module:
        return build_base(name, **config)

    build.__name__ = name
    return build


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered under ``name``; an unknown name lists close matches.

    ``"torchvision:NAME"`` and ``"timm:NAME"`` give a builder of that library's model with random
    weights (``weights=None`` / ``pretrained=False``: nothing is downloaded); its keyword arguments
    (e.g. ``num_classes``) are passed through.
    """
    if isinstance(name, str) and name.partition(":")[1]:
        return _external_builder(name)
    _ensure_builtin_models()
    if name not in BUILDERS:
        close = difflib.get_close_matches(str(name), sorted(BUILDERS), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}; see compconv.models.list_models() for the {len(BUILDERS)} known names.{hint}"
        )
    return BUILDERS[name]


def get_model(name: str, *, method: str | None = None, method_options: dict[str, Any] | None = None,
              **config: Any) -> nn.Module:
    """Build a zoo model: ``get_model("cifar_resnet20", num_classes=10)``.

    ``name`` may also be ``"torchvision:resnet18"`` or ``"timm:resnet18"`` (random weights, nothing is
    downloaded; load trained weights with ``load_state_dict`` or the trainer's ``--weights``).

    With ``method`` (and ``method_options``) the vanilla model is converted by ``compconv.convert``
    with that method's default rules, e.g. ``get_model("resnet50", method="compconv",
    method_options={"c0": 256})``. ``method_options`` may also hold ``convert``'s own keyword arguments
    (``exclude``, ``overrides``, ...).

    Raises:
        ValueError: an unknown model, method or option, or an option value outside the method's range
            (checked before the model is built), or ``method_options`` without ``method``.
    """
    if method is None:
        if method_options:
            raise ValueError(f"method_options {method_options!r} given without a method; pass method=NAME "
                             "(compconv.list_methods()) or drop the options")
        return get_model_builder(name)(**config)
    from compconv.convert import check_options, convert

    if not isinstance(method_options or {}, dict):
        raise TypeError(f"method_options must be a dict of options, but got {type(method_options).__name__}")
    check_options(method, dict(method_options or {}))  # before the model is built: a typo fails fast
    return convert(get_model_builder(name)(**config), method, **(method_options or {}))


def list_models(include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None) -> list[str]:
    """Sorted registered names, filtered by fnmatch patterns (``list_models("comp*resnet*")``)."""
    _ensure_builtin_models()
    names = sorted(BUILDERS)

    def pats(p: str | Iterable[str] | None) -> list[str]:
        return [p] if isinstance(p, str) else list(p or [])

    if include is not None:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats(include))]
    if exclude is not None:
        names = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in pats(exclude))]
    return names
