"""SlimConv ("Sc-") networks of the SlimConv paper (TIP 2021), built by ``convert_blocks`` on zoo hosts.

Every bottleneck's 3x3 ``conv2`` becomes a ``SlimConv2d``, its ``bn2`` goes, and ``conv3`` takes the reduced
width ``q + q//2`` (``docs/methods/slimconv.md``). Counts (params with BN affine; MACs of conv + linear):

=============================  =========  =============  ==========================
builder                        params     MACs           paper (Table I / VI)
=============================  =========  =============  ==========================
sc_resnet50 (224, k=4/3)       16.76M     2.652G         16.76M / 2.65G
sc_resnet50(k=8/3)             12.10M     1.880G         12.10M / 1.88G
sc_resnet101                   27.96M     4.822G         27.96M / 4.82G
sc_resnext50_32x4d             22.49M     3.821G         22.49M / 3.82G
sc_resnext101_32x3d (k=2)      23.66M     4.574G         23.70M / 4.58G (approx.)
sc_cifar_resnet50 (100 cls)    14.91M     0.829G         14.91M / 0.836G (thop-style)
=============================  =========  =============  ==========================

(``compconv tables slimconv`` recomputes these live.)
"""

from __future__ import annotations

from fractions import Fraction

from torch import nn
from torchvision.models import resnet as tv_resnet

from compconv.layers.slimconv import convert_blocks, split_from_k
from compconv.models.cifar_resnet import CifarResNet, cifar_resnet_tv
from compconv.models.imagenet import mobilenet_v2
from compconv.models.registry import register_model

__all__ = [
    "sc_cifar_resnet50",
    "sc_cifar_resnet56",
    "sc_cifar_resnext50_32x4d",
    "sc_mobilenet_v2",
    "sc_resnet50",
    "sc_resnet101",
    "sc_resnext50_32x4d",
    "sc_resnext101_32x3d",
]

K = float | Fraction | str


def _sc(model: nn.Module, k: K, **opts: object) -> nn.Module:
    return convert_blocks(model, split=split_from_k(k), **opts)


@register_model()
def sc_resnet50(*, num_classes: int = 1000, k: K = Fraction(4, 3)) -> nn.Module:
    """Sc-ResNet-50 (ImageNet, 224x224); ``k=Fraction(8, 3)`` gives the paper's lighter model."""
    return _sc(tv_resnet.resnet50(num_classes=num_classes), k)


@register_model()
def sc_resnet101(*, num_classes: int = 1000, k: K = Fraction(4, 3)) -> nn.Module:
    """Sc-ResNet-101 (ImageNet, 224x224)."""
    return _sc(tv_resnet.resnet101(num_classes=num_classes), k)


@register_model()
def sc_resnext50_32x4d(*, num_classes: int = 1000, k: K = Fraction(4, 3)) -> nn.Module:
    """Sc-ResNeXt-50 (32x4d): the cardinality 32 goes on both inner 3x3 convs."""
    return _sc(tv_resnet.resnext50_32x4d(num_classes=num_classes), k)


@register_model()
def sc_resnext101_32x3d(*, num_classes: int = 1000, k: K = 2) -> nn.Module:
    """Sc-ResNeXt-101 (32x3d, k=2): the official code's stage depths [4, 8, 18, 3], width 96..768.

    Groups ``gcd(32, width)`` where 32 does not divide an inner width (stage 1's 16-channel bottom conv);
    a reconstruction (23.66M / 4.574G vs the paper's 23.70 / 4.58).
    """
    base = tv_resnet.ResNet(tv_resnet.Bottleneck, [4, 8, 18, 3], num_classes=num_classes, groups=32,
                            width_per_group=3)
    return _sc(base, k, group_rule="gcd")


@register_model()
def sc_cifar_resnet50(*, num_classes: int = 10, k: K = Fraction(4, 3)) -> nn.Module:
    """Sc-ResNet-50 for 32x32 (3x3 stride-1 stem, no max-pool; CIFAR-100 uses ``num_classes=100``)."""
    return _sc(cifar_resnet_tv("resnet50", num_classes=num_classes), k)


@register_model()
def sc_cifar_resnext50_32x4d(*, num_classes: int = 10, k: K = Fraction(4, 3)) -> nn.Module:
    """Sc-ResNeXt-50 (32x4d) for 32x32 inputs (Table VI)."""
    return _sc(cifar_resnet_tv("resnext50_32x4d", num_classes=num_classes), k)


@register_model()
def sc_cifar_resnet56(*, num_classes: int = 10, k: K = Fraction(4, 3)) -> nn.Module:
    """Sc-ResNet-56 (Table V; a reconstruction): SlimConv replaces each basic block's first 3x3 (with its
    stride), the second 3x3 takes ``3 C_in / 4`` channels; option-A shortcuts unchanged."""
    return _sc(CifarResNet(56, num_classes=num_classes), k)


@register_model()
def sc_mobilenet_v2(*, num_classes: int = 1000, k: K = Fraction(8, 3), min_hidden: int = 24) -> nn.Module:
    """Sc-MobileNetV2 (Table III, a reconstruction): SlimConv with depthwise inner convs in place of every
    depthwise 3x3, ``k = 8/3`` (4 chunks), SE width ``max(C // 32, 24)`` (the L that fits 3.38M params)."""
    return _sc(mobilenet_v2(num_classes=num_classes), k, min_hidden=min_hidden)
