"""Host networks of the HetConv paper (CVPR 2019) that the rest of the zoo lacks.

* ``cifar_vgg16_li``: VGG-16 for CIFAR as in Li et al. (Pruning Filters, ICLR 2017), the paper's Table 1
  host: 13 conv3x3 (no bias) + BN + ReLU, max-pools after convs 2, 4, 7, 10, 13, then
  ``Linear(512, 512) + BN1d + ReLU + Linear(512, classes)`` (no dropout). 14.99M params / 313.5M MACs at
  32x32 (the paper prints 15.00M / 313.74M; it apparently also counted one bias add per output).
  It differs from ``cifar_vgg16`` (the CompConv paper's host) only in the extra 512->512 FC layer.
* ``cifar_mobilenet_v1``: MobileNet v1 for CIFAR (the common "kuangliu pytorch-cifar" layout, which
  reproduces the paper's Table 4 baseline 46.35M MACs): conv3x3 3->32 (stride 1) + BN + ReLU, 13
  depthwise-separable blocks (DW3x3 + BN + ReLU + PW1x1 + BN + ReLU), average pool, ``Linear(1024, classes)``.
* ``cifar_mobilenet_v1_conv``: the same network with every DW+PW pair as ONE dense conv3x3 ``M -> N``
  (the block's stride) + BN + ReLU: the layer HetConv replaces in Table 4
  (``convert(get_model("cifar_mobilenet_v1_conv"), "hetconv", part=32)``).

``se_reduction=r`` (VGG and MobileNet hosts) adds a squeeze-and-excitation unit (GAP, FC C->C/r, ReLU, FC
C/r->C, sigmoid; r=8 in the paper's ``_SE`` rows) after the BN + ReLU of every conv layer but the first.
"""

from __future__ import annotations

from torch import Tensor, nn

from compconv.models.cifar_vgg import VGG16_CFG
from compconv.models.registry import register_model

__all__ = [
    "CifarMobileNetV1",
    "CifarVGGLi",
    "MOBILENET_V1_CFG",
    "SqueezeExcite",
    "cifar_mobilenet_v1",
    "cifar_mobilenet_v1_conv",
    "cifar_vgg16_li",
]

# (out_channels, stride) of MobileNet v1's 13 separable blocks on CIFAR (kuangliu's pytorch-cifar layout).
MOBILENET_V1_CFG: list[tuple[int, int]] = [
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
]


class SqueezeExcite(nn.Module):
    """SE unit (Hu et al.): ``x * sigmoid(FC(ReLU(FC(GAP(x)))))``, ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        if not isinstance(reduction, int) or reduction < 1 or channels // reduction < 1:
            raise ValueError(
                f"se_reduction must be an int in 1..{channels} for {channels} channels, but got {reduction!r}"
            )
        hidden = channels // reduction
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3))
        s = self.fc2(self.relu(self.fc1(s))).sigmoid()
        return x * s[:, :, None, None]


def _conv_bn_relu(
    c_in: int, c_out: int, stride: int, se_reduction: int | None, groups: int = 1, kernel: int = 3
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if se_reduction is not None:
        layers.append(SqueezeExcite(c_out, se_reduction))
    return layers


class CifarVGGLi(nn.Module):
    """Li et al.'s CIFAR VGG-16: ``(B, 3, 32, 32) -> (B, num_classes)``; ``features.0`` is the stem conv."""

    def __init__(
        self, cfg: list[int | str], *, num_classes: int = 10, se_reduction: int | None = None
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            # SE after every conv layer but CONV_1 (the paper's _SE rows: one SE per HetConv layer).
            layers += _conv_bn_relu(c, int(v), 1, se_reduction if layers else None)
            c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class CifarMobileNetV1(nn.Module):
    """MobileNet v1 for 32x32 inputs: ``(B, 3, 32, 32) -> (B, num_classes)``.

    ``separable=True``: each block is DW3x3 + BN + ReLU + PW1x1 + BN + ReLU (MobileNet); ``False``: one dense
    conv3x3 + BN + ReLU per block (the layer the HetConv paper turns into one HetConv). ``conv1`` is the stem.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        separable: bool = True,
        se_reduction: int | None = None,
        width: int = 32,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        blocks: list[nn.Module] = []
        c = width
        for out, stride in MOBILENET_V1_CFG:
            if separable:
                layers = _conv_bn_relu(c, c, stride, None, groups=c) + _conv_bn_relu(
                    c, out, 1, se_reduction, kernel=1
                )
            else:
                layers = _conv_bn_relu(c, out, stride, se_reduction)
            blocks.append(nn.Sequential(*layers))
            c = out
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the final map is 2x2 at 32x32 input
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model()
def cifar_vgg16_li(*, num_classes: int = 10, se_reduction: int | None = None) -> CifarVGGLi:
    """VGG-16 for CIFAR of Li et al. (ICLR17), HetConv Table 1: 13 conv-BN-ReLU, FC 512-512(BN)-classes."""
    return CifarVGGLi(VGG16_CFG, num_classes=num_classes, se_reduction=se_reduction)


@register_model()
def cifar_mobilenet_v1(*, num_classes: int = 10, se_reduction: int | None = None) -> CifarMobileNetV1:
    """CIFAR MobileNet v1 (DW+PW): 3.22M params / 46.35M MACs at 32x32 (HetConv Table 4: 46.36M)."""
    return CifarMobileNetV1(num_classes=num_classes, separable=True, se_reduction=se_reduction)


@register_model()
def cifar_mobilenet_v1_conv(*, num_classes: int = 10, se_reduction: int | None = None) -> CifarMobileNetV1:
    """MobileNet v1 for CIFAR with each DW+PW pair as one dense conv3x3: HetConv Table 4's host to convert."""
    return CifarMobileNetV1(num_classes=num_classes, separable=False, se_reduction=se_reduction)
