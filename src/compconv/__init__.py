"""compconv: compact convolutions as drop-in replacements for ``nn.Conv2d``.

The user's path: ``convert`` a model, ``profile`` it, train/eval it, ``deploy`` it, benchmark it.
"""

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

__version__ = "0.1.0"

__all__ = [
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
]
