"""Which convolutions ``convert`` may replace: plain ``nn.Conv2d`` only, or subclasses made exact.

``isinstance(m, nn.Conv2d)`` does not mean "a plain conv": a subclass may carry behaviour in its
``forward`` or around it that a compact conv (built from the conv's constructor arguments) would silently
drop. So a conv is eligible only when

* its type is exactly ``nn.Conv2d`` (after ``LazyConv2d`` has run once it becomes one), with no
  parametrization (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``, ...), no hooks of
  any kind (forward, backward, state-dict, load-state-dict; the legacy ``torch.nn.utils.weight_norm`` /
  ``spectral_norm`` are forward hooks) and no parameters
  besides ``weight`` and ``bias``; or
* it is timm's ``Conv2dSame`` (TF "same" padding computed in ``forward`` from the input size) and that
  padding is the same symmetric amount for *every* input size (stride 1 with an odd kernel, or a 1x1
  kernel): it is then replaced as an ``nn.Conv2d`` with that explicit padding. Where the padding is
  asymmetric for some input size (every stride-2 3x3 or 5x5 of the ``tf_*`` models), no ``nn.Conv2d``
  geometry gives the same output, so the conv is kept.

Everything else (timm ``StdConv2d`` / ``ScaledStdConv2d``: weight standardisation; QAT ``ConvBn2d`` /
``qat.Conv2d``: BN and fake-quant; any other subclass) is kept, and the report says why.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

__all__ = ["plain_conv_view", "same_padding_amounts"]

# Subclasses with a known reason (matched by class name; the module is named in the message too).
_KNOWN = {
    "StdConv2d": "weight standardisation in forward",
    "StdConv2dSame": "weight standardisation and TF 'same' padding in forward",
    "ScaledStdConv2d": "scaled weight standardisation in forward",
    "ScaledStdConv2dSame": "scaled weight standardisation and TF 'same' padding in forward",
    "ConvBn2d": "QAT conv fused with BN (and fake-quant): both would be dropped",
    "ConvBnReLU2d": "QAT conv fused with BN + ReLU (and fake-quant): all would be dropped",
    "ConvReLU2d": "fused conv + ReLU: the ReLU would be dropped",
}
_SAME = ("Conv2dSame", "Conv2dSameExport")


def same_padding_amounts(kernel: int, stride: int, dilation: int) -> list[int]:
    """Total TF-"same" padding of one spatial dim, for every input size ``i`` mod ``stride``.

    timm (``get_same_padding``): ``max((ceil(i/s) - 1) s + (k - 1) d + 1 - i, 0)``, with
    ``ceil(i/s) s - i = (-i) mod s``, so the amount only depends on ``i mod s``; ``[r]`` is for ``i = r``.
    """
    return [max((-r) % stride - stride + (kernel - 1) * dilation + 1, 0) for r in range(stride)]


def _qualname(m: nn.Module) -> str:
    t = type(m)
    return f"{t.__module__}.{t.__qualname__}"


def _hook_kinds(m: nn.Module) -> list[str]:
    """``"<kind> (<hook names>)"`` for every non-empty hook dict of ``m``.

    Any attribute of ``nn.Module`` whose name has ``hook`` and that is a dict counts (forward, forward-pre,
    backward, backward-pre, legacy backward, state-dict, load-state-dict and any torch adds later): a
    replacement is a new module object, so every hook registered on ``m`` would be silently dropped. The
    ``*_with_kwargs`` / ``*_always_called`` dicts are flags of hooks already in the main dicts.
    """
    out = []
    for attr, hooks in vars(m).items():
        if "hook" not in attr or not isinstance(hooks, dict) or not hooks or attr.endswith(_FLAG_DICTS):
            continue
        kind = attr.strip("_").replace("_", " ")
        if attr == "_backward_hooks" and m._is_full_backward_hook is False:
            kind = "legacy backward hooks (register_backward_hook)"
        names = [getattr(h, "__name__", None) or type(h).__name__ for h in hooks.values()]
        out.append(f"{kind} ({', '.join(names)})")
    return out


_FLAG_DICTS = ("_with_kwargs", "_always_called")


def plain_conv_view(m: nn.Module) -> tuple[nn.Conv2d | None, str]:
    """``(conv, note)``: the plain ``nn.Conv2d`` whose geometry a replacement may copy, or ``(None, why)``.

    ``conv`` is ``m`` itself for a plain conv, or an equivalent ``nn.Conv2d`` with explicit padding for an
    exact timm ``Conv2dSame`` (``note`` then says so). ``why`` is the report's reason for keeping ``m``.
    """
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():  # type: ignore[attr-defined]
        return None, (f"uninitialised {type(m).__name__}: in_channels are unknown until its first forward "
                      "(run the model once, or pass input_size, before converting)")
    if parametrize.is_parametrized(m):
        names = sorted(m.parametrizations.keys())  # type: ignore[union-attr]
        kinds = sorted({type(p).__name__ for v in m.parametrizations.values() for p in v})  # type: ignore[union-attr]
        return None, (f"parametrized conv ({', '.join(kinds)} on {', '.join(names)}): a compact conv would "
                      "drop the parametrization")
    name = type(m).__name__
    timm_same = name in _SAME and type(m).__module__.startswith("timm.")
    if type(m) is not nn.Conv2d and not timm_same:
        why = _KNOWN.get(name) or ("quantization-aware training: fake-quant would be dropped"
                                   if ".qat" in type(m).__module__ else "its forward may differ from nn.Conv2d's")
        return None, f"{_qualname(m)} is not a plain nn.Conv2d ({why}); only plain convs are converted"
    own = {n for n, _ in m.named_parameters(recurse=False)}
    if not own <= {"weight", "bias"}:
        return None, (f"conv with parameters {sorted(own)} (legacy weight_norm / spectral_norm?): a compact "
                      "conv would drop how its weight is made")
    hooks = _hook_kinds(m)
    if hooks:
        return None, f"conv with {'; '.join(hooks)}: a compact conv would drop them"
    return _same_as_plain(m) if timm_same else (m, "")  # type: ignore[arg-type]


def _same_as_plain(m: nn.Conv2d) -> tuple[nn.Conv2d | None, str]:
    pads = []
    for k, s, d in zip(m.kernel_size, m.stride, m.dilation, strict=True):
        amounts = same_padding_amounts(k, s, d)
        if len(set(amounts)) != 1 or amounts[0] % 2:
            by = ", ".join(f"{a // 2}+{a - a // 2}" for a in amounts)
            return None, (f"timm {type(m).__name__} (k={m.kernel_size}, s={m.stride}): TF 'same' padding "
                          f"is asymmetric or depends on the input size (before+after per input size mod "
                          f"{s}: {by}); no nn.Conv2d padding gives the same output")
        pads.append(amounts[0] // 2)
    w = m.weight
    plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, tuple(pads), m.dilation,
                      m.groups, m.bias is not None, m.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        plain.weight.copy_(w)
        if m.bias is not None:
            plain.bias.copy_(m.bias)  # type: ignore[union-attr]
    plain.train(m.training)
    return plain, f"timm {type(m).__name__} as nn.Conv2d(padding={tuple(pads)}) (same output at any size)"
