"""Compact convolutions, one file each, behind the interface in ``base.py``.

Importing this package registers every built-in method (``list_methods()`` shows them).
"""

from compconv.layers.base import CompactConv2d, conv_geometry, get_method, list_methods, register_method
from compconv.layers.compconv import CompConv2d, CompConvPlan, depth_from_c0, plan_compconv, prim_channels
from compconv.layers.ghost import GhostConv2d
from compconv.layers.hetconv import HetConv2d
from compconv.layers.ops import channel_shuffle
from compconv.layers.slimconv import SlimConv2d
from compconv.layers.xsepconv import XSepConv2d

__all__ = [
    "CompConv2d",
    "CompConvPlan",
    "CompactConv2d",
    "GhostConv2d",
    "HetConv2d",
    "channel_shuffle",
    "conv_geometry",
    "depth_from_c0",
    "get_method",
    "list_methods",
    "plan_compconv",
    "prim_channels",
    "register_method",
    "SlimConv2d",
    "XSepConv2d",
]
