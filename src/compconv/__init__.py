"""compconv: compact convolutions as drop-in replacements for ``nn.Conv2d``.

The user's path: ``convert`` a model, ``profile`` it, train/eval it, ``deploy`` it, benchmark it.
"""

from compconv.layers import (
    CompactConv2d,
    CompConv2d,
    get_method,
    list_methods,
    register_method,
)

__version__ = "0.1.0"

__all__ = [
    "CompConv2d",
    "CompactConv2d",
    "__version__",
    "get_method",
    "list_methods",
    "register_method",
]
