"""Batch-norm folding: ``bn(conv(x))`` as one conv with a bias, and the pass that finds the pairs.

A pair is folded only when the rewrite provably computes the same function (eval mode):

* the BN is a plain ``nn.BatchNorm2d`` with running statistics (a subclass with its own ``forward`` is not
  an affine), or timm's ``BatchNormAct2d`` (BN, then drop, then act: the BN goes into the conv, the drop
  and act stay as modules);
* the conv's weight is known: a plain ``nn.Conv2d``, or one whose weight is computed by
  ``torch.nn.utils.parametrizations`` / the hook-based ``weight_norm`` / ``spectral_norm`` (the *effective*
  weight goes into a fresh plain conv); other ``nn.Conv2d`` subclasses compute their own ``forward``
  (timm ``Conv2dSame``, ``StdConv2d``, QAT convs) and are kept;
* the BN is the conv's only reader, each runs once per forward, no hook sees either module, and the
  forward does not read the conv's parameters directly (``F.conv2d(x, self.conv.weight)``).

A folded conv replaces the original object at every name it is registered under (aliases, shared
parents), and the BN becomes ``nn.Identity`` (or its activation) at every name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from compconv.deploy.graph import GraphFacts, only_first_arg, replace_module, user_hooks
from compconv.layers.compconv import CompConv2d
from compconv.layers.hetconv import HetConv2d
from compconv.layers.ops import DepthwiseConv2d, PadAnyConv2d

__all__ = ["bn_affine", "effective_conv_weight", "fold_bn_into_conv", "foldable_bn"]


def _bn_act_type() -> type | None:
    try:  # timm is optional
        from timm.layers.norm_act import BatchNormAct2d
    except Exception:  # noqa: BLE001 - any import failure: timm's BN+act is simply not recognised
        return None
    return BatchNormAct2d


BN_ACT = _bn_act_type()
# Conv classes whose output is the convolution with their weight plus their bias (nothing else): a BN
# folds into their weight and bias. Other subclasses (timm Conv2dSame, StdConv2d, QAT convs) are kept.
LINEAR_CONV_TYPES: tuple[type, ...] = (nn.Conv2d, PadAnyConv2d, DepthwiseConv2d)


def foldable_bn(m: nn.Module) -> str | None:
    """None when ``m`` is an eval-mode per-channel affine (``y = a * x + b``), else why not."""
    if not isinstance(m, nn.BatchNorm2d):
        return f"{type(m).__name__} is not a BatchNorm2d"
    if not (m.track_running_stats and m.running_mean is not None and m.running_var is not None):
        # Without running stats a BN normalises with batch statistics even in eval mode: not an affine.
        return "BN without running statistics (normalises with batch statistics)"
    forward = type(m).forward
    if forward is not nn.BatchNorm2d.forward and not (BN_ACT is not None and forward is BN_ACT.forward):
        return f"{type(m).__name__} overrides BatchNorm2d.forward"
    return None


def bn_act_tail(bn: nn.Module) -> nn.Module:
    """What stays of ``bn`` once its affine is folded: ``nn.Identity``, or timm BatchNormAct2d's drop+act."""
    if BN_ACT is not None and isinstance(bn, BN_ACT):
        keep = [m for m in (bn.drop, bn.act) if not isinstance(m, nn.Identity)]
        return keep[0] if len(keep) == 1 else nn.Sequential(*keep) if keep else nn.Identity()
    return nn.Identity()


def bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``y = a * x + b`` per channel: returns ``(a, b)``, float64, shape ``(C,)``."""
    why = foldable_bn(bn)
    if why is not None:
        raise ValueError(f"bn must be an nn.BatchNorm2d with running statistics: {why}")
    a = torch.rsqrt(bn.running_var.double() + bn.eps)  # type: ignore[union-attr]
    if bn.weight is not None:
        a = a * bn.weight.detach().double()
    b = -bn.running_mean.double() * a  # type: ignore[union-attr]
    if bn.bias is not None:
        b = b + bn.bias.detach().double()
    return a, b


def norm_hooks(conv: nn.Module) -> list[object]:
    """The hook-based weight_norm / spectral_norm hooks of ``conv`` (they compute its weight)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return [h for h in conv._forward_pre_hooks.values() if isinstance(h, WeightNorm | SpectralNorm)]


def effective_conv_weight(conv: nn.Module) -> tuple[Tensor, Tensor | None] | str:
    """``(weight, bias)`` that ``conv`` uses in eval mode, or why they are not known.

    Known: an ``nn.Conv2d`` of a class in ``LINEAR_CONV_TYPES`` (its output is the convolution with its
    weight plus its bias); one parametrized with ``torch.nn.utils.parametrize`` (``weight_norm``,
    ``spectral_norm``, ...: the parametrization evaluated); the hook-based ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` (the hook's weight, without a power iteration).
    """
    from torch.nn.utils.spectral_norm import SpectralNorm

    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if _base_class(conv) not in LINEAR_CONV_TYPES:
        return f"{type(conv).__name__} is an nn.Conv2d subclass with its own forward"
    if user_hooks(conv, allow=norm_hooks(conv)):
        return "the conv has forward hooks"
    weight: Tensor = conv.weight
    for hook in norm_hooks(conv):
        if hook.name != "weight":  # type: ignore[attr-defined]
            return f"a norm hook computes {hook.name!r}"  # type: ignore[attr-defined]
        if isinstance(hook, SpectralNorm):
            weight = hook.compute_weight(conv, do_power_iteration=False)
        else:
            weight = hook.compute_weight(conv)  # type: ignore[attr-defined]
    return weight.detach(), None if conv.bias is None else conv.bias.detach()


def _base_class(conv: nn.Module) -> type:
    # ParametrizedConv2d derives from the original class.
    return type(conv).__bases__[0] if parametrize.is_parametrized(conv) else type(conv)


def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new plain ``nn.Conv2d`` (with a bias) equal to ``bn(conv(x))`` in eval mode. Shapes as ``conv``.

    ``conv`` may be parametrized (``torch.nn.utils.parametrizations.weight_norm`` ...) or carry the
    hook-based weight/spectral norm: its effective weight is folded into a fresh conv without them.

    Raises:
        ValueError: ``bn`` is not a BatchNorm2d with running statistics, or its width differs.
        TypeError: ``conv`` is not a plain (or parametrized) ``nn.Conv2d``.
    """
    why = foldable_bn(bn)
    if why is not None or (BN_ACT is not None and isinstance(bn, BN_ACT)):
        raise ValueError(
            "bn must be an nn.BatchNorm2d with running statistics (track_running_stats=True)"
            + (f": {why}" if why else f": {type(bn).__name__} also applies an activation")
        )
    return fold_affine(conv, bn)


@torch.no_grad()
def fold_affine(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A fresh conv (``conv``'s class, without parametrizations or hooks) computing ``bn``'s affine of
    ``conv`` (timm BatchNormAct2d: without its act)."""
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn.num_features={bn.num_features} != conv.out_channels={conv.out_channels}")
    wb = effective_conv_weight(conv)
    if isinstance(wb, str):
        raise TypeError(f"conv must be a plain (or parametrized) nn.Conv2d: {wb}")
    weight, bias = wb
    a, b = bn_affine(bn)
    new = torch.nn.utils.skip_init(  # no random init: every value is overwritten below
        _base_class(conv),
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        conv.dilation,  # type: ignore[arg-type]
        conv.groups,
        True,
        conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    new.weight.copy_((weight.double() * a.view(-1, 1, 1, 1)).to(weight.dtype))
    new.bias.copy_((b if bias is None else bias.double() * a + b).to(weight.dtype))  # type: ignore[union-attr]
    return new.requires_grad_(False)


@dataclass
class BNPlan:
    """The BN pass's decisions: (conv name, BN name) pairs, and every BN kept with the reason."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    after_conv: list[str] = field(default_factory=list)  # kept BNs that read a conv's output


AFTER_HETCONV = ("after a HetConv2d in its grouped form (deploy(..., collapse_hetconv=True) makes it a dense conv, "
                 "which folds it)")


def _innermost_module_type(node: object) -> type | None:
    """The class of the innermost module whose forward produced ``node`` (torch.fx's ``nn_module_stack``)."""
    stack = getattr(node, "meta", {}).get("nn_module_stack")
    if not stack:
        return None
    last = list(stack.values())[-1]
    return last[1] if isinstance(last, tuple) and isinstance(last[1], type) else None


def _conv_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d | CompConv2d)


def plan_bn_folds(facts: GraphFacts) -> BNPlan:
    """Which (conv, BN) pairs can be folded, from the traced graph (or the fallback's observations)."""
    plan = BNPlan()
    if facts.graph is None:
        return _plan_sequential(facts, plan)
    for node in facts.graph.nodes:
        bn = facts.module(node)
        if bn is None or not isinstance(bn, nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        conv = facts.module(src) if src is not None else None
        why = _why_not(facts, conv, bn, node.target, getattr(src, "target", None))
        if why == "not after a conv" and _innermost_module_type(src) is HetConv2d:  # traced through: its last op
            why = AFTER_HETCONV
        if why is None and not (len(src.users) == 1 and only_first_arg(node, src)):  # type: ignore[union-attr]
            why = "the conv's output is also read elsewhere"
        if why is None and src in facts.escaped:
            why = "the forward stores the conv's output in a module attribute"
        _record(plan, conv, str(src.target) if why is None else None, node.target, why)  # type: ignore[union-attr]
    called = {id(facts.model.get_submodule(n.target)) for n in facts.graph.nodes if n.op == "call_module"}
    for name, m in facts.model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and id(m) not in called:
            plan.kept[name] = "not called by the traced forward (inside a module kept whole, or unused)"
    return plan


def _why_not(
    facts: GraphFacts, conv: nn.Module | None, bn: nn.Module, bn_name: str, conv_name: str | None
) -> str | None:
    why = foldable_bn(bn)
    if why is not None:
        return why
    if isinstance(conv, HetConv2d):  # a peer with no single kernel to fold into
        return AFTER_HETCONV
    if conv is None or not _conv_like(conv):
        return "not after a conv"
    if facts.graph is not None and (facts.calls.get(bn_name, 0) != 1 or facts.calls.get(str(conv_name), 0) != 1):
        return "the conv or the BN runs more than once per forward (shared module)"
    for m, what in ((conv, "conv"), (bn, "BN")):
        if user_hooks(m, allow=norm_hooks(m)):
            return f"the {what} has forward hooks (they would see other values)"
        if id(m) in facts.attr_read:
            return f"the forward reads the {what}'s parameters directly"
    if bn.num_features != conv.out_channels:  # type: ignore[union-attr]
        return f"bn.num_features={bn.num_features} != conv.out_channels={conv.out_channels}"  # type: ignore[union-attr]
    if isinstance(conv, nn.Conv2d):
        wb = effective_conv_weight(conv)
        if isinstance(wb, str):
            return wb
    return None


def _record(plan: BNPlan, conv: nn.Module | None, conv_name: str | None, bn_name: str, why: str | None) -> None:
    if why is None:
        assert conv_name is not None
        plan.pairs.append((conv_name, bn_name))
        return
    plan.kept[bn_name] = why
    if conv is not None and _conv_like(conv):
        plan.after_conv.append(bn_name)


def _plan_sequential(facts: GraphFacts, plan: BNPlan) -> BNPlan:
    """Without a graph: (conv, BN) adjacent in a plain ``nn.Sequential``, checked on the observed forward.

    ``Sequential.forward`` hands the conv's output to the BN and to nothing else; what else could read it
    is a hook or another call of the conv (a parent calling it directly, a shared conv): the calls counted
    on the example input must be those of the container, and no hook may be registered.
    """
    names = {id(m): n for n, m in facts.model.named_modules()}
    for seq in facts.model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.children())
        for m1, m2 in zip(kids, kids[1:], strict=False):
            if not isinstance(m2, nn.BatchNorm2d):
                continue
            bn_name, conv_name = names[id(m2)], names[id(m1)]
            why = _why_not(facts, m1, m2, bn_name, None)
            if why is None and type(seq).forward is not nn.Sequential.forward:
                why = f"{type(seq).__name__} overrides Sequential.forward"
            elif why is None and facts.observed_calls is None:
                why = "no example input to observe the forward (torch.fx could not trace the model)"
            elif why is None:
                n_seq = facts.observed_calls.get(id(seq), 0)
                n = (facts.observed_calls.get(id(m1), 0), facts.observed_calls.get(id(m2), 0))
                if n_seq == 0:
                    why = "not reached by the example input"
                elif n != (n_seq, n_seq):
                    why = "the conv or the BN also runs outside its nn.Sequential (its output may be read there)"
            if why is None and user_hooks(seq):
                why = "the nn.Sequential has forward hooks"
            _record(plan, m1, conv_name if why is None else None, bn_name, why)
    seen = {bn for _, bn in plan.pairs} | set(plan.kept)
    for name, m in facts.model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and name not in seen:
            plan.kept[name] = "torch.fx could not trace the model: only nn.Sequential (conv, BN) pairs are folded"
    return plan


def fold_plain_convs(model: nn.Module, plan: BNPlan) -> tuple[list[tuple[str, str]], dict[int, nn.Module]]:
    """Fold the planned pairs whose conv is an ``nn.Conv2d``; return them and ``{id(CompConv): bn}``.

    The CompConv pairs are folded by the CompConv pass (into ``DeployedCompConv2d``'s output write).
    """
    done: list[tuple[str, str]] = []
    for_compconv: dict[int, nn.Module] = {}
    for conv_name, bn_name in plan.pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if isinstance(conv, CompConv2d):
            for_compconv[id(conv)] = bn
            continue
        with warnings.catch_warnings():  # reading a hook-based norm's weight warns about deprecation
            warnings.simplefilter("ignore", FutureWarning)
            new = fold_affine(conv, bn)  # type: ignore[arg-type]
        replace_module(model, conv, new)
        replace_module(model, bn, bn_act_tail(bn))
        done.append((conv_name, bn_name))
    return done, for_compconv
