"""XSepConv (Chen, Lu, Xue, Liao, arXiv 2002.12046, 2020): an extremely separated depthwise convolution.

It replaces a large-kernel *depthwise* ``k x k`` conv by three depthwise layers (``groups = C``)::

    x (N, C, H, W) -> zero-pad 1 px on two adjacent sides (direction d) -> DW 2x2        -> BN -> NL
                   -> DW 1 x k, padding (0, k//2), stride (1, s)                          -> BN -> NL
                   -> DW k x 1, padding (k//2, 0), stride (s, 1)                          -> y (N, C, H', W')

``H', W'`` equal those of the replaced ``k x k`` conv with "same" padding ``k//2`` (``ceil(H/s)``). The
paper puts BN + nonlinearity after *all three* layers; as a drop-in for the conv of a host's
``conv -> BN -> NL`` the host already supplies the third pair, so the module holds the first two
(``norm_act=True``, activation = the host's, e.g. h-swish in MobileNetV3) and ends with the raw ``k x 1``
output. Cost (stride 1): ``4hwc + 2khwc`` MACs and ``4c + 2kc`` weights vs ``k^2 hwc`` / ``k^2 c`` (ratio
``(4 + 2k) / k^2``: 0.56 at k=5); stride 2 (h, w = input size): ``4hwc + khwc/2 + khwc/4`` vs ``k^2 hwc/4``,
below 1 only for ``k >= 7``, which is why downsampling DW convs with smaller kernels are kept by default
(``downsample_min_k=7``). Receptive field ``k + 1``.

The 2x2 layer's padding ("improved symmetric padding", Sec. 3.2): every 2x2 layer pads all its channels in
one direction ``d``; the direction rotates over the network's 2x2 layers in forward order,
``p(i) = (RB, LT, LB, RT)[i % 4]``, so consecutive pairs cancel their half-pixel shifts. ``assign_padding``
numbers the XSepConvs of a model; ``convert_xsepconv`` converts, numbers and copies the host's activation.
``padding_strategy="original"`` is the 4-group padding of Wu et al. (channel groups LT, RB, LB, RT).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from compconv.layers.base import CompactConv2d, register_method
from compconv.layers.ops import PadAnyConv2d, pad_any

__all__ = [
    "DIRECTIONS",
    "DIRECTION_ORDER",
    "XSepConv2d",
    "assign_padding",
    "convert_xsepconv",
    "pad_2x2",
]

# F.pad order (left, right, top, bottom); "RB" = one zero column on the right and one zero row at the bottom.
DIRECTIONS: dict[str, tuple[int, int, int, int]] = {
    "RB": (0, 1, 0, 1),
    "LT": (1, 0, 1, 0),
    "LB": (1, 0, 0, 1),
    "RT": (0, 1, 1, 0),
}
DIRECTION_ORDER: tuple[str, ...] = ("RB", "LT", "LB", "RT")  # p(i) = DIRECTION_ORDER[i % 4]
ORIGINAL_GROUP_ORDER: tuple[str, ...] = ("LT", "RB", "LB", "RT")  # Wu et al.'s 4 channel groups
VARIANTS: tuple[str, ...] = ("standard", "no2x2", "b", "p")
STRATEGIES: tuple[str, ...] = ("improved", "original")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}


def _direction(d: str | int) -> str:
    if isinstance(d, bool) or not isinstance(d, (str, int)):
        raise TypeError(f"pad_direction must be one of {DIRECTION_ORDER} or an int index, but got {d!r}")
    if isinstance(d, int):
        return DIRECTION_ORDER[d % 4]
    if d.upper() not in DIRECTIONS:
        raise ValueError(f"pad_direction must be one of {DIRECTION_ORDER} or an int index, but got {d!r}")
    return d.upper()


def _group_sizes(c: int, n: int = 4) -> list[int]:
    """Split ``c`` channels into ``n`` groups as evenly as possible, the earlier groups taking the extras."""
    base, extra = divmod(c, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def pad_2x2(x: Tensor, direction: str = "RB", strategy: str = "improved", mode: str = "zeros") -> Tensor:
    """Pad ``(N, C, H, W)`` to ``(N, C, H+1, W+1)`` for a 2x2 "same" conv.

    ``strategy="improved"`` pads every channel in ``direction``; ``"original"`` pads four contiguous
    channel groups LT, RB, LB, RT (Wu et al. 2019; uneven ``C`` gives the earlier groups one more).
    """
    # pad_any: the host's mode on a map of any size (variant "b" pads the stride-2 output, maybe 1x1)
    if strategy == "improved":
        return pad_any(x, DIRECTIONS[_direction(direction)], mode)
    if strategy != "original":
        raise ValueError(f"strategy must be one of {STRATEGIES}, but got {strategy!r}")
    h, w = x.shape[-2:]
    full = pad_any(x, (1, 1, 1, 1), mode)
    parts, start = [], 0
    for name, size in zip(ORIGINAL_GROUP_ORDER, _group_sizes(x.shape[1]), strict=True):
        left, _, top, _ = DIRECTIONS[name]
        # the window of the all-sides pad that equals padding this group with (left, right, top, bottom)
        parts.append(full[:, start : start + size, 1 - top : 1 - top + h + 1, 1 - left : 1 - left + w + 1])
        start += size
    return torch.cat(parts, 1)


@register_method("xsepconv")
class XSepConv2d(CompactConv2d):
    """Extremely separated depthwise conv: DW 2x2 (rotating padding) -> DW 1xk -> DW kx1 (XSepConv, 2020).

    Replaces a depthwise conv (``groups == in_channels == out_channels``) with a square odd kernel >= 3,
    dilation 1, stride 1 or 2, and "same" padding (``kernel_size // 2``).

    Args (besides ``nn.Conv2d``'s):
        k: the separable kernel length (default: the replaced conv's kernel size; the paper uses k=3 in
            place of the 5x5 DWs of MobileNetV3-Small's last stage). Odd, >= 3. Output size is unchanged.
        pad_direction: the 2x2 layer's padding, ``"RB"``, ``"LT"``, ``"LB"``, ``"RT"`` or an int ``i``
            (``p(i)``); ``assign_padding`` sets it network-wide (paper: rotating in forward order).
        padding_strategy: ``"improved"`` (paper, one direction per layer) or ``"original"`` (4 groups).
        norm_act: BN + activation after the 2x2 and the 1xk layers (paper: yes; the host's BN + NL follow
            the kx1). With False the three layers are purely linear.
        activation: the host's nonlinearity, one of ``relu``, ``relu6``, ``hardswish``, ``silu``,
            ``identity`` (paper's host MobileNetV3-Small: ``hardswish`` in the 5x5 blocks).
        variant: ``"standard"`` (2x2, 1xk, kx1), ``"no2x2"`` (Fig. 6b), ``"b"`` (1xk, kx1, 2x2; XSepConv-B),
            ``"p"`` (2x2 in parallel with 1xk -> kx1, summed; XSepConv-P; stride 1 only).
        downsample_min_k: a stride-2 conv is refused below this ``k`` (paper: 7, where the stride-2 cost
            ratio ``(16 + 3k) / k^2`` drops below 1).

    Shapes: ``(N, C, H, W) -> (N, C, H', W')``, ``H' = ceil(H / s)``, like the replaced conv.
    """

    paper = "Chen, Lu, Xue, Liao. XSepConv: Extremely Separated Convolution. arXiv 2002.12046, 2020"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        k: int | None = None,
        pad_direction: str | int = "RB",
        padding_strategy: Literal["improved", "original"] = "improved",
        norm_act: bool = True,
        activation: str = "relu",
        variant: Literal["standard", "no2x2", "b", "p"] = "standard",
        downsample_min_k: int = 7,
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                            padding_mode)
        c = in_channels
        if not (groups == in_channels == out_channels):
            kind = "dense" if groups == 1 else "grouped"
            raise ValueError(
                f"{kind} conv (in_channels={in_channels}, out_channels={out_channels}, groups={groups}): "
                "XSepConv replaces depthwise convs (groups == in_channels == out_channels)"
            )
        kh, kw = self.kernel_size
        if kh != kw or kh % 2 == 0 or kh < 3:
            raise ValueError(f"kernel_size must be square and odd >= 3 for XSepConv, but got {(kh, kw)}")
        if self.dilation != (1, 1):
            raise ValueError(f"dilation must be 1 for XSepConv, but got {self.dilation}")
        if self.stride not in ((1, 1), (2, 2)):
            raise ValueError(f"stride must be 1 or 2 for XSepConv, but got {self.stride}")
        if self.padding != "same" and self.padding != (kh // 2, kw // 2):
            raise ValueError(
                f"padding must be kernel_size // 2 = {kh // 2} ('same') for XSepConv, but got {self.padding}"
            )
        k = kh if k is None else k
        if not isinstance(k, int) or isinstance(k, bool) or k < 3 or k % 2 == 0:
            raise ValueError(f"k must be an odd int >= 3 (paper: 3, 5, 7), but got {k!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, but got {variant!r}")
        if padding_strategy not in STRATEGIES:
            raise ValueError(f"padding_strategy must be one of {STRATEGIES}, but got {padding_strategy!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, but got {activation!r}")
        s = self.stride[0]
        if s == 2 and k < downsample_min_k:
            raise ValueError(
                f"stride-2 XSepConv with k={k} costs {(16 + 3 * k) / k**2:.2f}x the DW {kh}x{kw} "
                f"(ratio (16+3k)/k^2 < 1 only for k >= 7); kept below downsample_min_k={downsample_min_k}"
            )
        if s == 2 and variant == "p":
            raise ValueError("variant='p' (XSepConv-P) is defined for stride 1 only, but got stride 2")

        self.k = k
        self.pad_direction = _direction(pad_direction)
        self.padding_strategy = padding_strategy
        self.norm_act = norm_act
        self.activation = activation
        self.variant = variant
        fk = {"device": device, "dtype": dtype}
        # the layer that ends the module carries the host's bias (the host's BN + NL follow it)
        self.dw2x2 = (
            None if variant == "no2x2"
            else nn.Conv2d(c, c, 2, 1, 0, 1, c, bias and variant == "b", **fk)
        )
        # k may exceed the host's kernel: PadAnyConv2d pads the host's mode on maps of any size
        self.dw1xk = PadAnyConv2d(c, c, (1, k), (1, s), (0, k // 2), 1, c, False, padding_mode, **fk)
        self.dwkx1 = PadAnyConv2d(c, c, (k, 1), (s, 1), (k // 2, 0), 1, c, bias and variant != "b",
                                  padding_mode, **fk)
        self.bn1 = nn.BatchNorm2d(c, **fk) if norm_act else nn.Identity()
        self.act1 = ACTIVATIONS[activation]() if norm_act else nn.Identity()
        self.bn2 = nn.BatchNorm2d(c, **fk) if norm_act and variant in ("standard", "b") else nn.Identity()
        self.act2 = ACTIVATIONS[activation]() if norm_act and variant in ("standard", "b") else nn.Identity()

    # -- the converter's hooks -------------------------------------------------------------------
    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Names and ranges of XSepConv's options, for any layer."""
        from compconv.options import check_bool, check_choice, check_int

        super().validate_options(options)
        o = options
        check_int("k", o.get("k"), minimum=3, odd=True, optional=True, hint="paper: 3, 5, 7")
        _direction(o.get("pad_direction", "RB"))
        check_choice("padding_strategy", o.get("padding_strategy", "improved"), STRATEGIES)
        check_bool("norm_act", o.get("norm_act", True))
        check_choice("activation", o.get("activation", "relu"), tuple(ACTIVATIONS))
        check_choice("variant", o.get("variant", "standard"), VARIANTS)
        check_int("downsample_min_k", o.get("downsample_min_k", 7))

    @classmethod
    def ineligible_reason(cls, conv: nn.Conv2d, **hparams: Any) -> str | None:
        if isinstance(conv, nn.Conv2d) and not (conv.groups == conv.in_channels == conv.out_channels):
            kind = "dense" if conv.groups == 1 else "grouped"
            return f"{kind} conv (groups={conv.groups}): XSepConv replaces depthwise convs"
        return super().ineligible_reason(conv, **hparams)

    @classmethod
    def finalize_conversion(cls, model: nn.Module, converted: list[str], *,
                            layer_options: dict[str, set[str]] | None = None, **hparams: Any) -> None:
        """The paper's network-level steps, unless the user fixed them (globally or in a layer's override):
        the host's activation, the rotating padding."""
        # layers whose override set an option keep it: the network-level step must not undo it
        fixed = {id(model.get_submodule(n)): keys for n, keys in (layer_options or {}).items()}
        if "activation" not in hparams:
            acts = _host_activations(model)
            for m in model.modules():
                if id(m) in acts and "activation" not in fixed.get(id(m), ()):
                    m.set_activation(acts[id(m)])  # type: ignore[operator]
        if "pad_direction" not in hparams:
            pads = {"pad_direction", "padding_strategy"}
            kept = [(m, m.pad_direction, m.padding_strategy) for m in model.modules()
                    if isinstance(m, XSepConv2d) and pads & set(fixed.get(id(m), ()))]
            assign_padding(model, strategy=hparams.get("padding_strategy", "improved"))
            for m, direction, strategy in kept:
                m.pad_direction, m.padding_strategy = direction, strategy

    def set_activation(self, activation: str) -> None:
        """Use the host's nonlinearity between the layers (``convert_xsepconv`` calls it)."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, but got {activation!r}")
        self.activation = activation
        if self.norm_act:
            self.act1 = ACTIVATIONS[activation]()
            if self.variant in ("standard", "b"):
                self.act2 = ACTIVATIONS[activation]()

    # -- forward ---------------------------------------------------------------------------------
    def _two(self, x: Tensor) -> Tensor:
        assert self.dw2x2 is not None
        return self.dw2x2(pad_2x2(x, self.pad_direction, self.padding_strategy, self.padding_mode))

    def _sep(self, x: Tensor) -> Tensor:
        return self.dwkx1(self.act2(self.bn2(self.dw1xk(x))))

    def _forward(self, x: Tensor) -> Tensor:
        # (N, C, H, W) -> (N, C, ceil(H/s), ceil(W/s)); CompactConv2d.forward checks the input first
        if self.variant == "standard":
            return self._sep(self.act1(self.bn1(self._two(x))))
        if self.variant == "no2x2":
            return self.dwkx1(self.act1(self.bn1(self.dw1xk(x))))
        if self.variant == "b":  # 1xk -> BN NL -> kx1 -> BN NL -> 2x2
            return self._two(self.act1(self.bn1(self._sep(x))))
        return self.act1(self.bn1(self._two(x))) + self.dwkx1(self.act2(self.bn2(self.dw1xk(x))))  # "p"

    def extra_repr(self) -> str:
        pad = self.pad_direction if self.padding_strategy == "improved" else "original-4group"
        return (f"{self.in_channels}, kernel_size={self.kernel_size}, stride={self.stride}, k={self.k}, "
                f"pad={pad}, variant={self.variant}, norm_act={self.norm_act}, activation={self.activation}")


def _forward_order(model: nn.Module, example_input: Tensor | None) -> list[XSepConv2d]:
    mods = [m for m in model.modules() if isinstance(m, XSepConv2d) and m.dw2x2 is not None]
    if example_input is None:
        return mods  # registration order: the forward order of sequential hosts (MobileNets, ResNets)
    order: list[XSepConv2d] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _inp: order.append(mod)) for m in mods]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    seen: list[XSepConv2d] = []
    for m in order:
        if all(m is not s for s in seen):
            seen.append(m)
    return seen + [m for m in mods if all(m is not s for s in seen)]


def assign_padding(
    model: nn.Module,
    *,
    strategy: Literal["improved", "original"] = "improved",
    last_original: bool = False,
    example_input: Tensor | None = None,
) -> list[str]:
    """Number the model's 2x2 layers in forward order and set ``p(i) = (RB, LT, LB, RT)[i % 4]``.

    ``last_original=True`` gives the last layer Wu et al.'s 4-group padding when ``N % 4 == 1`` (the paper's
    "slightly better" option). ``strategy="original"`` gives every layer the 4-group padding (Table 3's
    "Original-Padding"). The order is the modules' registration order, or the order of a forward pass over
    ``example_input`` when given. Returns the directions in that order (``"orig"`` for 4-group layers).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, but got {strategy!r}")
    mods = _forward_order(model, example_input)
    out = []
    for i, m in enumerate(mods):
        m.pad_direction = DIRECTION_ORDER[i % 4]
        orig = strategy == "original" or (last_original and len(mods) % 4 == 1 and i == len(mods) - 1)
        m.padding_strategy = "original" if orig else "improved"
        out.append("orig" if orig else m.pad_direction)
    return out


def _activation_name(mod: nn.Module) -> str | None:
    for name, cls in ACTIVATIONS.items():
        if type(mod) is cls and name != "identity":
            return name
    return None


def _host_activations(model: nn.Module) -> dict[int, str]:
    """``id(xsepconv) -> activation name`` for XSepConvs inside a ``Sequential(conv, BN, act)``."""
    found: dict[int, str] = {}
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.children())
        for i, m in enumerate(children):
            if isinstance(m, XSepConv2d):
                for nxt in children[i + 1 : i + 3]:
                    act = _activation_name(nxt)
                    if act is not None:
                        found[id(m)] = act
                        break
    return found


def convert_xsepconv(
    model: nn.Module,
    *,
    infer_activation: bool = True,
    padding_strategy: Literal["improved", "original"] = "improved",
    last_original: bool = False,
    example_input: Tensor | None = None,
    **convert_kwargs: Any,
) -> nn.Module | tuple[nn.Module, Any]:
    """``compconv.convert(model, "xsepconv", ...)`` followed by the network-level steps of the paper.

    After the swap, each XSepConv takes the nonlinearity of its host (the activation that follows it in its
    ``Sequential(conv, BN, act)``, e.g. h-swish in MobileNetV3; ``infer_activation=False`` keeps the
    ``activation`` option) and the 2x2 layers get the rotating padding (``assign_padding``).
    Returns what ``convert`` returns (the model, or ``(model, report)`` with ``return_report=True``).
    """
    from compconv.convert import convert

    out = convert(model, "xsepconv", **convert_kwargs)
    m = out[0] if isinstance(out, tuple) else out
    if infer_activation:
        for mod_id, act in _host_activations(m).items():
            for x in m.modules():
                if id(x) == mod_id:
                    x.set_activation(act)  # type: ignore[operator]
    assign_padding(m, strategy=padding_strategy, last_original=last_original, example_input=example_input)
    return out

