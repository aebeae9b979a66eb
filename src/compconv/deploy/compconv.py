"""DeployedCompConv2d (one write per output part, BN and bias folded in), and the 1x1 collapse and tuning.

Every CompConv2d becomes a DeployedCompConv2d, which writes each part of the output (identity slices, the
convs' results, the depthwise tail) once, straight into its final (shuffled) channel slots of a
preallocated output, applying the folded BN affine and the bias in that same write. The reference module
writes the output three times (concatenation, shuffle copy, BN). The depthwise tail reads all of ``B_0``
(zero weights beyond the kept channels) instead of a channel slice that convs would copy first; the affine
write uses ``mul``/``add_`` in NCHW and ``addcmul`` in channels_last (faster in each, measured).

Why BN is not folded into the inner convs' weights: the identity channels and the intermediate results
``T_i`` feed both the output and the next step, which needs them *unscaled*; a BN shift cannot be moved
through a zero-padded conv (the border pixels would be wrong). The output write happens anyway, so the
affine costs nothing extra there.

Under ``torch.compile``, ``torch.export``, ONNX export or autograd the deployed module runs a purely
functional form (one ``cat``, one affine, one view-transpose shuffle), which the compilers fuse into a
single write themselves and exporters translate op for op.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from compconv.deploy.bn import bn_act_tail, bn_affine, fold_affine, foldable_bn
from compconv.deploy.graph import replace_module
from compconv.layers.compconv import CompConv2d
from compconv.layers.ops import (
    DepthwiseConv2d,
    align_identity,
    channel_shuffle,
    is_channels_last,
    is_tracing,
    shuffle_permutation,
)

__all__ = ["DeployedCompConv2d", "collapse_pointwise", "deploy_compconvs"]


@dataclass(frozen=True)
class _Piece:
    """Output channels written by one op: ``y[:, dst : dst + step*n : step] = part[:, src : src+n]``."""

    part: int
    src: int
    n: int
    dst: int
    step: int


def _is_range(idx: list[int]) -> bool:
    return all(v == idx[0] + i for i, v in enumerate(idx))


class DeployedCompConv2d(nn.Module):
    """Eval-only CompConv2d with its following BN (and bias) folded into one output write.

    Build it with :meth:`from_compconv`. Input ``(N, C_in, H, W)`` -> output ``(N, C_out, H_out, W_out)``,
    equal (in eval mode) to ``bn(compconv(x))``, or to ``compconv(x)`` without a BN; after
    :meth:`fold_output_permutation` the output channels come in the order ``perm`` of the original
    (the consumer's input channels are permuted to match).

    Buffers: ``scale``/``shift`` (``(1, C_out, 1, 1)``, in output order, absent when the write is a plain
    copy), ``perm`` (``y[:, j] = u[:, perm[j]]`` where ``u`` is the unshuffled concatenation).
    """

    def __init__(self) -> None:  # use from_compconv
        super().__init__()

    @classmethod
    @torch.no_grad()
    def from_compconv(cls, comp: CompConv2d, bn: nn.BatchNorm2d | None = None) -> nn.Module:
        """The deployed form of ``comp`` (followed by ``bn``'s affine if given). ``depth=0`` gives an ``nn.Conv2d``.

        Raises:
            TypeError: ``comp`` is not a CompConv2d.
            ValueError: ``bn`` is not a BatchNorm2d with running statistics (or has another width).
        """
        if not isinstance(comp, CompConv2d):
            raise TypeError(f"comp must be a CompConv2d, but got {type(comp).__name__}")
        why = foldable_bn(bn) if bn is not None else None
        if why is not None:
            raise ValueError(f"bn must be an nn.BatchNorm2d with running statistics (track_running_stats=True): {why}")
        if bn is not None and bn.num_features != comp.out_channels:
            raise ValueError(f"bn.num_features={bn.num_features} != comp.out_channels={comp.out_channels}")
        if comp.plan is None:  # d = 0: a plain conv (with the module's bias)
            conv = copy.deepcopy(comp.conv)
            return fold_affine(conv, bn) if bn is not None else conv.requires_grad_(False)
        plan = comp.plan
        self = cls()
        self.in_channels, self.out_channels = comp.in_channels, comp.out_channels
        self.kernel_size, self.stride = comp.kernel_size, comp.stride
        self.padding, self.dilation = comp.padding, comp.dilation
        self.depth, self.c_prim = plan.depth, plan.c_prim
        self.tail_channels, self.front_drop = plan.tail_channels, plan.front_drop
        self.convs = copy.deepcopy(comp.convs).requires_grad_(False)
        self.tail = copy.deepcopy(comp.tail).requires_grad_(False) if comp.tail is not None else None
        width = plan.conv_widths[-1][1]
        if self.tail is not None and plan.tail_channels < width:
            # The depthwise tail reads only B_0's first t channels: a channel slice, which every conv
            # copies to a contiguous tensor first (channels_last, or any batch > 1). A full-width
            # depthwise conv (zero weights beyond t; k^2 MACs per dropped channel) reads B_0 as it is,
            # and its first t output channels go straight into the output write.
            full = DepthwiseConv2d(
                width,
                width,
                comp.tail.kernel_size,
                1,
                comp.tail.padding,
                comp.tail.dilation,
                width,
                False,
                comp.tail.padding_mode,
                device=comp.tail.weight.device,
                dtype=comp.tail.weight.dtype,
            )
            full.weight.zero_()
            full.weight[: plan.tail_channels] = comp.tail.weight.detach()
            self.tail = full.requires_grad_(False)
        # Identity slices: ("slice", start, width) when contiguous, else a gather index; "conv" = 1x1 convs.
        self.identity_convs = (
            copy.deepcopy(comp.identity_convs).requires_grad_(False)
            if comp.identity_convs is not None
            else None
        )
        self._id_index: list[list[int]] = []
        if self.identity_convs is None:
            flat = comp.identity_index.tolist()
            start = 0
            for w in plan.identity_widths:
                self._id_index.append(flat[start : start + w])
                start += w
        self._rebuild_identity_buffers()
        # Part widths in concatenation order: T_1..T_{d-1}, A_0 (kept), B_0.
        widths = [2**i * plan.c_prim for i in range(1, plan.depth)]
        widths += ([plan.tail_channels] if plan.tail_channels else []) + [plan.conv_widths[-1][1]]
        self._part_widths = widths
        # Output affine in output (shuffled) order: BN(y + bias).
        c = comp.out_channels
        a = torch.ones(c, dtype=torch.float64)
        b = torch.zeros(c, dtype=torch.float64)
        if comp.bias is not None:
            b = comp.bias.detach().double().clone()
        if bn is not None:
            a_bn, b_bn = bn_affine(bn)
            a, b = a_bn, a_bn * b + b_bn
        dtype = comp.convs[0].weight.dtype
        device = comp.convs[0].weight.device
        self.has_affine = not (bool((a == 1).all()) and bool((b == 0).all()))
        self.register_buffer("scale", a.to(dtype=dtype, device=device).view(1, c, 1, 1))
        self.register_buffer("shift", b.to(dtype=dtype, device=device).view(1, c, 1, 1))
        self._set_perm(comp.output_permutation())
        return self

    # -- layout ----------------------------------------------------------------------------------------
    def _rebuild_identity_buffers(self) -> None:
        self._id_slices: list[tuple[int, int] | None] = []
        for i, idx in enumerate(self._id_index):
            contiguous = _is_range(idx)
            self._id_slices.append((idx[0], len(idx)) if contiguous else None)
            name = f"id_index_{i}"
            t = torch.tensor(idx, dtype=torch.long, device=self.convs[0].weight.device)
            if name in self._buffers:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t)

    def _set_perm(self, perm: list[int]) -> None:
        """Record ``y[:, j] = u[:, perm[j]]`` and precompute the runs of the fused write."""
        c = self.out_channels
        self._perm = list(perm)
        self.register_buffer("perm", torch.tensor(perm, dtype=torch.long, device=self.scale.device))
        self._shuffle_g = 1
        if self._perm != list(range(c)):
            for g in range(2, c + 1):
                if c % g == 0 and self._perm == shuffle_permutation(c, g):
                    self._shuffle_g = g
                    break
            else:
                self._shuffle_g = 0  # a general permutation
        inv = [0] * c
        for j, m in enumerate(perm):
            inv[m] = j
        # u channel m (after the front drop) comes from global index m + front_drop of the parts.
        owner: list[tuple[int, int]] = []
        for p, w in enumerate(self._part_widths):
            owner += [(p, o) for o in range(w)]
        owner = owner[self.front_drop :]
        pieces: list[_Piece] = []
        m = 0
        while m < c:
            p, o = owner[m]
            n, step = 1, 0
            while m + n < c and owner[m + n] == (p, o + n):
                s = inv[m + n] - inv[m + n - 1]
                if s <= 0 or (step and s != step):
                    break
                step = s
                n += 1
            pieces.append(_Piece(p, o, n, inv[m], step or 1))
            m += n
        self._pieces = pieces
        # The affine in u's (unshuffled) order, for the functional path.
        inv_t = torch.tensor(inv, dtype=torch.long, device=self.scale.device)
        for name, v in (("scale_u", self.scale[:, inv_t]), ("shift_u", self.shift[:, inv_t])):
            if name in self._buffers:
                self._buffers[name] = v.contiguous()
            else:
                self.register_buffer(name, v.contiguous())

    @torch.no_grad()
    def fold_output_permutation(self) -> list[int]:
        """Stop permuting the output (write ``u`` itself); returns ``perm`` for the consumers.

        The caller must permute every consumer's input channels: what it read at channel ``j`` is now at
        channel ``perm[j]`` (see :func:`permute_input_channels`).
        """
        perm = self._perm
        inv = [0] * len(perm)
        for j, m in enumerate(perm):
            inv[m] = j
        idx = torch.tensor(inv, dtype=torch.long, device=self.scale.device)
        self.scale = self.scale[:, idx].contiguous()
        self.shift = self.shift[:, idx].contiguous()
        self._set_perm(list(range(self.out_channels)))
        return perm

    @torch.no_grad()
    def permute_input(self, perm: list[int]) -> None:
        """The input channel ``j`` of before now arrives at channel ``perm[j]``."""
        inv = [0] * len(perm)
        for j, m in enumerate(perm):
            inv[m] = j
        inv_t = torch.tensor(inv, dtype=torch.long, device=self.scale.device)
        w = self.convs[0].weight
        w.copy_(w[:, inv_t].clone())
        if self.identity_convs is not None:
            for conv in self.identity_convs:
                conv.weight.copy_(conv.weight[:, inv_t].clone())
        else:
            self._id_index = [[perm[i] for i in idx] for idx in self._id_index]
            self._rebuild_identity_buffers()

    # -- forward ---------------------------------------------------------------------------------------
    def _identity(self, xi: Tensor, step: int) -> Tensor:
        if self.identity_convs is not None:
            return self.identity_convs[step](xi)
        sl = self._id_slices[step]
        if sl is not None:
            return xi[:, sl[0] : sl[0] + sl[1]]
        return xi.index_select(1, getattr(self, f"id_index_{step}"))

    def _parts(self, x: Tensor) -> list[Tensor]:
        b = self.convs[0](x)
        parts: list[Tensor] = []
        if self.depth >= 2:
            xi = align_identity(
                x, self.kernel_size, self.stride, self.padding, self.dilation, (b.shape[-2], b.shape[-1])
            )
            t = torch.cat([self._identity(xi, 0), b], 1)  # T_1 (raw: it feeds W_2)
            parts.append(t)
            for i in range(1, self.depth - 1):
                t = torch.cat([self._identity(xi, i), self.convs[i](t)], 1)
                parts.append(t)
            b = self.convs[self.depth - 1](t)  # B_0
        if self.tail is not None:
            a0 = self.tail(b)  # full width (see from_compconv); its first tail_channels are A_0
            parts.append(a0 if a0.shape[1] == self.tail_channels else a0[:, : self.tail_channels])
        parts.append(b)
        return parts

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H_out, W_out)``; unbatched ``(C_in, H, W)`` as in ``nn.Conv2d``."""
        if not isinstance(x, torch.fx.Proxy) and x.dim() == 3:  # the module it replaces accepts it too
            return self.forward(x.unsqueeze(0)).squeeze(0)
        parts = self._parts(x)
        if is_tracing() or (torch.is_grad_enabled() and x.requires_grad):
            return self._functional_output(parts)
        return self._fused_output(parts)

    def _functional_output(self, parts: list[Tensor]) -> Tensor:
        u = torch.cat(parts, 1)
        if self.front_drop:
            u = u[:, self.front_drop :]
        if self._shuffle_g == 1:
            return u * self.scale + self.shift if self.has_affine else u
        if self.has_affine:  # the affine in u's order, then the shuffle: compilers fuse all three
            u = u * self.scale_u + self.shift_u
        if self._shuffle_g > 1:
            return channel_shuffle(u, self._shuffle_g)
        return u.index_select(1, self.perm)

    def _fused_output(self, parts: list[Tensor]) -> Tensor:
        # One write per output element, straight into its final channel (strided slots for the shuffle).
        ref = parts[-1]
        n, _, h, w = ref.shape
        fmt = torch.channels_last if is_channels_last(ref) else torch.contiguous_format
        y = torch.empty((n, self.out_channels, h, w), dtype=ref.dtype, device=ref.device, memory_format=fmt)
        for pc in self._pieces:
            src = parts[pc.part][:, pc.src : pc.src + pc.n]
            stop = pc.dst + pc.step * (pc.n - 1) + 1
            dst = y[:, pc.dst : stop : pc.step]
            if self.has_affine:
                sl = slice(pc.dst, stop, pc.step)
                if fmt is torch.channels_last:
                    torch.addcmul(self.shift[:, sl], src, self.scale[:, sl], out=dst)
                else:  # NCHW: addcmul's per-channel broadcast is ~3x slower than mul + add_ (measured)
                    torch.mul(src, self.scale[:, sl], out=dst)
                    dst.add_(self.shift[:, sl])
            else:
                dst.copy_(src)
        return y

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, depth={self.depth}, c_prim={self.c_prim}, writes={len(self._pieces)}"
        )
        if self._shuffle_g != 1:
            s += f", shuffle={self._shuffle_g or 'perm'}"
        return s + (", affine" if self.has_affine else "")


@torch.no_grad()
def collapse_pointwise(mod: DeployedCompConv2d) -> nn.Conv2d | None:
    """A 1x1 CompConv as the one dense 1x1 conv it equals (None if ``mod`` is not 1x1 without padding).

    With k = 1 every part (1x1 convs, the 1x1 depthwise tail, identity slices, the shuffle, the folded BN
    and bias) is the same linear map at every pixel, so the module is exactly ``y = W x + b`` per pixel:
    ``b`` is its output for a zero input and column ``i`` of ``W`` its output for the i-th unit vector
    minus ``b`` (evaluated in float64). The result runs at the dense layer's speed (and executes its
    MACs, ``C_in * C_out`` per pixel).
    """
    if mod.kernel_size != (1, 1) or mod.padding != (0, 0) or mod.dilation != (1, 1):
        return None
    ref = copy.deepcopy(mod).double()
    c_in, c_out = mod.in_channels, mod.out_channels
    eye = torch.eye(c_in, dtype=torch.float64, device=mod.scale.device).view(c_in, c_in, 1, 1)
    with torch.no_grad():
        bias = ref._functional_output(ref._parts(torch.zeros_like(eye[:1]))).reshape(c_out)
        cols = ref._functional_output(ref._parts(eye)).reshape(c_in, c_out) - bias
    w = mod.convs[0].weight
    conv = nn.Conv2d(c_in, c_out, 1, mod.stride, 0, bias=True, device=w.device, dtype=w.dtype)
    conv.weight.copy_(cols.t().reshape(c_out, c_in, 1, 1).to(w.dtype))
    conv.bias.copy_(bias.to(w.dtype))
    return conv.requires_grad_(False)


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


@torch.no_grad()
def deploy_compconvs(model: nn.Module, bns: dict[int, nn.Module]) -> list[str]:
    """Replace every CompConv2d of ``model`` (at every name) by its deployed form; returns their names.

    ``bns`` maps ``id(compconv)`` to the BN the BN pass found foldable into it: that BN's affine goes into
    the module's output write and the BN becomes ``nn.Identity`` (or its activation). A CompConv without
    a folded BN computes the same output as before, so its hooks move to the deployed module.
    """
    names = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, CompConv2d):
            continue
        bn = bns.get(id(mod))
        new = DeployedCompConv2d.from_compconv(mod, bn)  # type: ignore[arg-type]
        if bn is None:
            for attr in _HOOK_DICTS:
                getattr(new, attr).update(getattr(mod, attr))
        replace_module(model, mod, new)
        if bn is not None:
            replace_module(model, bn, bn_act_tail(bn))
        names.append(name)
    return names


@torch.no_grad()
def collapse_all_pointwise(model: nn.Module, form: str = "dense") -> list[str]:
    """Replace every 1x1 DeployedCompConv2d by its ``form``: ``"dense"`` (the dense conv it equals,
    :func:`collapse_pointwise`) or ``"lowrank"`` (two GEMMs, :class:`~compconv.deploy.lowrank.LowRankPointwise`).
    Modules with hooks stay. Returns the names replaced."""
    from compconv.deploy.lowrank import LowRankPointwise

    build = {"dense": collapse_pointwise, "lowrank": LowRankPointwise.from_deployed}[form]
    names = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, DeployedCompConv2d) and not any(getattr(mod, a) for a in _HOOK_DICTS):
            new = build(mod)
            if new is not None:
                replace_module(model, mod, new)
                names.append(name)
    return names
