"""compconv: compact convolutions as drop-in replacements for ``nn.Conv2d``.

The user's path: ``convert`` a model, ``profile`` it, train/eval it, ``deploy`` it, benchmark it.

The public names below are imported on first use (PEP 562 style), so that ``import compconv`` and the
command line's ``compconv --help`` do not pay for importing torch (seconds). ``compconv.convert``,
``compconv.profile`` and ``compconv.deploy`` are the functions, as before, even after their submodules
are imported (a new export: add it to ``_EXPORTS``, ``__all__`` and the ``TYPE_CHECKING`` block).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "BinarizationReport": "compconv.binary",
    "BinaryConv2d": "compconv.binary",
    "binarize": "compconv.binary",
    "ConversionReport": "compconv.convert",
    "convert": "compconv.convert",
    "DeployedCompConv2d": "compconv.deploy",
    "deploy": "compconv.deploy",
    "CompactConv2d": "compconv.layers",
    "CompConv2d": "compconv.layers",
    "GhostConv2d": "compconv.layers",
    "HetConv2d": "compconv.layers",
    "SlimConv2d": "compconv.layers",
    "XSepConv2d": "compconv.layers",
    "get_method": "compconv.layers",
    "list_methods": "compconv.layers",
    "register_method": "compconv.layers",
    "get_model": "compconv.models",
    "list_models": "compconv.models",
    "Profile": "compconv.profile",
    "profile": "compconv.profile",
    "CompressionReport": "compconv.compress",
    "compress": "compconv.compress",
    "load": "compconv.serialization",
    "save": "compconv.serialization",
}

__all__ = [
    "BinarizationReport",
    "BinaryConv2d",
    "binarize",
    "CompConv2d",
    "CompactConv2d",
    "ConversionReport",
    "DeployedCompConv2d",
    "GhostConv2d",
    "HetConv2d",
    "Profile",
    "SlimConv2d",
    "XSepConv2d",
    "__version__",
    "convert",
    "deploy",
    "get_model",
    "list_models",
    "profile",
    "get_method",
    "list_methods",
    "register_method",
    "CompressionReport",
    "compress",
    "load",
    "save",
]

if TYPE_CHECKING:
    from compconv.binary import BinarizationReport, BinaryConv2d, binarize
    from compconv.compress import CompressionReport, compress
    from compconv.convert import ConversionReport, convert
    from compconv.deploy import DeployedCompConv2d, deploy
    from compconv.layers import (
        CompactConv2d,
        CompConv2d,
        GhostConv2d,
        HetConv2d,
        SlimConv2d,
        XSepConv2d,
        get_method,
        list_methods,
        register_method,
    )
    from compconv.models import get_model, list_models
    from compconv.profile import Profile, profile
    from compconv.serialization import load, save


class _Package(types.ModuleType):
    """The ``compconv`` module object: public names and subpackages load on first access."""

    def __getattr__(self, name: str) -> Any:
        if name in _EXPORTS:
            value = getattr(importlib.import_module(_EXPORTS[name]), name)
            types.ModuleType.__setattr__(self, name, value)  # cached: later lookups skip this
            return value
        if not name.startswith("_"):  # compconv.layers, compconv.train, ... as after an eager import
            try:
                return importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{__name__}.{name}":
                    raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule compconv.convert (or .profile, .deploy) sets the package attribute of that
        # name to the submodule; the public name stays the function.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Package
