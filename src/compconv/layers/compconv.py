"""CompConv (Zhang, Xu, Shen, CVPRW 2021): the compact convolution at the heart of this library.

Structure (see ``docs/compconv.md`` and the spec it follows), for depth ``d >= 1``::

    C_prim = ceil(C_out / (2 (2^d - 1)))                                        (Eq. 5)
    T_1    = [ X[:, :C_prim] , W_1(X) ]              W_1: C_in -> C_prim        (core unit, Eq. 2)
    T_i    = [ X[:, :2^(i-1) C_prim] , W_i(T_{i-1}) ]  for i = 2 .. d-1           (recursion, Eq. 3)
    B_0    = W_d(T_{d-1});  A_0 = DW(B_0)            tailing channels (depthwise k x k)
    T_d    = [ A_0 , B_0 ]
    Y      = shuffle( [T_1, T_2, ..., T_d] ), truncated to C_out channels     (integration + shuffle)

``d = 1`` has no identity step: ``B_0 = W_1(X)``, ``Y = [DW(B_0), B_0]``; ``d = 0`` is a plain conv.
The stride (and the host's padding) goes on ``W_1``; identity channels are read at the centres of
``W_1``'s receptive fields (``X[:, :, ::s, ::s]`` for "same" padding). Later convs are stride 1, "same".
Surplus channels (``2 C_prim (2^d - 1) > C_out``) are dropped from the end of ``A_0`` (the depthwise
conv then computes only the kept channels) and, if ``A_0`` is not wide enough, from the front of the
concatenation (the first identity slice). The channel shuffle (4 groups, or the largest divisor of C_out
below that) comes after the truncation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from compconv.layers.base import CompactConv2d, register_method
from compconv.layers.ops import (
    DepthwiseConv2d,
    PadAnyConv2d,
    align_identity,
    shuffle_groups,
    shuffle_permutation,
    shuffled_cat,
)

__all__ = ["CompConv2d", "CompConvPlan", "depth_from_c0", "plan_compconv", "prim_channels"]

IdentityMode = Literal["fixed", "group", "random", "conv"]
IDENTITY_MODES: tuple[str, ...] = ("fixed", "group", "random", "conv")
DEFAULT_C0 = 128
MAX_DEPTH = 3


def prim_channels(out_channels: int, depth: int) -> int:
    """Eq. 5: ``C_prim = ceil(C_out / (2 (2^d - 1)))`` for ``d >= 1``."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1 for C_prim, but got {depth}")
    if out_channels < 1:
        raise ValueError(f"out_channels must be >= 1, but got {out_channels}")
    den = 2 * (2**depth - 1)
    return -(-out_channels // den)


def depth_from_c0(in_channels: int, c0: int, max_depth: int = MAX_DEPTH) -> int:
    """Eq. 6: ``d = min(floor(log2(max(1, C_in / C0))) + 1, max_depth)``, in exact integer arithmetic.

    The paper prints ``min(..., 3)``; the blog's ``max`` is a typo (it would never compress less than d=3).
    """
    if not isinstance(c0, int) or c0 < 1:
        raise ValueError(f"c0 must be a positive int (the paper uses 32, 64, 128, 256, 512), but got {c0!r}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, but got {in_channels}")
    j = 0  # floor(log2(C_in / C0)) for C_in >= C0: the largest j with C0 * 2^j <= C_in
    while c0 * 2 ** (j + 1) <= in_channels:
        j += 1
    return min(j + 1, max_depth)


@dataclass(frozen=True)
class CompConvPlan:
    """The channel arithmetic of one CompConv2d (all widths in channels).

    ``conv_widths[i]`` is ``(in, out)`` of ``W_{i+1}``; ``identity_widths[i]`` is the identity slice of
    ``T_{i+1}`` (steps 1..d-1); ``tail_channels`` is the kept width of ``A_0``; ``front_drop`` identity
    channels at the front of ``T_1`` are left out of the output (they still feed ``W_2``).
    """

    in_channels: int
    out_channels: int
    depth: int
    c_prim: int
    conv_widths: tuple[tuple[int, int], ...]
    identity_widths: tuple[int, ...]
    tail_channels: int
    front_drop: int
    surplus: int
    shuffle_groups: int
    sources: tuple[tuple[str, int, int], ...] = field(repr=False)
    width_multiple: int = 1  # the multiple C_prim was rounded up to (1 = the paper's Eq. 5)

    @property
    def total_channels(self) -> int:
        """``2 C_prim (2^d - 1)``: the channels all recursive results add up to before truncation."""
        return 2 * self.c_prim * (2**self.depth - 1)

    def macs_per_pixel(self, k: int) -> int:
        """MACs per output pixel, ``k`` = kh*kw: Eq. 8 with the spec's index (DW term not squared)."""
        return k * (sum(ci * co for ci, co in self.conv_widths) + self.tail_channels)


def plan_compconv(
    in_channels: int,
    out_channels: int,
    depth: int,
    *,
    identity: str = "fixed",
    shuffle: bool = True,
    groups: int = 4,
    width_multiple: int = 1,
) -> CompConvPlan:
    """Plan the widths of a CompConv of ``depth >= 1``; raises ValueError (with what to do) if impossible.

    ``width_multiple`` (hardware-aware widths; 1 = the paper) rounds ``C_prim`` up to a multiple of it, so
    every inner width (``2^i C_prim``) is one too and the convs run at full vector width. The larger
    surplus is dropped as always, first from the end of ``A_0`` and then from the front of the
    concatenation, which may then reach past ``T_1``'s identity slice into any of ``T_1 .. T_{d-1}``
    (those channels are still computed: they feed the next step). Where even that cannot give
    ``C_out`` channels (or the identity slices would outgrow ``C_in``), the multiple is halved until the
    plan fits (down to 1, the paper's plan); ``plan.width_multiple`` says which multiple was used.
    """
    if not isinstance(width_multiple, int) or isinstance(width_multiple, bool) or width_multiple < 1:
        raise ValueError(f"width_multiple must be an int >= 1 (1 = paper, e.g. 8 or 16), "
                         f"but got {width_multiple!r}")
    m = width_multiple
    while m > 1:
        try:
            return _plan_widths(in_channels, out_channels, depth, identity, shuffle, groups, m)
        except ValueError:
            m //= 2
    return _plan_widths(in_channels, out_channels, depth, identity, shuffle, groups, 1)


def _plan_widths(in_channels: int, out_channels: int, depth: int, identity: str, shuffle: bool, groups: int,
                 multiple: int) -> CompConvPlan:
    if depth < 1:
        raise ValueError(f"depth must be >= 1 to plan a CompConv (d=0 is a plain conv), but got {depth}")
    c = prim_channels(out_channels, depth)
    c = -(-c // multiple) * multiple
    total = 2 * c * (2**depth - 1)
    surplus = total - out_channels
    a0 = 2 ** (depth - 1) * c
    tail = a0 - min(surplus, a0)
    front = surplus - (a0 - tail)
    id_widths = [2 ** (i - 1) * c for i in range(1, depth)]  # steps 1..d-1
    # The paper's plan drops at most T_1's identity slice at the front; rounded widths may drop into
    # T_1 .. T_{d-1} (all still computed for the next step, so nothing is computed in vain).
    droppable = sum(2**i * c for i in range(1, depth)) if multiple > 1 else (id_widths[0] if id_widths else 0)
    if front > 0:
        if not id_widths or front > droppable:
            raise ValueError(
                f"CompConv2d(depth={depth}) cannot produce out_channels={out_channels}: C_prim={c} gives "
                f"{total} channels and the surplus {surplus} exceeds the droppable ones; use a smaller depth"
            )
    if identity != "conv" and id_widths and max(id_widths) > in_channels:
        raise ValueError(
            f"CompConv2d(depth={depth}) copies up to {max(id_widths)} input channels as identity (C_prim={c}), "
            f"but in_channels={in_channels}; use a smaller depth, identity='conv', or keep this conv "
            "(the paper keeps the stem conv)"
        )
    widths = [(in_channels, c)] + [(2 ** (i - 1) * c, 2 ** (i - 1) * c) for i in range(2, depth + 1)]
    # Where each output channel comes from, before the shuffle: (kind, step, index within that part).
    sources: list[tuple[str, int, int]] = []
    for step in range(1, depth):
        sources += [("identity", step, j) for j in range(id_widths[step - 1])]
        sources += [("conv", step, j) for j in range(widths[step - 1][1])]
    sources += [("tail", depth, j) for j in range(tail)]
    sources += [("conv", depth, j) for j in range(widths[-1][1])]
    sources = sources[front:]
    assert len(sources) == out_channels  # the arithmetic above guarantees it
    g = shuffle_groups(out_channels, groups) if shuffle else 1
    return CompConvPlan(
        in_channels=in_channels,
        out_channels=out_channels,
        depth=depth,
        c_prim=c,
        conv_widths=tuple(widths),
        identity_widths=tuple(id_widths),
        tail_channels=tail,
        front_drop=front,
        surplus=surplus,
        shuffle_groups=g,
        sources=tuple(sources),
        width_multiple=multiple,
    )


def _same_padding(kernel_size: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int] | str:
    if all(k % 2 == 1 for k in kernel_size):
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation, strict=False))  # type: ignore[return-value]
    return "same"  # even kernels need asymmetric padding, which only the string form gives


@register_method("compconv")
class CompConv2d(CompactConv2d):
    """Compact convolution by recursive divide and conquer (CompConv, CVPRW 2021).

    Args (besides ``nn.Conv2d``'s; ``groups`` must be 1):
        depth: recursion depth ``d`` (0 = plain conv). Mutually exclusive with ``c0``.
        c0: choose ``d`` from ``in_channels`` by Eq. 6 (paper default 128, used when neither is given).
        max_depth: the cap in Eq. 6 (paper: 3).
        identity: how identity channels are taken from X (Table 2): ``"fixed"`` (first channels, paper
            default), ``"group"`` (spread evenly), ``"random"`` (a seeded subset stored as a buffer), ``"conv"``
            (a 1x1 conv from X; costs parameters).
        shuffle: channel shuffle after the concatenation (Table 1; paper: on).
        shuffle_groups: shuffle groups (paper: 4); the largest divisor of C_out not above it is used.
        identity_seed: seed of the ``"random"`` identity subset.
        width_multiple: hardware-aware widths: round ``C_prim`` (hence every inner width) up to a multiple
            of this (1 = the paper's Eq. 5; 8 or 16 fill the CPU's/GPU's vector units). The surplus is
            dropped as documented in :func:`plan_compconv`; the output keeps exactly ``C_out`` channels.

    Shapes: input ``(N, C_in, H, W)`` -> output ``(N, C_out, H_out, W_out)`` exactly as ``nn.Conv2d``.
    """

    paper = "Zhang, Xu, Shen. CompConv: A Compact Convolution Module for Efficient Feature Learning. CVPRW 2021"

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
        depth: int | None = None,
        c0: int | None = None,
        max_depth: int = MAX_DEPTH,
        identity: IdentityMode = "fixed",
        shuffle: bool = True,
        shuffle_groups: int = 4,
        identity_seed: int = 0,
        width_multiple: int = 1,
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        if groups != 1:
            raise ValueError(
                f"CompConv2d replaces dense convolutions (groups=1), but got groups={groups}; "
                "keep grouped/depthwise convs as they are"
            )
        if identity not in IDENTITY_MODES:
            raise ValueError(f"identity must be one of {IDENTITY_MODES}, but got {identity!r}")
        if depth is not None and c0 is not None:
            raise ValueError(f"expected depth or c0, but got both (depth={depth}, c0={c0})")
        if depth is None:
            depth = depth_from_c0(in_channels, DEFAULT_C0 if c0 is None else c0, max_depth)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"depth must be an int >= 0 (0 = plain conv), but got {depth!r}")
        self.depth = depth
        self.c0 = c0
        self.identity = identity
        self.shuffle = shuffle
        if not isinstance(width_multiple, int) or isinstance(width_multiple, bool) or width_multiple < 1:
            raise ValueError(f"width_multiple must be an int >= 1 (1 = paper, e.g. 8 or 16), "
                             f"but got {width_multiple!r}")
        self.width_multiple = width_multiple
        factory = {"device": device, "dtype": dtype}
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation

        if depth == 0:
            self.plan = None
            self.c_prim = 0
            self.groups_shuffle = 1
            self.conv = nn.Conv2d(in_channels, out_channels, k, s, p, d, 1, bias, padding_mode, **factory)
            self.register_parameter("bias", None)  # the plain conv holds its own bias (self.conv.bias)
            self.identity_convs = self.tail = None
            return

        plan = plan_compconv(in_channels, out_channels, depth, identity=identity, shuffle=shuffle,
                             groups=shuffle_groups, width_multiple=width_multiple)
        self.plan = plan
        self.c_prim = plan.c_prim
        self.groups_shuffle = plan.shuffle_groups
        same = _same_padding(k, d)
        convs = [nn.Conv2d(in_channels, plan.c_prim, k, s, p, d, 1, False, padding_mode, **factory)]
        # W_2..W_d (and the tail) pad the host's mode on W_1's output, which can be smaller than their pad
        # where the host conv runs: PadAnyConv2d extends the mode to any map size (ops.pad_any).
        convs += [PadAnyConv2d(ci, co, k, 1, same, d, 1, False, padding_mode, **factory)
                  for ci, co in plan.conv_widths[1:]]
        self.convs = nn.ModuleList(convs)
        t = plan.tail_channels
        # The tailing channels: a depthwise conv on the first t channels of B_0 (the rest of A_0 is dropped).
        self.tail = DepthwiseConv2d(t, t, k, 1, same, d, t, False, padding_mode, **factory) if t else None
        if identity == "conv":
            self.identity_convs = nn.ModuleList(
                nn.Conv2d(in_channels, w, 1, bias=False, **factory) for w in plan.identity_widths
            )
        else:
            self.identity_convs = None
            idx = self._identity_indices(plan, identity, identity_seed)
            # "random" must survive a state_dict round trip; "fixed"/"group" are derived from the widths.
            self.register_buffer("identity_index", idx, persistent=identity == "random")
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None

    @staticmethod
    def _identity_indices(plan: CompConvPlan, identity: str, seed: int) -> Tensor:
        """Input channels read by the identity slices, concatenated over steps 1..d-1."""
        c_in = plan.in_channels
        parts: list[Tensor] = []
        if identity == "random":
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(c_in, generator=g)
        for w in plan.identity_widths:
            if identity == "fixed":
                parts.append(torch.arange(w))
            elif identity == "group":
                parts.append(torch.arange(w) * c_in // w)  # every (C_in / w)-th channel
            else:
                parts.append(perm[:w])
        if not parts:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat(parts).long()

    # -- the converter's hooks -------------------------------------------------------------------
    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Names and ranges of CompConv's options (plus the converter's ``depth_from``), for any layer."""
        from compconv.options import check_bool, check_choice, check_int, check_option_names

        check_option_names("compconv", options, ("depth", "c0", "max_depth", "identity", "shuffle",
                                                 "shuffle_groups", "identity_seed", "width_multiple",
                                                 "depth_from"))
        o = options
        check_int("depth", o.get("depth"), minimum=0, optional=True, hint="0 = plain conv")
        check_int("c0", o.get("c0"), minimum=1, optional=True, hint="the paper uses 32 .. 512")
        if o.get("depth") is not None and o.get("c0") is not None:
            raise ValueError(f"expected depth or c0, but got both (depth={o['depth']}, c0={o['c0']})")
        check_int("max_depth", o.get("max_depth", MAX_DEPTH), minimum=0, hint="the cap in Eq. 6; paper: 3")
        check_choice("identity", o.get("identity", "fixed"), IDENTITY_MODES)
        check_bool("shuffle", o.get("shuffle", True))
        check_int("shuffle_groups", o.get("shuffle_groups", 4), minimum=1)
        check_int("identity_seed", o.get("identity_seed", 0))
        check_int("width_multiple", o.get("width_multiple", 1), minimum=1, hint="1 = paper, e.g. 8 or 16")
        check_choice("depth_from", o.get("depth_from", "c_in"), ("c_in", "c_out", "block"))

    @classmethod
    def resolve_hparams(cls, conv: nn.Conv2d, **hparams: Any) -> tuple[dict[str, Any], str]:
        """Pick ``d`` (Eq. 6 from ``c0``, or the given ``depth``) and lower it until the layer fits."""
        hp = dict(hparams)
        if hp.get("depth") is None:
            c0 = hp.pop("c0", None)
            basis = hp.pop("depth_channels", None) or conv.in_channels
            hp.pop("depth", None)
            hp["depth"] = depth_from_c0(basis, DEFAULT_C0 if c0 is None else c0, hp.get("max_depth", MAX_DEPTH))
        else:
            hp.pop("c0", None)
            hp.pop("depth_channels", None)
        d0 = hp["depth"]
        if not isinstance(d0, int) or d0 < 0 or conv.groups != 1:
            return hp, ""
        d = d0
        while d >= 1:
            try:
                plan_compconv(conv.in_channels, conv.out_channels, d, identity=hp.get("identity", "fixed"),
                              width_multiple=hp.get("width_multiple", 1))
                break
            except ValueError:
                d -= 1
        if d == d0:
            return hp, ""
        if d == 0:
            return hp, f"cannot fit any depth in {d0}..1 (C_in={conv.in_channels}, C_out={conv.out_channels})"
        hp["depth"] = d
        return hp, f"depth lowered {d0}->{d} to fit C_in={conv.in_channels}, C_out={conv.out_channels}"

    @classmethod
    def ineligible_reason(cls, conv: nn.Conv2d, **hparams: Any) -> str | None:
        if isinstance(conv, nn.Conv2d) and conv.groups != 1:
            kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
            return f"{kind} conv (groups={conv.groups}): CompConv replaces dense convs"
        return super().ineligible_reason(conv, **hparams)

    # -- forward ---------------------------------------------------------------------------------
    def _identity(self, xi: Tensor, step: int) -> Tensor:
        plan = self.plan
        assert plan is not None
        w = plan.identity_widths[step]
        if self.identity_convs is not None:
            return self.identity_convs[step](xi)
        if self.identity == "fixed":
            return xi[:, :w]
        start = sum(plan.identity_widths[:step])
        return xi.index_select(1, self.identity_index[start : start + w])

    def _forward(self, x: Tensor) -> Tensor:
        # (N, C_in, H, W) -> (N, C_out, H_out, W_out); CompactConv2d.forward checks the input first
        if self.plan is None:
            return self.conv(x)
        plan = self.plan
        b = self.convs[0](x)
        parts: list[Tensor] = []
        if plan.depth >= 2:
            xi = align_identity(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                (b.shape[-2], b.shape[-1]))
            t = torch.cat([self._identity(xi, 0), b], 1)  # T_1
            parts.append(t)
            for i in range(1, plan.depth - 1):
                t = torch.cat([self._identity(xi, i), self.convs[i](t)], 1)  # T_{i+1}
                parts.append(t)
            b = self.convs[plan.depth - 1](t)  # B_0
        if self.tail is not None:
            parts.append(self.tail(b[:, : plan.tail_channels]))  # A_0 (kept part)
        parts.append(b)
        y = shuffled_cat(parts, self.groups_shuffle, plan.front_drop)  # cat, drop, shuffle: one write
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    # -- introspection ---------------------------------------------------------------------------
    def output_permutation(self) -> list[int]:
        """``perm`` with ``y[:, j] == y_unshuffled[:, perm[j]]`` (identity when the shuffle is off)."""
        if self.plan is None or self.groups_shuffle == 1:
            return list(range(self.out_channels))
        return shuffle_permutation(self.out_channels, self.groups_shuffle)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"depth={self.depth}")
        if self.plan is not None:
            s += f", c_prim={self.c_prim}, identity={self.identity}, shuffle={self.groups_shuffle}"
            if self.plan.width_multiple > 1:
                s += f", width_multiple={self.plan.width_multiple}"
            if self.plan.surplus:
                s += f", dropped={self.plan.surplus}"
        return s


def compconv_from_conv(conv: nn.Conv2d, **hparams: Any) -> CompConv2d:
    """Shorthand for ``CompConv2d.from_conv`` that applies ``resolve_hparams`` first."""
    hp, _ = CompConv2d.resolve_hparams(conv, **hparams)
    return CompConv2d.from_conv(conv, **hp)  # type: ignore[return-value]

