"""The one interface every compact convolution implements, and the method registry.

A compact convolution is an ``nn.Module`` whose constructor takes the arguments of ``nn.Conv2d``
(``in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode``)
plus its own hyper-parameters (keyword-only, with the paper's defaults). Input ``(N, C_in, H, W)``,
output ``(N, C_out, H_out, W_out)`` with the same ``H_out, W_out`` as the ``nn.Conv2d`` it replaces.

Each method also offers:

* ``from_conv(conv, **hparams)`` (classmethod): the replacement for an existing ``nn.Conv2d``, with
  its geometry copied (channels, kernel, stride, padding, dilation, bias, padding mode), on the same
  device and dtype;
* ``ineligible_reason(conv, **hparams)`` (classmethod): ``None`` when ``from_conv`` would succeed,
  otherwise a short human-readable reason (``"depthwise conv: HetConv needs dense convs"``), so the
  converter can report *why* a layer was kept without building anything;
* ``extra_repr()`` showing the method's own choices.

``register_method("name")`` adds a class to the registry; ``get_method`` / ``list_methods`` read it.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
import torch.fx
from torch import Tensor, nn

__all__ = [
    "CompactConv2d",
    "conv_geometry",
    "get_method",
    "list_methods",
    "register_method",
]

_METHODS: dict[str, type[CompactConv2d]] = {}

T = TypeVar("T", bound="type[CompactConv2d]")


def _pair(v: int | tuple[int, ...], name: str = "value") -> tuple[int, int]:
    """``v`` as ``(v, v)`` or the pair itself; ``name`` is the argument named in the error.

    Raises ``ValueError`` (``"kernel_size must be an int or a pair of ints, but got (3, 3, 3)"``) for
    anything else: a tuple of another length, floats, bools, strings.
    """
    def as_int(x: Any) -> int:
        if isinstance(x, bool):
            raise TypeError
        return operator.index(x)  # ints, numpy ints, 0-d integer tensors; not floats

    try:
        if isinstance(v, (tuple, list)):
            if len(v) == 2:
                return (as_int(v[0]), as_int(v[1]))
        else:
            i = as_int(v)
            return (i, i)
    except TypeError:
        pass
    raise ValueError(f"{name} must be an int or a pair of ints, but got {v!r}")


def conv_output_hw(conv: Any, hw: tuple[int, ...]) -> tuple[int, int]:
    """``(H_out, W_out)`` of a conv (``nn.Conv2d`` or a compact one) for an ``hw`` input (nn.Conv2d's formula,
    with ``"same"``/``"valid"`` or numeric padding)."""
    out = []
    for i, size in enumerate(hw[-2:]):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        if conv.padding == "same":
            out.append(size)
            continue
        p = 0 if conv.padding == "valid" else conv.padding[i]
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def conv_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """The ``nn.Conv2d`` constructor arguments of ``conv`` (what a replacement must copy)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d, but got {type(conv).__name__}")
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


class CompactConv2d(nn.Module):
    """Base class of every compact convolution (see the module docstring for the contract).

    Subclasses set ``method`` (the registry name) and ``paper`` (a citation string), implement
    ``__init__`` with ``nn.Conv2d``'s signature plus keyword-only hyper-parameters, and may override
    ``ineligible_reason`` to refuse some convolutions with a reason.
    """

    method: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    # Geometry shared by every method; subclasses set them in __init__ via _init_geometry.
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    padding_mode: str

    def _init_geometry(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: int | tuple[int, int] | str,
        dilation: int | tuple[int, int],
        groups: int,
        padding_mode: str,
    ) -> None:
        """Validate and store the ``nn.Conv2d`` arguments (clear errors naming the argument)."""
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, but got {v!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        for name, v in (("kernel_size", self.kernel_size), ("stride", self.stride), ("dilation", self.dilation)):
            if min(v) < 1:
                raise ValueError(f"{name} must be >= 1, but got {v}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair or one of 'same', 'valid', but got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d)")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding")
            if min(self.padding) < 0:
                raise ValueError(f"padding must be >= 0, but got {padding}")
        allowed = ("zeros", "reflect", "replicate", "circular")
        if padding_mode not in allowed:
            raise ValueError(f"padding_mode must be one of {allowed}, but got {padding_mode!r}")
        self.padding_mode = padding_mode

    @classmethod
    def ineligible_reason(cls, conv: nn.Conv2d, **hparams: Any) -> str | None:
        """``None`` if ``from_conv(conv, **hparams)`` can build a replacement, else why not.

        The default tries to build on the meta device (no memory, no weights) and reports the
        ValueError's message.
        """
        if not isinstance(conv, nn.Conv2d):
            return f"not an nn.Conv2d ({type(conv).__name__})"
        try:
            geo = conv_geometry(conv)
            with torch.device("meta"):
                cls(**geo, **hparams)
        except (ValueError, TypeError) as e:
            return str(e)
        return None

    @classmethod
    def resolve_hparams(cls, conv: nn.Conv2d, **hparams: Any) -> tuple[dict[str, Any], str]:
        """Adapt ``hparams`` to ``conv`` before building (e.g. lower a depth that cannot fit).

        Returns the hyper-parameters to use and a note for the conversion report ('' if unchanged).
        The converter calls this first, then ``ineligible_reason``; the default changes nothing.
        """
        return dict(hparams), ""

    @classmethod
    def finalize_conversion(cls, model: nn.Module, converted: list[str], *,
                            layer_options: dict[str, set[str]] | None = None, **hparams: Any) -> None:
        """Network-level steps after ``convert`` swapped the layers named in ``converted`` (default: none).

        ``hparams`` are the options the user passed to ``convert``; ``layer_options`` maps a converted layer's
        name to the option names its ``overrides`` set (a step must leave those as the user set them).
        XSepConv uses this to number its 2x2 layers for the rotating padding and to take each host's
        activation.
        """

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Raise ``ValueError`` for an option no layer could take, before any layer is built.

        The default accepts the keyword-only hyper-parameters of ``__init__`` (any value); methods
        override it to check value ranges too (``compconv.options`` has the shared checks). A value that
        only some layers cannot take is not an error here: ``convert`` keeps those layers with a reason.
        """
        import inspect

        from compconv.options import check_option_names

        sig = inspect.signature(cls.__init__)
        names = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        check_option_names(cls.method or cls.__name__, options, names)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **hparams: Any) -> CompactConv2d:
        """Build the replacement for ``conv`` (same geometry, device and dtype; fresh weights).

        Raises ``ValueError`` with the reason when the conv cannot be replaced with these
        hyper-parameters.
        """
        geo = conv_geometry(conv)
        p = conv.weight
        mod = cls(**geo, **hparams)
        return mod.to(device=p.device, dtype=p.dtype)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Spatial output size for an ``h x w`` input: the same as the replaced ``nn.Conv2d``."""
        return conv_output_hw(self, (h, w))

    # -- the nn.Conv2d contract ------------------------------------------------------------------
    # Smallest batch the module accepts in training mode (SlimConv: 2, for the BatchNorm in its SE branch).
    min_train_batch: ClassVar[int] = 1

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H_out, W_out)``; unbatched ``(C_in, H, W) -> (C_out, H_out, W_out)``.

        As ``nn.Conv2d``: a 3-d input is treated as a batch of one and returned without the batch dim.
        Raises ``ValueError`` for an input that is not 3-d or 4-d, whose channel count is not
        ``in_channels``, or (training mode) whose batch is smaller than ``min_train_batch``. Subclasses
        implement ``_forward`` on the 4-d input.
        """
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: no concrete shape to check
            return self._forward(x)
        if self._check_input(x):
            return self._forward(x.unsqueeze(0)).squeeze(0)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _forward (or forward)")

    def _check_input(self, x: Tensor) -> bool:
        """Validate the input of ``forward`` (cheap: its rank and two sizes); True if it is unbatched."""
        name = type(self).__name__
        dim = x.dim()
        if dim not in (3, 4):
            raise ValueError(
                f"{name} expected input of shape (N, C, H, W) or (C, H, W) with C = in_channels="
                f"{self.in_channels}, but got shape {tuple(x.shape)}"
            )
        if torch.jit.is_tracing():  # sizes are traced tensors there: comparing them warns; the trace checks
            return dim == 3
        if x.shape[-3] != self.in_channels:
            raise ValueError(
                f"{name} expected in_channels={self.in_channels} input channels, but got input of shape "
                f"{tuple(x.shape)} with {x.shape[-3]} channels"
            )
        if self.min_train_batch > 1 and self.training and (dim == 3 or x.shape[0] < self.min_train_batch):
            batch = 1 if dim == 3 else x.shape[0]
            raise ValueError(
                f"{name} in training mode needs a batch of at least {self.min_train_batch}, but got batch "
                f"size {batch} (input shape {tuple(x.shape)}); {self._min_batch_reason()}"
            )
        return dim == 3

    def _min_batch_reason(self) -> str:
        return "use a larger batch or call .eval()"

    def reset_parameters(self) -> None:
        """Re-initialise every parameter as at construction (the ``nn.Conv2d`` method code reaches for).

        Each sub-layer runs its own ``reset_parameters`` (PyTorch's defaults, BN statistics included) and
        the module's own parameters (its output bias) go to zero; methods with their own initialisation
        (Ghost, HetConv) override this.
        """
        stack = list(self.children())
        while stack:
            m = stack.pop()
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                stack.extend(m.children())
        with torch.no_grad():
            for p in self._parameters.values():
                if p is not None:
                    p.zero_()

    def __getattr__(self, name: str) -> Any:
        # nn.Module.__getattr__ finds the registered parameters, buffers and submodules; only a missing
        # ``weight`` gets a better error (code written for nn.Conv2d reaches for it, e.g. weights_init).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight" or "_parameters" not in self.__dict__:
                raise
        names = [n for n, _ in self.named_parameters()]
        shown = names if len(names) <= 8 else [*names[:8], f"... ({len(names)} in all)"]
        raise AttributeError(
            f"{type(self).__name__} has no single .weight; its parameters are {shown} (it computes with "
            "several smaller layers). Call .reset_parameters() to re-initialise them as at construction, or "
            "initialise each one through .named_parameters() (in a weights_init for model.apply, test "
            "isinstance(m, compconv.CompactConv2d) before reaching for m.weight)"
        ) from None


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: register a ``CompactConv2d`` subclass under ``name`` (raises on duplicates)."""

    def deco(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, CompactConv2d)):
            raise TypeError(f"register_method expects a CompactConv2d subclass, but got {cls!r}")
        if name in _METHODS:
            raise ValueError(f"a method named {name!r} is already registered ({_METHODS[name].__name__})")
        cls.method = name
        _METHODS[name] = cls
        return cls

    return deco


def _ensure_builtin_methods() -> None:
    # Importing the package's layers registers the built-in methods.
    import compconv.layers  # noqa: F401


def get_method(name: str) -> type[CompactConv2d]:
    """The class registered under ``name``; an unknown name lists the known ones and close matches."""
    _ensure_builtin_methods()
    if not isinstance(name, str) or name not in _METHODS:
        known = sorted(_METHODS)
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown method {name!r}; method must be one of {known}.{hint}")
    return _METHODS[name]


def list_methods() -> list[str]:
    """Sorted names of the registered compact convolutions."""
    _ensure_builtin_methods()
    return sorted(_METHODS)
