"""MobileNetV3-Small (Howard et al. 2019), the host network of XSepConv, with the small-image strides.

* ``mobilenet_v3_small``: torchvision's ``MobileNetV3`` built from the paper's Table 2 (11 bottlenecks,
  SE = ``make_divisible(exp / 4, 8)`` with hard-sigmoid, head 576 -> 1024 -> classes): 2.54M params and
  56.5M MACs at 224x224 / 1000 classes (the paper: 2.5M / 56M MAdds). ``stem_stride`` and
  ``first_stride`` (the first bottleneck's DW stride) are configurable because the XSepConv paper trains
  on 32x32 / 56x56 images without saying how it adapted the net; 1 and 1 (total stride 8) reproduces its
  Tiny-ImageNet "4.75% fewer FLOPs" exactly (``docs/methods/xsepconv.md``).
* ``xsep_mobilenet_v3_small``: the paper's swap (Sec. 4.2): the four stride-1 5x5 DWs of the middle stage
  -> XSepConv k=5, the two of the last stage -> XSepConv k=3; downsampling DWs, 3x3 DWs, stem and head
  unchanged; the 2x2 layers padded RB, LT, LB, RT, RB, LT; the host's h-swish between the layers.
* ``cifar_mobilenet_v3_small`` / ``cifar_xsep_mobilenet_v3_small``: the same at stride 1 / 1, no dropout.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig, MobileNetV3

from compconv.layers.xsepconv import XSepConv2d, assign_padding
from compconv.models.registry import register_model

__all__ = [
    "MNV3_SMALL",
    "cifar_mobilenet_v3_small",
    "cifar_xsep_mobilenet_v3_small",
    "mobilenet_v3_small",
    "xsep_mobilenet_v3_small",
    "xsepify_mobilenet_v3_small",
]

# (kernel, expansion, out, SE, nonlinearity, stride): Howard et al. 2019, Table 2 (MobileNetV3-Small).
MNV3_SMALL: list[tuple[int, int, int, bool, str, int]] = [
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
]


def mobilenet_v3_small(
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    stem_stride: int = 2,
    first_stride: int = 2,
    dropout: float = 0.2,
) -> MobileNetV3:
    """MobileNetV3-Small: ``(N, 3, H, W) -> (N, num_classes)``; total stride 32 (8 with strides 1 / 1)."""
    for name, v in (("stem_stride", stem_stride), ("first_stride", first_stride)):
        if v not in (1, 2):
            raise ValueError(f"{name} must be 1 or 2, but got {v!r}")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, but got {width_mult}")
    conf = partial(InvertedResidualConfig, width_mult=width_mult)
    cin = 16
    setting = []
    for i, (k, e, o, se, nl, s) in enumerate(MNV3_SMALL):
        setting.append(conf(cin, k, e, o, se, nl, first_stride if i == 0 else s, 1))
        cin = o
    last = InvertedResidualConfig.adjust_channels(1024, width_mult)
    model = MobileNetV3(setting, last, num_classes=num_classes, dropout=dropout)
    model.features[0][0].stride = (stem_stride, stem_stride)  # the stem conv (3 -> 16, 3x3)
    return model


def _dw_layer(block: InvertedResidual) -> nn.Sequential:
    for layer in block.block:
        conv = layer[0] if isinstance(layer, nn.Sequential) and len(layer) else None
        if isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels > 1:
            return layer
    raise ValueError("no depthwise conv in this InvertedResidual")


def xsepify_mobilenet_v3_small(
    model: MobileNetV3,
    *,
    k_middle: int = 5,
    k_last: int = 3,
    padding_strategy: str = "improved",
) -> MobileNetV3:
    """Apply the XSepConv paper's swap to a ``mobilenet_v3_small`` in place; returns ``model``.

    Bottlenecks 5-8 (the stride-1 5x5 DWs between the 2nd-to-last and last downsampling) get XSepConv
    ``k_middle``; bottlenecks 10-11 (after the last downsampling) get ``k_last``; the h-swish of each block
    goes between the three layers; then the 2x2 paddings rotate over the network (``assign_padding``).
    """
    blocks = [m for m in model.features if isinstance(m, InvertedResidual)]
    if len(blocks) != len(MNV3_SMALL):
        raise ValueError(f"expected a MobileNetV3-Small ({len(MNV3_SMALL)} bottlenecks), got {len(blocks)}")
    for i, block in enumerate(blocks):
        if i not in (4, 5, 6, 7, 9, 10):
            continue
        layer = _dw_layer(block)
        act = "hardswish" if isinstance(layer[2], nn.Hardswish) else "relu"
        layer[0] = XSepConv2d.from_conv(layer[0], k=k_middle if i < 8 else k_last, activation=act)
    assign_padding(model, strategy=padding_strategy)  # type: ignore[arg-type]
    return model


register_model("mobilenet_v3_small")(mobilenet_v3_small)


@register_model()
def xsep_mobilenet_v3_small(
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    stem_stride: int = 2,
    first_stride: int = 2,
    dropout: float = 0.2,
    k_middle: int = 5,
    k_last: int = 3,
    padding_strategy: str = "improved",
) -> MobileNetV3:
    """MobileNetV3-Small with the XSepConv paper's swap (``xsepify_mobilenet_v3_small``)."""
    model = mobilenet_v3_small(num_classes=num_classes, width_mult=width_mult, stem_stride=stem_stride,
                               first_stride=first_stride, dropout=dropout)
    return xsepify_mobilenet_v3_small(model, k_middle=k_middle, k_last=k_last,
                                      padding_strategy=padding_strategy)


@register_model()
def cifar_mobilenet_v3_small(*, num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV3:
    """MobileNetV3-Small for 32x32 / 56x56 inputs: stem and first bottleneck at stride 1, no dropout."""
    return mobilenet_v3_small(num_classes=num_classes, width_mult=width_mult, stem_stride=1, first_stride=1,
                              dropout=0.0)


@register_model()
def cifar_xsep_mobilenet_v3_small(*, num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV3:
    """``cifar_mobilenet_v3_small`` with the XSepConv swap (the paper's CIFAR/SVHN/Tiny-ImageNet model)."""
    return xsep_mobilenet_v3_small(num_classes=num_classes, width_mult=width_mult, stem_stride=1,
                                   first_stride=1, dropout=0.0)
