"""ResNets for CIFAR (32x32 inputs).

* ``cifar_resnet18`` / ``cifar_resnet34`` / ``cifar_resnet50``: torchvision's ResNet (v1.5, stride in the
  3x3) with a 3x3 stride-1 stem and no max-pool, as in the CompConv paper's Table 7 (CIFAR-100:
  ResNet-18 11.22M / 0.555G MACs, ResNet-50 23.71M / 1.298G). Module names are torchvision's
  (``layer1.0.conv2``, ``layer2.0.downsample.0``), so conversion rules written for one apply to both.
* ``cifar_resnet20/32/44/56/110``: He et al.'s 6n+2 ResNets (16/32/64 channels, basic blocks, option-A
  parameter-free shortcuts: subsample and zero-pad), e.g. ResNet-20 0.27M params / 40.6M MACs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from compconv.models.registry import register_model

__all__ = ["CifarResNet", "BasicBlockA", "cifar_resnet_tv"]


def cifar_resnet_tv(arch: str, *, num_classes: int = 10) -> tv_resnet.ResNet:
    """torchvision's ``arch`` with a CIFAR stem: conv1 = 3x3 stride 1 (64 ch), max-pool removed."""
    model = getattr(tv_resnet, arch)(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model()
def cifar_resnet18(*, num_classes: int = 10) -> tv_resnet.ResNet:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)."""
    return cifar_resnet_tv("resnet18", num_classes=num_classes)


@register_model()
def cifar_resnet34(*, num_classes: int = 10) -> tv_resnet.ResNet:
    """ResNet-34 for 32x32 inputs (3x3 stem, no max-pool)."""
    return cifar_resnet_tv("resnet34", num_classes=num_classes)


@register_model()
def cifar_resnet50(*, num_classes: int = 10) -> tv_resnet.ResNet:
    """ResNet-50 (v1.5 bottlenecks) for 32x32 inputs (3x3 stem, no max-pool)."""
    return cifar_resnet_tv("resnet50", num_classes=num_classes)


class BasicBlockA(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. Option A shortcut: ``x[:, :, ::2, ::2]`` zero-padded."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s 6n+2 CIFAR ResNet: ``(N, 3, 32, 32) -> (N, num_classes)``; depth = 6n + 2."""

    def __init__(self, depth: int, *, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), but got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c = widths[0]
        stages = []
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlockA(c, w, 2 if i > 0 and j == 0 else 1))
                c = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _make(depth: int):  # noqa: ANN202 - builder factory
    def builder(*, num_classes: int = 10) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes)

    builder.__name__ = f"cifar_resnet{depth}"
    builder.__doc__ = f"ResNet-{depth} for CIFAR (6n+2, n={(depth - 2) // 6}, option-A shortcuts)."
    return register_model()(builder)


cifar_resnet20 = _make(20)
cifar_resnet32 = _make(32)
cifar_resnet44 = _make(44)
cifar_resnet56 = _make(56)
cifar_resnet110 = _make(110)
