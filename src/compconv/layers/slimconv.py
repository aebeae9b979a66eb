"""SlimConv (Qiu, Chen, Liu, Zhang, Zeng, IEEE TIP 30, 2021): fewer channels by recombining features.

For an input ``X (N, C, H, W)``, ``s = split`` chunks (paper's ``k = 2s/3``; default ``s = 2``, ``k = 4/3``),
``q = C // s`` and ``q2 = q // 2``:

* **Reconstruct.** SE-style channel weights ``w = sigmoid(fc2(relu(bn(fc1(avgpool(X))))))`` (fc1 ``C -> h``
  without bias, ``h = max(C // reduction, min_hidden)``, fc2 ``h -> C`` with bias), and their channel-reversed
  copy ``w_f = flip(w)``. Top: ``w * X`` cut into ``s`` contiguous chunks of ``q`` channels, summed -> ``q``.
  Bottom: the same with ``w_f`` -> ``q`` (``C % s`` trailing channels are left out of the sums).
* **Transform.** Top: ``n x n`` conv ``q -> q`` (the host's stride/padding/dilation/groups) + BN. Bottom:
  1x1 ``q -> q2`` + BN + ReLU (input resolution), then ``n x n`` ``q2 -> q2`` + BN.
* **Fuse.** ``concat(top, bottom)`` -> ``q + q2`` channels (``3C/4`` for ``s = 2``), no activation.

So the module's *native* output width is ``q + q2 = C / k``, not ``C_out``: the following layer must take the
reduced width. In a ResNet bottleneck the next 1x1 conv does (``convert_blocks`` builds the paper's
models: SlimConv in place of ``conv2``, ``bn2`` removed, ``conv3`` takes ``q + q2`` channels). As a plain
drop-in for an ``nn.Conv2d(C, C_out)`` (``compconv.convert(model, "slimconv")``) the module appends a 1x1
conv ``q + q2 -> C_out`` when ``C_out`` differs from the native width, as the authors advise for plain convs
(github.com/JiaxiongQ/SlimConv issue #2); ``project=False`` refuses instead and points at the block converter.

Depthwise hosts (``groups == C``, MobileNetV2) get depthwise inner ``n x n`` convs; grouped hosts (ResNeXt)
pass the cardinality to both ``n x n`` convs (``group_rule="gcd"`` takes ``gcd(groups, width)`` where it does
not divide, as for Sc-ResNeXt-101 32x3d). Cost (s = 2, ``C1 = C2 = C``, conv weights only, Eq. 4):
``(5/16 n^2 + 1/8) C^2`` vs ``n^2 C^2``: 0.326x for 3x3.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from fractions import Fraction
from typing import Any, Literal

import torch
from torch import Tensor, nn

from compconv.layers.base import CompactConv2d, register_method

__all__ = ["SlimConv2d", "convert_blocks", "convert_resnet_blocks", "slim_widths", "split_from_k"]

FLIP_MODES: tuple[str, ...] = ("flip", "none", "both", "shuffle")
GROUP_RULES: tuple[str, ...] = ("strict", "gcd")


def split_from_k(k: float | Fraction | str) -> int:
    """The chunk count ``s`` for the paper's reduction factor ``k = 2s/3`` (4/3 -> 2, 2 -> 3, 8/3 -> 4)."""
    try:
        kf = Fraction(k).limit_denominator(100)  # 4/3 given as a float 1.333... maps back to 4/3
    except (ValueError, TypeError):
        raise ValueError(f"k must be a number 2s/3 (4/3, 2, 8/3, ...), but got {k!r}") from None
    s = kf * 3 / 2
    if s.denominator != 1 or s < 2:
        raise ValueError(f"k must be 2s/3 for an integer s >= 2 (4/3, 2, 8/3, 10/3, ...), but got {k!r}")
    return int(s)


def slim_widths(in_channels: int, split: int = 2, shuffled_path: bool = False) -> tuple[int, int, int]:
    """``(q, q2, native_out)`` with ``q = C // s``, ``q2 = q // 2``, ``native_out = q + q2 (+ q2)``."""
    q = in_channels // split
    q2 = q // 2
    return q, q2, q + q2 + (q2 if shuffled_path else 0)


def _inner_groups(host_groups: int, channels: int, in_channels: int, rule: str) -> int:
    if host_groups == 1:
        return 1
    if host_groups == in_channels:  # depthwise host: depthwise inner convs
        return channels
    if channels % host_groups == 0:
        return host_groups
    if rule == "gcd":
        return math.gcd(host_groups, channels)
    raise ValueError(
        f"groups={host_groups} does not divide the SlimConv inner width {channels}; "
        "pass group_rule='gcd' to use gcd(groups, width) there"
    )


@register_method("slimconv")
class SlimConv2d(CompactConv2d):
    """SlimConv: Reconstruct (SE weights, flip, split-and-add) -> Transform -> Fuse (TIP 2021).

    Args (besides ``nn.Conv2d``'s; the host conv's stride/padding/dilation go on both ``n x n`` convs):
        split: chunks ``s`` summed per pathway (paper default 2, i.e. ``k = 4/3``; 4 for ``k = 8/3``).
        k: alias for ``split`` (``k = 2s/3``); give one of them.
        reduction: SE reduction ``r`` (paper: 32).
        min_hidden: floor ``L`` of the SE width ``h = max(C // r, L)`` (paper: unstated "fixed value" for
            thin nets; default 2, 24 fits the Sc-MobileNetV2 row).
        flip: ``"flip"`` (paper: bottom uses the channel-reversed weights), ``"none"`` (w/o flipping),
            ``"both"`` (only flipping), ``"shuffle"`` (a fixed seeded channel permutation; "-sf").
        shuffled_path: add a third pathway (a copy of the bottom one) fed with shuffled weights ("-3b-sf").
        project: when ``out_channels`` differs from the native width ``q + q2``, append a 1x1 conv to
            ``out_channels`` (plain drop-in); with False, such an ``out_channels`` is an error.
        group_rule: ``"strict"`` (``groups`` must divide the inner widths) or ``"gcd"``.
        shuffle_seed: seed of the "shuffle" permutation (stored as a buffer).

    Shapes: ``(N, C, H, W) -> (N, C_out, H', W')`` with ``H', W'`` of the replaced conv; ``C_out`` is
    ``out_channels`` (native ``q + q2`` when ``out_channels == native_channels``). The SE's BN runs on
    ``(N, h, 1, 1)``, so training needs ``N > 1`` (as in the official code).
    """

    paper = ("Qiu, Chen, Liu, Zhang, Zeng. SlimConv: Reducing Channel Redundancy in Convolutional Neural "
             "Networks by Features Recombining. IEEE TIP 30, 2021")

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
        split: int | None = None,
        k: float | Fraction | str | None = None,
        reduction: int = 32,
        min_hidden: int = 2,
        flip: Literal["flip", "none", "both", "shuffle"] = "flip",
        shuffled_path: bool = False,
        project: bool = True,
        group_rule: Literal["strict", "gcd"] = "strict",
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                            padding_mode)
        if self.kernel_size == (1, 1):
            raise ValueError("1x1 conv: SlimConv replaces spatial convs (kernel_size > 1)")
        if split is not None and k is not None and split_from_k(k) != split:
            raise ValueError(f"expected split or k (k = 2 split / 3), but got split={split} and k={k}")
        if split is None:
            split = 2 if k is None else split_from_k(k)
        if not isinstance(split, int) or isinstance(split, bool) or split < 2:
            raise ValueError(f"split must be an int >= 2 (paper: 2, i.e. k=4/3), but got {split!r}")
        for name, v in (("reduction", reduction), ("min_hidden", min_hidden)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, but got {v!r}")
        if flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, but got {flip!r}")
        if group_rule not in GROUP_RULES:
            raise ValueError(f"group_rule must be one of {GROUP_RULES}, but got {group_rule!r}")
        q, q2, native = slim_widths(in_channels, split, shuffled_path)
        if q2 < 1:
            raise ValueError(
                f"in_channels={in_channels} is too narrow for split={split}: SlimConv needs "
                f"in_channels >= 2 * split = {2 * split} (q = C // split = {q}, q // 2 = {q2})"
            )
        depthwise = groups == in_channels and in_channels > 1
        if groups != 1 and not depthwise and in_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels}")
        if out_channels != native and not project:
            raise ValueError(
                f"SlimConv2d(in_channels={in_channels}, split={split}) outputs q + q//2 = {native} channels, "
                f"but out_channels={out_channels} and project=False; let the next layer take {native} "
                "channels (compconv.layers.slimconv.convert_blocks does this for ResNet/MobileNetV2 blocks) "
                "or set project=True"
            )
        self.split, self.q, self.q2, self.native_channels = split, q, q2, native
        self.hidden = max(in_channels // reduction, min_hidden)
        self.reduction, self.min_hidden = reduction, min_hidden
        self.flip, self.shuffled_path = flip, shuffled_path
        fk = {"device": device, "dtype": dtype}
        g_top = _inner_groups(groups, q, in_channels, group_rule)
        g_bot = _inner_groups(groups, q2, in_channels, group_rule)
        self.inner_groups = (g_top, g_bot)
        kk, s, p, d, pm = self.kernel_size, self.stride, self.padding, self.dilation, padding_mode

        # Reconstruct: SE weights (official code: conv no bias -> BN -> ReLU -> conv bias -> sigmoid).
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, self.hidden, 1, bias=False, **fk),
            nn.BatchNorm2d(self.hidden, **fk),
            nn.ReLU(inplace=True),
            nn.Conv2d(self.hidden, in_channels, 1, bias=True, **fk),
            nn.Sigmoid(),
        )
        # Transform: top n x n + BN; bottom 1x1 + BN + ReLU, n x n + BN (BN/ReLU placement: official code).
        self.top = nn.Sequential(nn.Conv2d(q, q, kk, s, p, d, g_top, False, pm, **fk),
                                 nn.BatchNorm2d(q, **fk))

        def bottom() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(q, q2, 1, bias=False, **fk), nn.BatchNorm2d(q2, **fk), nn.ReLU(inplace=True),
                nn.Conv2d(q2, q2, kk, s, p, d, g_bot, False, pm, **fk), nn.BatchNorm2d(q2, **fk),
            )

        self.bottom = bottom()
        self.third = bottom() if shuffled_path else None
        if flip == "shuffle" or shuffled_path:
            g = torch.Generator().manual_seed(shuffle_seed)
            self.register_buffer("perm", torch.randperm(in_channels, generator=g))
        else:
            self.perm = None
        self.proj = nn.Conv2d(native, out_channels, 1, bias=bias, **fk) if out_channels != native else None
        self.bias = nn.Parameter(torch.zeros(out_channels, **fk)) if bias and self.proj is None else None

    # -- the converter's hooks -------------------------------------------------------------------
    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Names and ranges of SlimConv's options, for any layer."""
        from compconv.options import check_bool, check_choice, check_int

        super().validate_options(options)
        o = options
        check_int("split", o.get("split"), minimum=2, optional=True, hint="paper: 2, i.e. k=4/3")
        if o.get("k") is not None:
            s = split_from_k(o["k"])
            if o.get("split") is not None and o["split"] != s:
                raise ValueError(f"expected split or k (k = 2 split / 3), but got split={o['split']} and k={o['k']}")
        check_int("reduction", o.get("reduction", 32), minimum=1, hint="paper: 32")
        check_int("min_hidden", o.get("min_hidden", 2), minimum=1)
        check_choice("flip", o.get("flip", "flip"), FLIP_MODES)
        check_bool("shuffled_path", o.get("shuffled_path", False))
        check_bool("project", o.get("project", True))
        check_choice("group_rule", o.get("group_rule", "strict"), GROUP_RULES)
        check_int("shuffle_seed", o.get("shuffle_seed", 0))

    @classmethod
    def resolve_hparams(cls, conv: nn.Conv2d, **hparams: Any) -> tuple[dict[str, Any], str]:
        hp = dict(hparams)
        split = hp.get("split") or (split_from_k(hp["k"]) if hp.get("k") is not None else 2)
        _, _, native = slim_widths(conv.in_channels, split, bool(hp.get("shuffled_path", False)))
        train_note = "training needs batch >= 2 (BatchNorm in the SE branch)"
        if conv.out_channels != native and hp.get("project", True):
            return hp, (f"plain drop-in: SlimConv ({native} ch) + 1x1 to {conv.out_channels}; "
                        f"convert_blocks gives the paper's block; {train_note}")
        return hp, train_note

    # -- forward ---------------------------------------------------------------------------------
    def _chunk_sum(self, x: Tensor, w: Tensor) -> Tensor:
        xs = (x * w)[:, : self.split * self.q]  # contiguous chunks, as torch.split in the official code
        return xs.unflatten(1, (self.split, self.q)).sum(1)  # no size unpacking: torch.fx traces it

    # The SE branch's BatchNorm normalises (N, h, 1, 1) over the batch alone, as in the official code: in
    # training it needs N >= 2 (forward says so, naming the module, before BatchNorm fails inside).
    min_train_batch = 2

    def _min_batch_reason(self) -> str:
        return ("its SE branch's BatchNorm normalises (N, h, 1, 1) over the batch alone (as in the official "
                "code), so it needs N >= 2 in training; use a larger batch or call .eval()")

    def _forward(self, x: Tensor) -> Tensor:
        # (N, C, H, W) -> (N, C_out, H', W'); CompactConv2d.forward checks the input (and batch) first
        w = self.se(x)
        w_f = w.flip(1)
        w_top = w_f if self.flip == "both" else w
        if self.flip == "flip" or self.flip == "both":
            w_bot = w_f
        elif self.flip == "none":
            w_bot = w
        else:
            w_bot = w[:, self.perm]
        parts = [self.top(self._chunk_sum(x, w_top)), self.bottom(self._chunk_sum(x, w_bot))]
        if self.third is not None:
            parts.append(self.third(self._chunk_sum(x, w[:, self.perm])))
        y = torch.cat(parts, 1)
        if self.proj is not None:
            return self.proj(y)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, "
             f"split={self.split} (k={Fraction(2 * self.split, 3)}), q={self.q}, q2={self.q2}, "
             f"hidden={self.hidden}, flip={self.flip}")
        if self.inner_groups != (1, 1):
            s += f", inner_groups={self.inner_groups}"
        if self.in_channels % self.split:
            s += f", unused_channels={self.in_channels % self.split}"
        if self.proj is not None:
            s += f", project={self.native_channels}->{self.out_channels}"
        return s


# -- block-level integration (the paper's models) ---------------------------------------------------------

def _slim_for(conv: nn.Conv2d, native_out: bool, opts: dict[str, Any]) -> SlimConv2d:
    split = opts.get("split") or (split_from_k(opts["k"]) if opts.get("k") is not None else 2)
    _, _, native = slim_widths(conv.in_channels, split, bool(opts.get("shuffled_path", False)))
    p = conv.weight
    mod = SlimConv2d(conv.in_channels, native if native_out else conv.out_channels, conv.kernel_size,
                     conv.stride, conv.padding, conv.dilation, conv.groups, False, conv.padding_mode, **opts)
    for c in mod.modules():
        if isinstance(c, nn.Conv2d):
            nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")  # the official init
    return mod.to(device=p.device, dtype=p.dtype)


def _new_conv(old: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    p = old.weight
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    1, old.bias is not None, old.padding_mode)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # the official init
    return new.to(device=p.device, dtype=p.dtype)


def _kind(block: nn.Module) -> str | None:
    c1, c2, c3 = (getattr(block, a, None) for a in ("conv1", "conv2", "conv3"))
    if isinstance(c1, nn.Conv2d) and isinstance(c2, nn.Conv2d) and hasattr(block, "bn2"):
        if isinstance(c3, nn.Conv2d) and c3.kernel_size == (1, 1) and c2.kernel_size != (1, 1):
            return "bottleneck"
        if c3 is None and c1.kernel_size != (1, 1) and hasattr(block, "bn1"):
            return "basic"
    seq = getattr(block, "conv", None)
    if isinstance(seq, nn.Sequential) and len(seq) >= 3:
        dw, proj = seq[-3], seq[-2]
        dw_conv = dw[0] if isinstance(dw, nn.Sequential) and len(dw) else None
        if (isinstance(dw_conv, nn.Conv2d) and dw_conv.groups == dw_conv.in_channels > 1
                and isinstance(dw[1], nn.BatchNorm2d)
                and isinstance(proj, nn.Conv2d) and proj.kernel_size == (1, 1)):
            return "inverted_residual"
    return None


def convert_blocks(
    model: nn.Module,
    *,
    blocks: str | Iterable[str] | None = None,
    **slim_options: Any,
) -> nn.Module:
    """Put SlimConv into a model's residual blocks the way the paper does, in place; returns ``model``.

    * Bottleneck (``conv1`` 1x1, ``conv2`` n x n, ``conv3`` 1x1; torchvision ResNet/ResNeXt and our CIFAR
      ResNet-50): ``conv2`` -> ``SlimConv2d(width)`` (its stride, groups, dilation), ``bn2`` -> Identity,
      ``conv3`` -> a fresh 1x1 conv from ``q + q2`` channels. Every bottleneck, downsampling ones included.
    * BasicBlock (``conv1``, ``conv2`` both n x n; CIFAR ResNet-56, Table V; a reconstruction, the paper
      does not spell it out): ``conv1`` -> ``SlimConv2d(C_in)`` with its stride, ``bn1`` -> Identity,
      ``conv2`` -> an n x n conv from ``q + q2`` channels.
    * Inverted residual (torchvision MobileNetV2): the depthwise conv -> a SlimConv with depthwise inner
      convs, its BN -> Identity (the ReLU6 stays), the projection 1x1 takes ``q + q2`` channels (paper:
      ``k = 8/3``).

    ``blocks`` filters block names by fnmatch patterns (default: every recognised block). ``slim_options``
    go to ``SlimConv2d`` (``split``/``k``, ``reduction``, ``min_hidden``, ``flip``, ...). New convs get the
    official Kaiming init. Raises ValueError if no block is recognised (or a pattern matches none).
    """
    pats = [blocks] if isinstance(blocks, str) else list(blocks or [])
    found: list[tuple[str, nn.Module, str]] = []
    for name, m in model.named_modules():
        kind = _kind(m)
        if kind is not None and (not pats or any(fnmatch.fnmatchcase(name, p) for p in pats)):
            found.append((name, m, kind))
    if not found:
        raise ValueError(
            "convert_blocks found no ResNet bottleneck/basic block or MobileNetV2 inverted residual"
            + (f" matching {pats}" if pats else "")
            + "; for plain convs use compconv.convert(model, 'slimconv') (SlimConv + 1x1 projection)"
        )
    for _, block, kind in found:
        if kind == "bottleneck":
            slim = _slim_for(block.conv2, True, slim_options)
            block.conv2, block.bn2 = slim, nn.Identity()
            block.conv3 = _new_conv(block.conv3, slim.native_channels)
        elif kind == "basic":
            slim = _slim_for(block.conv1, True, slim_options)
            block.conv1, block.bn1 = slim, nn.Identity()
            block.conv2 = _new_conv(block.conv2, slim.native_channels)
        else:
            seq = block.conv
            dw = seq[-3]
            slim = _slim_for(dw[0], True, slim_options)
            dw[0], dw[1] = slim, nn.Identity()
            seq[-2] = _new_conv(seq[-2], slim.native_channels)
    return model


convert_resnet_blocks = convert_blocks  # the name the ResNet docs use
