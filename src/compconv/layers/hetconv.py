"""HetConv (Singh, Verma, Rai, Namboodiri, CVPR 2019): heterogeneous-kernel convolution.

A standard ``K x K`` conv has ``N`` filters of ``M`` kernels each. In a HetConv filter with part ``P`` only
``M/P`` kernels are ``K x K``; the other ``M - M/P`` are ``1 x 1``, sitting on the centre tap of the window.
The ``K x K`` kernels follow the paper's *shifted* pattern (Fig. 3)::

    kernel (filter n, input channel c) is K x K  iff  (c - n) mod P == 0,  else 1 x 1 (centre tap)

Computed exactly and efficiently (``impl="exact"``, the default), as the spec's section 1.4 says:

* ``K x K`` part: one grouped conv (``groups=P``) on the input channels sorted by residue mod ``P``
  (``x -> channel_shuffle(x, M/P)``), whose outputs come out sorted by filter residue;
* ``1 x 1`` part: one grouped 1x1 conv (``groups=P``) over ``P`` gathered copies of the input, copy ``r``
  holding the ``M - M/P`` channels whose residue is not ``r`` (read at the centre taps, i.e. with the
  stride and padding offset of the ``K x K`` window);
* ``y = channel_shuffle(y_KxK + y_1x1, P) (+ bias)``: the shuffle undoes the residue sort of the filters.

Every weight that exists is live: ``numel()`` equals the paper's parameter count
``N (M K^2 / P + M - M/P)`` and any counter sees Eq. 4's MACs ``Ho Wo N (M K^2 / P + M - M/P)``.

Two other realisations of the same maths (``impl=``): ``"masked"`` (grouped ``K x K`` + a dense 1x1 with a
fixed zero mask on the ``K x K`` channels; one fewer gather, may run faster for large ``P`` but executes dead
MACs and holds dead weights) and ``"dense"`` (one dense ``K x K`` conv with a fixed kernel mask; saves no
compute, but only needs ``P | M``, not ``P | N``). Both report the architecture's exact counts through
``count_macs`` / ``count_params`` (instance attributes set for those impls only), which ``compconv.profile``
uses instead of counting their children; the exact impl is counted through its real convs.

**Training form** (``train_form=``): the grouped ops save MACs but train slowly on CPU (many small groups,
a gather copied ``P - 1`` times, each with its backward): the CIFAR ResNet-20 compressed with HetConv trained
2.6x slower per epoch than a pruned model with as many MACs. So while the layer is trained (training mode
with autograd on) the ``"exact"``/``"masked"`` impls compute by default with one dense conv on
``dense_weight()``, which is gathered from the same parameters (differentiable: the gradient of every live
weight is the one the grouped ops give, the masked impl's dead weights get zero). Same function, same
parameters and ``state_dict``; only the kernels run differ. In eval mode or without grad (inference,
``compconv.profile``, export) the grouped ops run, so counts and deployment see the architecture.
``train_form="grouped"`` trains with the grouped ops. A layer whose inner convs were replaced or hooked
(``compconv.binarize``, QAT, hooks, parametrizations) always runs the grouped ops, which call them.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compconv.layers.base import CompactConv2d, register_method
from compconv.layers.ops import align_identity, channel_shuffle
from compconv.options import check_choice

__all__ = ["HetConv2d", "hetconv_kernel_mask", "hetconv_macs", "hetconv_params"]

HetImpl = Literal["exact", "masked", "dense"]
IMPLS: tuple[str, ...] = ("exact", "masked", "dense")
TrainForm = Literal["dense", "grouped"]
TRAIN_FORMS: tuple[str, ...] = ("dense", "grouped")
_INDEX_NAMES = frozenset({"gather_index", "dense_index", "dense_inverse"})  # long tensors (see _derived)
DEFAULT_PART = 4  # the paper's ImageNet setting (Tables 5-7) and its most used CIFAR one


def hetconv_kernel_mask(in_channels: int, out_channels: int, part: int) -> Tensor:
    """``(N, M)`` bool: True where kernel ``(filter n, channel c)`` is ``K x K``: ``(c - n) % P == 0``."""
    n = torch.arange(out_channels).view(-1, 1)
    c = torch.arange(in_channels).view(1, -1)
    return (c - n) % part == 0


def hetconv_params(
    in_channels: int, out_channels: int, kernel_size: tuple[int, int], part: int, bias: bool = False
) -> int:
    """Live weights of a HetConv layer: ``N (M kh kw / P + M - M/P)`` (+ ``N`` with bias)."""
    m, n, p = in_channels, out_channels, part
    return n * (m // p * kernel_size[0] * kernel_size[1] + m - m // p) + (n if bias else 0)


def hetconv_macs(
    in_channels: int, out_channels: int, kernel_size: tuple[int, int], part: int, out_pixels: int
) -> int:
    """Eq. 4: ``FL_K + FL_1 = Do^2 N M K^2 / P + Do^2 N (M - M/P)`` (``out_pixels`` = ``B Do^2``)."""
    return out_pixels * hetconv_params(in_channels, out_channels, kernel_size, part, bias=False)


def _plain_conv(c: nn.Module) -> bool:
    """An ``nn.Conv2d`` as built (not a subclass, no hooks, no parametrization) whose weight can be gathered."""
    from torch.nn.modules import module as _m

    # every kind of hook nn.Module.__call__ runs, on the conv itself and global (register_module_*_hook)
    hooked = (c._forward_hooks or c._forward_pre_hooks or c._backward_hooks or c._backward_pre_hooks
              or _m._global_forward_hooks or _m._global_forward_pre_hooks
              or _m._global_backward_hooks or _m._global_backward_pre_hooks)
    return type(c) is nn.Conv2d and not hooked and not hasattr(c, "parametrizations")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class _Gather(torch.autograd.Function):
    """``flat[index]`` whose backward is a gather too: ``grad[inverse]`` (zero where ``inverse`` is past the end).

    Autograd's own backward for indexing scatters with accumulation, which on CPU costs several times the
    forward for kernels of millions of entries (VGG-16: ~150 ms a step). Each weight here lands in at most
    one entry, so the gradient is a plain gather. The backward uses differentiable ops (higher-order grads)
    and the forward is separate from ``setup_context`` so ``torch.func`` transforms (``grad``, ``vmap``) work;
    ``jvp`` (forward-mode AD: ``torch.func.jvp``, ``jacfwd``, ``hessian``) is the same gather of the tangent.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(flat: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        return flat.index_select(0, index)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[2])
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return F.pad(grad, (0, 1)).index_select(0, inverse), None, None

    @staticmethod
    def jvp(ctx: Any, flat_t: Tensor, index_t: Tensor | None, inverse_t: Tensor | None) -> Tensor:
        (index,) = ctx.saved_tensors
        return flat_t.index_select(0, index)


@register_method("hetconv")
class HetConv2d(CompactConv2d):
    """Heterogeneous-kernel convolution (HetConv, CVPR 2019): ``K x K`` kernels on ``M/P`` channels/filter.

    Args (besides ``nn.Conv2d``'s; ``groups`` must be 1, the kernel odd and not ``1 x 1``):
        part: ``P``, the paper's part (default 4, its ImageNet setting). ``P=1`` is a plain conv; ``"pc"``
            means ``P = in_channels`` (the paper's "PC" variant, one ``K x K`` kernel per filter). ``P`` must
            divide ``in_channels``, and also ``out_channels`` for ``impl="exact"``/``"masked"``.
        impl: ``"exact"`` (default; grouped ``K x K`` + grouped 1x1 over gathered channels, no dead weights),
            ``"masked"`` (speed option: grouped ``K x K`` + masked dense 1x1) or ``"dense"`` (masked dense
            ``K x K``; allows ``P`` not dividing ``out_channels``). All compute the same function; the last
            two hold dead (always-zero-contribution) weights, which ``count_params``/``count_macs`` leave out.
        train_form: what ``"exact"``/``"masked"`` compute with while training (training mode, grad enabled):
            ``"dense"`` (default; one dense conv on ``dense_weight()``, gathered from the same parameters, the
            same function and gradients, faster to train on CPU: see the module docstring) or ``"grouped"``
            (the grouped ops). Outside training both run the grouped ops. Ignored by ``impl="dense"``.

    Shapes: input ``(B, M, H, W)`` -> output ``(B, N, H_out, W_out)``, exactly as ``nn.Conv2d`` with the same
    geometry. The ``1 x 1`` kernels read the centre tap of each ``K x K`` window, so stride, padding,
    dilation and padding mode apply to both parts as they would to the dense heterogeneous kernel.

    ``dense_weight()`` returns the equivalent dense ``(N, M, kh, kw)`` kernel (zeros off the centre tap of
    the ``1 x 1`` kernels), e.g. to check the module or to export it as one ordinary conv.
    """

    paper = (
        "Singh, Verma, Rai, Namboodiri. HetConv: Heterogeneous Kernel-Based Convolutions for Deep CNNs. "
        "CVPR 2019"
    )

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
        part: int | str = DEFAULT_PART,
        impl: HetImpl = "exact",
        train_form: TrainForm = "dense",
    ) -> None:
        super().__init__()
        self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        m, n = in_channels, out_channels
        if groups != 1:
            kind = "depthwise" if groups == in_channels else "grouped"
            raise ValueError(
                f"{kind} conv (groups={groups}): HetConv2d replaces dense convs (groups=1); keep it as it is"
            )
        kh, kw = self.kernel_size
        if (kh, kw) == (1, 1):
            raise ValueError(
                "1x1 conv: HetConv2d with kernel_size=1 is the same 1x1 conv (only K x K kernels "
                "become heterogeneous); keep it as nn.Conv2d"
            )
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd (HetConv's 1x1 kernels sit on the centre tap), "
                f"but got {self.kernel_size}"
            )
        check_choice("impl", impl, IMPLS)
        check_choice("train_form", train_form, TRAIN_FORMS)
        if isinstance(part, str):
            if part.lower() != "pc":
                raise ValueError(f"part must be a positive int or 'pc' (P = in_channels), but got {part!r}")
            part = m
        if not isinstance(part, int) or isinstance(part, bool) or part < 1:
            raise ValueError(f"part must be a positive int or 'pc' (P = in_channels), but got {part!r}")
        if m % part != 0:
            raise ValueError(f"part={part} must divide in_channels={m}; allowed part values: {_divisors(m)}")
        if impl != "dense" and n % part != 0:
            allowed = _divisors(math.gcd(m, n))
            raise ValueError(
                f"part={part} must divide out_channels={n} for impl={impl!r} (grouped conv); allowed part "
                f"values: {allowed}, or use impl='dense' (any divisor of in_channels={m}, no compute saved)"
            )
        self.part = part
        self.impl = impl
        self.train_form = train_form
        # Index and masks derived from the geometry alone (see _derived): not buffers, which to_empty() (meta-device
        # init) would leave uninitialised and load_state_dict would not restore (they are in no state_dict).
        self._derived_cache: dict[str, Tensor] = {}
        factory = {"device": device, "dtype": dtype}

        # Numeric padding of the K x K window ("same" is symmetric for odd kernels): the 1x1 kernels read the
        # window's centre, so both parts need it. Non-zero padding modes pad the input once, explicitly.
        dh, dw = self.dilation
        if self.padding == "same":
            self._pad = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
        elif self.padding == "valid":
            self._pad = (0, 0)
        else:
            self._pad = tuple(self.padding)  # type: ignore[assignment]
        conv_pad = self._pad if padding_mode == "zeros" else (0, 0)

        self.conv_k: nn.Conv2d | None = None
        self.conv_1: nn.Conv2d | None = None
        # Only impl="dense" has a single ``weight``: the (N, M, kh, kw) kernel, zero off the HetConv pattern.
        # The others have none (``.weight`` raises, naming their parameters, as for every compact conv).
        self.weight_1x1: nn.Parameter | None = None  # the masked impl's dense (N, M, 1, 1) kernel
        if impl == "dense":
            self.weight = nn.Parameter(torch.empty(n, m, kh, kw, **factory))
        else:
            # Row o of both grouped convs is filter (o % (N/P)) * P + o // (N/P) (filters sorted by residue);
            # K x K group r reads input channels r, r+P, r+2P, ... in that order.
            self.conv_k = nn.Conv2d(
                m, n, (kh, kw), self.stride, conv_pad, self.dilation, part, False, **factory
            )
            if part > 1 and impl == "exact":
                self.conv_1 = nn.Conv2d(part * (m - m // part), n, 1, 1, 0, 1, part, False, **factory)
            elif part > 1:
                self.weight_1x1 = nn.Parameter(torch.empty(n, m, 1, 1, **factory))
        self.bias = nn.Parameter(torch.empty(n, **factory)) if bias else None
        self.reset_parameters()
        if impl != "exact":
            # Only these impls count themselves (their children hold dead weights and run dead MACs). The
            # exact impl defines no count_macs, so compconv.profile counts its real convs (and cross-checks
            # them against FlopCounterMode) like any other module's: they hold exactly the paper's counts.
            self.count_params = self.architecture_params
            self.count_macs = self.architecture_macs

    @property
    def train_form(self) -> str:
        return self._train_form

    @train_form.setter
    def train_form(self, value: str) -> None:
        check_choice("train_form", value, TRAIN_FORMS)  # also when set after construction
        self._train_form = value

    # -- tensors derived from the geometry ---------------------------------------------------------
    def _derived(self, name: str, like: Tensor) -> Tensor:
        """``name``'s tensor for ``like``'s device (masks: and dtype), built from the geometry on first use.

        A cache, not a buffer: a module built on the meta device and materialised with ``to_empty()`` keeps
        no buffer values, and ``load_state_dict`` does not restore non-persistent ones, so a buffer would hold
        garbage there (out-of-range indices). Rebuilt whenever the device or dtype in use changes. ``like`` is a
        parameter taken from ``_parameters`` or ``parameters()``, never by attribute: ``torch.fx`` symbolic
        tracing turns attribute reads of parameters into proxies, whose device cannot be compared.
        """
        dtype = torch.long if name in _INDEX_NAMES else like.dtype
        t = self._derived_cache.get(name)
        if t is None or t.device != like.device or t.dtype != dtype:
            m, n, p = self.in_channels, self.out_channels, self.part
            kh, kw = self.kernel_size
            if name == "gather_index":  # exact: copy r of the centre taps holds the channels c % P != r, ascending
                t = torch.tensor([c for r in range(p) for c in range(m) if c % p != r], dtype=torch.long)
            elif name == "pointwise_mask":  # masked: (N, M, 1, 1), 1 where the kernel is 1 x 1
                t = (~hetconv_kernel_mask(m, n, p)).view(n, m, 1, 1)
            elif name == "kernel_mask":  # dense: (N, M, kh, kw), 1 on the HetConv pattern
                t = hetconv_kernel_mask(m, n, p).view(n, m, 1, 1).repeat(1, 1, kh, kw)
                t[:, :, kh // 2, kw // 2] = True
            elif name in ("dense_index", "dense_inverse"):  # exact / masked: see dense_weight; built as a pair
                index, inverse = self._dense_gather(like.device)
                self._derived_cache["dense_index"], self._derived_cache["dense_inverse"] = index, inverse
                return index if name == "dense_index" else inverse
            else:
                raise KeyError(name)
            t = t.to(device=like.device, dtype=dtype)
            self._derived_cache[name] = t
        return t

    def _dense_gather(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(N M kh kw,)`` slot of each dense-kernel entry and ``(1 + #weights,)`` entry of each slot.

        Slot 0 is the zero of the structural zeros, then ``conv_k``'s weights and the ``1 x 1`` weights,
        flattened in that order (as ``dense_weight`` concatenates them). Each weight lands in at most one
        entry; one not placed (the masked impl's dead weights) maps past the last entry, so its gradient is 0.
        """
        m, n, p = self.in_channels, self.out_channels, self.part
        kh, kw = self.kernel_size
        shapes = [(n, m // p, kh, kw)]
        if self.conv_1 is not None:
            shapes.append((n, m - m // p, 1, 1))
        elif self.weight_1x1 is not None:
            shapes.append((n, m, 1, 1))
        numels = [math.prod(s) for s in shapes]
        ids = torch.arange(1, 1 + sum(numels), device=device).split(numels)
        index = self._place(*(i.view(s) for i, s in zip(ids, shapes, strict=True))).flatten()
        inverse = torch.full((1 + sum(numels),), index.numel(), dtype=torch.long, device=device)
        inverse[index] = torch.arange(index.numel(), device=device)
        return index, inverse

    @property
    def gather_index(self) -> Tensor:
        """``impl="exact"``: ``(P (M - M/P),)`` input channel of each centre-tap copy read by ``conv_1``."""
        if self.conv_1 is None:  # AttributeError: hasattr() is False
            raise AttributeError("gather_index exists for impl='exact' with part > 1")
        return self._derived("gather_index", next(self.parameters()))  # device only; conv_1 may be wrapped (binarize)

    @property
    def pointwise_mask(self) -> Tensor:
        """``impl="masked"``: ``(N, M, 1, 1)``, 1 where ``weight_1x1`` is live (the kernel is ``1 x 1``)."""
        if self.weight_1x1 is None:  # AttributeError: hasattr() is False
            raise AttributeError("pointwise_mask exists for impl='masked' with part > 1")
        return self._derived("pointwise_mask", self._parameters["weight_1x1"])

    @property
    def kernel_mask(self) -> Tensor:
        """``impl="dense"``: ``(N, M, kh, kw)``, 1 on the HetConv pattern, 0 on the dead entries."""
        if self.impl != "dense":  # AttributeError: hasattr() is False
            raise AttributeError("kernel_mask exists for impl='dense'")
        return self._derived("kernel_mask", self._parameters["weight"])

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Names and ranges of HetConv's options (whether ``part`` divides a layer's widths is per layer)."""

        super().validate_options(options)
        part = options.get("part", DEFAULT_PART)
        if not (isinstance(part, str) and part.lower() == "pc"
                or isinstance(part, int) and not isinstance(part, bool) and part >= 1):
            raise ValueError(f"part must be a positive int or 'pc' (P = in_channels), but got {part!r}")
        check_choice("impl", options.get("impl", "exact"), IMPLS)
        check_choice("train_form", options.get("train_form", "dense"), TRAIN_FORMS)

    # -- init ------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, ReLU) on both parts, as the spec says (the paper states no init).

        With fan_out, each part's weight variance is ``2 / (N * its kernel area)``, so a filter's output
        variance ``(M/P K^2 * 2/(N K^2) + (M - M/P) * 2/N)`` equals the dense conv's ``2 M / N``.
        ``impl="dense"``: the entries off the HetConv pattern start at zero, so ``weight`` is the kernel the
        module computes with (their gradient is zero, so they stay zero under the usual optimisers).
        """
        if self.impl == "dense":
            nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.weight_1x1 is not None:
            nn.init.kaiming_normal_(self.weight_1x1, mode="fan_out", nonlinearity="relu")
        for c in (self.conv_k, self.conv_1):
            if c is not None:
                nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")
        if self.impl == "dense":
            # fan_out of the dense kernel is N kh kw for every entry; the 1x1 entries should use N (as the
            # 1x1 kernels of the other impls do), so scale up the centre taps of the 1x1 kernels.
            kh, kw = self.kernel_size
            one = ~hetconv_kernel_mask(self.in_channels, self.out_channels, self.part).to(self.weight.device)
            with torch.no_grad():
                self.weight[:, :, kh // 2, kw // 2] *= torch.where(one, math.sqrt(kh * kw), 1.0).to(
                    self.weight
                )
                self.weight.mul_(self.kernel_mask)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # -- forward ---------------------------------------------------------------------------------
    def _pad_input(self, x: Tensor) -> Tensor:
        if self.padding_mode == "zeros":
            return x
        ph, pw = self._pad
        return F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)

    def _centre_taps(self, x: Tensor, out_hw: tuple[int, int]) -> Tensor:
        """Input pixels at the centres of the ``K x K`` windows: ``(B, M, H, W) -> (B, M, *out_hw)``."""
        pad = self._pad if self.padding_mode == "zeros" else (0, 0)
        return align_identity(x, self.kernel_size, self.stride, pad, self.dilation, out_hw)

    def _trains_dense(self) -> bool:
        """Whether this call runs the dense training form (see ``train_form``)."""
        if self.impl == "dense" or self.train_form != "dense" or not (self.training and torch.is_grad_enabled()):
            return False
        # A traced or exported graph records the architecture (the grouped ops), whatever the mode.
        if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return False
        # Only plain, unhooked inner convs: a replaced one (binarized, QAT) or a hook must be called, as the
        # grouped ops do; gathering its .weight would silently compute something else.
        return all(_plain_conv(c) for c in (self.conv_k, self.conv_1) if c is not None)

    def _forward(self, x: Tensor) -> Tensor:
        # (B, M, H, W) -> (B, N, H_out, W_out); CompactConv2d.forward checks the input first
        x = self._pad_input(x)
        if self.impl == "dense" or self._trains_dense():
            pad = self._pad if self.padding_mode == "zeros" else (0, 0)
            return F.conv2d(x, self.dense_weight(), self.bias, self.stride, pad, self.dilation)
        p = self.part
        assert self.conv_k is not None
        # Sort input channels by residue mod P (channel c = r + P j goes to r (M/P) + j).
        xs = channel_shuffle(x, self.in_channels // p) if p > 1 else x
        y = self.conv_k(xs)
        if p > 1:
            xc = self._centre_taps(x, (y.shape[-2], y.shape[-1]))
            if self.conv_1 is not None:  # exact: grouped 1x1 over the gathered copies
                y = y + self.conv_1(xc.index_select(1, self.gather_index))
                y = channel_shuffle(y, p)  # filters back from residue order to 0..N-1
            else:  # masked: dense 1x1 in filter order with the K x K channels zeroed
                y = channel_shuffle(y, p) + F.conv2d(xc, self.weight_1x1 * self.pointwise_mask)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    # -- introspection ---------------------------------------------------------------------------
    def dense_weight(self) -> Tensor:
        """The equivalent dense kernel ``(N, M, kh, kw)`` in the original filter/channel order.

        Kernels with ``(c - n) % P == 0`` are ``K x K``; the others are zero except at the centre tap.
        ``F.conv2d(x, dense_weight(), bias, stride, padding, dilation)`` equals ``forward(x)`` (zero padding).
        Differentiable: a gather of the parameters (the training form computes with it).
        """
        n, m = self.out_channels, self.in_channels
        kh, kw = self.kernel_size
        if self.impl == "dense":
            return self.weight * self.kernel_mask
        assert self.conv_k is not None
        w1 = self.conv_1.weight if self.conv_1 is not None else self.weight_1x1
        ws = [self.conv_k.weight] + ([w1] if w1 is not None else [])
        # slot 0 is the zero of the structural zeros; then every gathered weight, flattened (see _dense_gather)
        flat = torch.cat([ws[0].new_zeros(1), *(w.reshape(-1) for w in ws)])
        index, inverse = self._derived("dense_index", flat), self._derived("dense_inverse", flat)
        if torch.compiler.is_compiling():  # dynamo cannot trace a custom jvp; the compiler derives its own backward
            return flat.index_select(0, index).view(n, m, kh, kw)
        return _Gather.apply(flat, index, inverse).view(n, m, kh, kw)

    def _place(self, wk: Tensor, w1: Tensor | None = None) -> Tensor:
        """Put ``wk`` (``conv_k``'s layout) and ``w1`` (the ``1 x 1`` weights' layout) into ``(N, M, kh, kw)``.

        Used on integer slot ids to build the gather index once per device; zeros where nothing goes.
        """
        m, n, p = self.in_channels, self.out_channels, self.part
        kh, kw = self.kernel_size
        ref = torch.zeros(n, m, kh, kw, dtype=wk.dtype, device=wk.device)
        nq, mq = n // p, m // p
        o = torch.arange(n, device=wk.device)
        filt = (o % nq) * p + o // nq  # filter of row o (rows in residue order)
        r = (o // nq).view(-1, 1)
        chans = r + p * torch.arange(mq, device=wk.device).view(1, -1)  # (N, M/P) K x K channels of row o
        ref[filt.view(-1, 1), chans] = wk
        if w1 is not None:
            if self.conv_1 is not None:  # exact: (N, M - M/P) rows in residue order, gathered channels
                idx = self.gather_index.view(p, m - mq)[o // nq]  # channels read by row o
                ref[filt.view(-1, 1), idx, kh // 2, kw // 2] = w1[:, :, 0, 0]
            else:  # masked: (N, M) in filter order, live where the kernel is 1 x 1
                live = ~hetconv_kernel_mask(m, n, p).to(wk.device)  # the K x K kernels keep their centre tap
                ref[:, :, kh // 2, kw // 2] = torch.where(live, w1[:, :, 0, 0], ref[:, :, kh // 2, kw // 2])
        return ref

    def architecture_params(self) -> int:
        """Live weights (the paper's count): ``N (M kh kw / P + M - M/P)`` (+ ``N`` bias); no dead ones."""
        return hetconv_params(
            self.in_channels, self.out_channels, self.kernel_size, self.part, self.bias is not None
        )

    def architecture_macs(self, inputs: tuple[Tensor, ...], output: Tensor) -> int:
        """Eq. 4 MACs for this call: ``B Ho Wo N (M kh kw / P + M - M/P)`` (bias adds not counted).

        Equal to what ``FlopCounterMode`` sees (/2) for ``impl="exact"``; for ``"masked"``/``"dense"`` it is
        the architecture's count, not the executed one (their dead MACs are left out, as the paper counts).
        Those two impls expose it (and ``architecture_params``) as ``count_macs``/``count_params``, which
        ``compconv.profile`` uses instead of visiting their children.
        """
        b, _, ho, wo = output.shape
        return hetconv_macs(self.in_channels, self.out_channels, self.kernel_size, self.part, b * ho * wo)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        s += f", part={self.part}, impl={self.impl}"
        if self.train_form != "dense" and self.impl != "dense":
            s += f", train_form={self.train_form}"
        if self.impl != "exact":
            s += " (counts: live weights only)"
        if self.bias is None:
            s += ", bias=False"
        return s
