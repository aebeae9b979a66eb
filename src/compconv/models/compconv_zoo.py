"""CompConv variants of the zoo's models, registered by name.

* ``comp{C0}_{base}`` for C0 in 32..512: Eq. 6 with that C0, every conv but the stem (the paper's rule),
  e.g. ``comp128_resnet50``, ``comp128_cifar_vgg16`` (the paper's Comp-VGG16), ``comp128_cifar_resnet20``.
* The ablation variants of the CompConv paper on CIFAR VGG-16: ``comp_vgg16_d{1..4}`` (Table 3, one global
  d for every conv but the stem), ``comp_vgg16_1s_d{1,2,3}`` (Table 4 "-1s": the first stage only, i.e. its
  non-stem conv) and ``comp_vgg16_5s_d{1,2,3}`` (Table 4 "-5s": every conv with 512 output channels, which
  is the reading that fits the paper's numbers; see docs/compconv.md).

Every builder takes ``num_classes`` and any further ``compconv.convert`` options (``identity``,
``shuffle``, ``depth_from``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from compconv.convert import convert
from compconv.models.registry import get_model_builder, register_model

__all__ = ["C0_VALUES", "COMP_BASES"]

C0_VALUES = (32, 64, 128, 256, 512)
COMP_BASES = ("cifar_vgg16", "cifar_resnet18", "cifar_resnet50", "cifar_resnet20", "cifar_resnet32",
              "cifar_resnet56", "resnet18", "resnet50")
_VGG_FIRST_STAGE = ("features.3",)  # the second 64-channel conv; features.0 is the stem


def _comp_c0(base: str, c0: int) -> Callable[..., nn.Module]:
    def builder(*, num_classes: int | None = None, **options: Any) -> nn.Module:
        kw = {} if num_classes is None else {"num_classes": num_classes}
        model = get_model_builder(base)(**kw)
        return convert(model, "compconv", c0=c0, **options)

    builder.__name__ = f"comp{c0}_{base}"
    builder.__doc__ = f"{base} with every conv but the stem replaced by CompConv2d, d by Eq. 6 with C0={c0}."
    return builder


def _vgg_variant(kind: str, depth: int) -> Callable[..., nn.Module]:
    def builder(*, num_classes: int = 10, **options: Any) -> nn.Module:
        model = get_model_builder("cifar_vgg16")(num_classes=num_classes)
        include: Any = None
        if kind == "1s":
            include = list(_VGG_FIRST_STAGE)
        elif kind == "5s":
            include = lambda name, m: m.out_channels == 512  # noqa: E731 - stages 4 and 5
        return convert(model, "compconv", depth=depth, include=include, **options)

    suffix = "" if kind == "global" else f"_{kind}"
    builder.__name__ = f"comp_vgg16{suffix}_d{depth}"
    table = 3 if kind == "global" else 4
    builder.__doc__ = f"CIFAR VGG-16 with CompConv d={depth} ({kind}; CompConv paper Table {table})."
    return builder


for _base in COMP_BASES:
    for _c0 in C0_VALUES:
        _b = _comp_c0(_base, _c0)
        register_model(_b.__name__)(_b)
for _d in (1, 2, 3, 4):
    _b = _vgg_variant("global", _d)
    register_model(_b.__name__)(_b)
for _kind in ("1s", "5s"):
    for _d in (1, 2, 3):
        _b = _vgg_variant(_kind, _d)
        register_model(_b.__name__)(_b)
