"""VGG-16 for CIFAR (32x32), the host network of the CompConv paper's Tables 1-6.

13 conv3x3 (+BN+ReLU) layers ``64,64,M,128,128,M,256x3,M,512x3,M,512x3,M`` and one ``Linear(512, classes)``:
14.72M params / 313.2M MACs at 32x32 with 10 classes (CompConv Table 3 prints 14.7M / 314M).
"""

from __future__ import annotations

from torch import Tensor, nn

from compconv.models.registry import register_model

__all__ = ["CifarVGG", "cifar_vgg16", "VGG16_CFG"]

VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                              512, 512, 512, "M"]


class CifarVGG(nn.Module):
    """``(N, 3, 32, 32) -> (N, num_classes)``. ``features`` holds the convs (``features.0`` is the stem)."""

    def __init__(self, cfg: list[int | str], *, num_classes: int = 10, in_channels: int = 3,
                 conv_bias: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=conv_bias), nn.BatchNorm2d(int(v)),
                           nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model()
def cifar_vgg16(*, num_classes: int = 10, conv_bias: bool = True) -> CifarVGG:
    """VGG-16 for 32x32 inputs (BN after every conv, one linear classifier), as in the CompConv paper."""
    return CifarVGG(VGG16_CFG, num_classes=num_classes, conv_bias=conv_bias)
