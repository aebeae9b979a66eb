"""ImageNet models from torchvision (random init: nothing is downloaded), under the zoo's registry."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from compconv.models.registry import register_model

__all__ = ["resnet18", "resnet50", "resnet101", "vgg16", "mobilenet_v2"]


@register_model()
def resnet18(*, num_classes: int = 1000) -> nn.Module:
    """torchvision ResNet-18 (11.69M params, 1.82G MACs at 224x224)."""
    return tvm.resnet18(num_classes=num_classes)


@register_model()
def resnet50(*, num_classes: int = 1000) -> nn.Module:
    """torchvision ResNet-50 v1.5 (25.56M params, 4.09G MACs at 224x224; CompConv Table 8)."""
    return tvm.resnet50(num_classes=num_classes)


@register_model()
def resnet101(*, num_classes: int = 1000) -> nn.Module:
    """torchvision ResNet-101 v1.5."""
    return tvm.resnet101(num_classes=num_classes)


@register_model()
def vgg16(*, num_classes: int = 1000) -> nn.Module:
    """torchvision VGG-16 (configuration D, 224x224)."""
    return tvm.vgg16(num_classes=num_classes)


@register_model()
def mobilenet_v2(*, num_classes: int = 1000) -> nn.Module:
    """torchvision MobileNetV2."""
    return tvm.mobilenet_v2(num_classes=num_classes)
