"""Fold CompConv's output channel shuffle into the tensors' neighbours (union-find over channel groups).

Tensors joined by channelwise ops (activations, pooling, dropout, and additions: a ResNet stage's residual
stream) must share one channel order: such a *group* is one union-find class. A group takes the unshuffled
order when

* every tensor in it has the same channel count, known from the example run (an input broadcast along
  channels, ``(N, 1, H, W) + (N, C, H, W)``, is not part of the group: it is read by the add);
* every *producer* (a member not computed by a channelwise op) can emit any order: a DeployedCompConv2d
  with the group's shuffle, or a plain dense ``nn.Conv2d`` (its output channels permuted);
* every *reader* (a use of a member by an op outside the group) can accept it: a plain dense conv or a
  DeployedCompConv2d (input channels permuted), or ``flatten(1) -> nn.Linear`` (columns permuted).
  A module that produces a group *and* reads it (``a + conv_b(a)``) is both, and gets both rewrites;
* each of these modules runs once per forward, has no hooks, and its parameters are not read by the
  forward directly; channelwise modules of the group have no hooks.

Otherwise the group keeps its order and the shuffle stays, fused into the deployed module's write.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from compconv.deploy.bn import LINEAR_CONV_TYPES
from compconv.deploy.compconv import DeployedCompConv2d
from compconv.deploy.graph import GraphFacts, only_first_arg, user_hooks

__all__ = ["fold_shuffles", "permute_input_channels", "report_unvisited"]


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for j, m in enumerate(perm):
        inv[m] = j
    return inv


def _dense_conv(m: nn.Module) -> bool:
    # Weights permuted in place must be the ones its forward uses: no parametrization, no norm hooks.
    return type(m) in LINEAR_CONV_TYPES and m.groups == 1 and not m._forward_pre_hooks  # type: ignore[operator]


@torch.no_grad()
def permute_input_channels(module: nn.Module, perm: list[int]) -> None:
    """Make ``module`` accept input whose channel ``perm[j]`` holds what its channel ``j`` held before.

    Raises:
        TypeError: ``module`` is neither a DeployedCompConv2d nor a dense (``groups=1``) ``nn.Conv2d``.
        ValueError: ``len(perm)`` differs from its ``in_channels``.
    """
    if not (isinstance(module, DeployedCompConv2d) or (isinstance(module, nn.Conv2d) and module.groups == 1)):
        raise TypeError(f"cannot permute the input channels of {type(module).__name__}")
    if sorted(perm) != list(range(module.in_channels)):
        raise ValueError(f"perm must be a permutation of range({module.in_channels}), but got {len(perm)} entries")
    if isinstance(module, DeployedCompConv2d):
        module.permute_input(perm)
        return
    idx = torch.tensor(_inverse(perm), dtype=torch.long, device=module.weight.device)
    module.weight.copy_(module.weight[:, idx].clone())


@dataclass
class ShuffleResult:
    folded: list[str] = field(default_factory=list)  # DeployedCompConv2d names that no longer shuffle
    kept: dict[str, str] = field(default_factory=dict)  # name -> why its shuffle stays


class _Groups:
    """Union-find over graph nodes."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, a: fx.Node) -> fx.Node:
        root = a
        while self.parent.setdefault(root, root) is not root:
            root = self.parent[root]
        while a is not root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def _rewritable(facts: GraphFacts, node: fx.Node, mod: nn.Module) -> str | None:
    if facts.calls.get(str(node.target), 0) != 1:
        return f"{node.target} runs more than once per forward"
    if user_hooks(mod):
        return f"{node.target} has forward hooks"
    if id(mod) in facts.attr_read:
        return f"the forward reads {node.target}'s parameters directly"
    return None


def _flatten_linear(facts: GraphFacts, node: fx.Node, c: int, src: fx.Node) -> tuple[str, int] | str:
    """``flatten(x, 1)`` read by exactly one ``nn.Linear``: (its name, H*W), or why not."""
    is_flat = (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    )
    if not is_flat or list(node.args[1:]) != [1] or node.kwargs or not only_first_arg(node, src):
        return f"read by {node.op} {getattr(node.target, '__name__', node.target)}"
    if len(node.users) != 1:
        return "flatten(1) is read by more than one op"
    (user,) = node.users
    lin = facts.module(user)
    if type(lin) is not nn.Linear or not only_first_arg(user, node) or parametrize.is_parametrized(lin):
        return "flatten(1) is not read by a plain nn.Linear"
    why = _rewritable(facts, user, lin)
    if why:
        return why
    shape = facts.shapes.get(src)
    hw = shape[2] * shape[3] if shape is not None and len(shape) == 4 else 0
    if lin.in_features != c * hw:
        return f"{user.target}.in_features={lin.in_features} != C*H*W={c}*{hw}"
    return str(user.target), hw


@torch.no_grad()
def fold_shuffles(facts: GraphFacts) -> ShuffleResult:
    """Fold the shuffles of ``facts.model``'s DeployedCompConv2d's where their group allows (see above)."""
    res = ShuffleResult()
    graph = facts.graph
    assert graph is not None
    groups = _Groups()
    chan: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        ins = facts.channelwise_inputs(node)
        if ins is not None:
            chan[node] = ins
            for a in ins:
                groups.union(node, a)
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        members.setdefault(groups.find(node), []).append(node)
    for root, group in members.items():
        shufflers = [
            n for n in group
            if n not in chan and isinstance(facts.module(n), DeployedCompConv2d)
            and facts.module(n)._perm != list(range(facts.module(n).out_channels))  # type: ignore[union-attr]
        ]
        if not shufflers:
            continue
        why = _plan_group(facts, groups, root, group, chan)
        if isinstance(why, str):
            for n in shufflers:
                res.kept[str(n.target)] = why
            continue
        perm, producers, readers = why
        inv = _inverse(perm)
        for n in producers:
            mod = facts.module(n)
            if isinstance(mod, DeployedCompConv2d):
                mod.fold_output_permutation()
                res.folded.append(str(n.target))
            else:  # a dense conv: new output channel m is the old channel inv[m]
                idx = torch.tensor(inv, dtype=torch.long, device=mod.weight.device)  # type: ignore[union-attr]
                mod.weight.copy_(mod.weight[idx].clone())  # type: ignore[union-attr, index]
                if mod.bias is not None:  # type: ignore[union-attr]
                    mod.bias.copy_(mod.bias[idx].clone())  # type: ignore[union-attr, index]
        for name, hw in readers:
            mod = facts.model.get_submodule(name)
            if hw == 0:
                permute_input_channels(mod, perm)
            else:  # flatten(1) -> Linear: channel c's block of H*W columns moves to block perm[c]
                src = [inv[c] * hw + s for c in range(len(perm)) for s in range(hw)]
                idx = torch.tensor(src, dtype=torch.long, device=mod.weight.device)
                mod.weight.copy_(mod.weight[:, idx].clone())
    report_unvisited(facts.model, res, "not called by the traced forward (inside a module kept whole, or unused)")
    return res


def report_unvisited(model: nn.Module, res: ShuffleResult, why: str) -> None:
    """Add every DeployedCompConv2d that still shuffles and that no group decided on to ``res.kept``."""
    for name, m in model.named_modules():
        if isinstance(m, DeployedCompConv2d) and m._shuffle_g != 1 and name not in res.kept:
            res.kept[name] = why


def _plan_group(
    facts: GraphFacts, groups: _Groups, root: fx.Node, group: list[fx.Node], chan: dict[fx.Node, list[fx.Node]]
) -> tuple[list[int], list[fx.Node], list[tuple[str, int]]] | str:
    """(perm, producers, readers as (module name, H*W or 0 for a conv)) for a foldable group, else why not."""
    if facts.shape_error is not None:
        return f"tensor shapes unknown ({facts.shape_error})"
    stored = [n for n in group if n in facts.escaped]
    if stored:
        return f"the forward stores {stored[0].name} of its channel group in a module attribute"
    chans = {facts.channels(n) for n in group}
    if len(chans) != 1 or None in chans:
        return "the channel group mixes tensors of different (or unknown) channel counts"
    (c,) = chans
    perm: list[int] | None = None
    producers = [n for n in group if n not in chan]
    for n in producers:
        mod = facts.module(n)
        if not (isinstance(mod, DeployedCompConv2d) or _dense_conv(mod)):  # type: ignore[arg-type]
            return f"a tensor of its channel group comes from {n.op} {getattr(n.target, '__name__', n.target)}"
        why = _rewritable(facts, n, mod)  # type: ignore[arg-type]
        if why:
            return why
        if mod.out_channels != c:  # type: ignore[union-attr]
            return f"{n.target}.out_channels={mod.out_channels} != {c}"  # type: ignore[union-attr]
        if isinstance(mod, DeployedCompConv2d):
            if perm is not None and mod._perm != perm:
                return "the producers of its channel group shuffle differently"
            perm = mod._perm
    for n in group:
        mod = facts.module(n)
        if n in chan and mod is not None and user_hooks(mod):
            return f"{n.target} (in its channel group) has forward hooks"
    assert perm is not None
    readers: list[tuple[str, int]] = []
    for n in group:
        for user in n.users:
            if user in chan and groups.find(user) is root:
                continue  # a channelwise op of the same group
            mod = facts.module(user)
            if mod is not None and (isinstance(mod, DeployedCompConv2d) or _dense_conv(mod)):
                if not only_first_arg(user, n):
                    return f"{user.target} reads its channel group with other tensors"
                why = _rewritable(facts, user, mod)
                if why:
                    return why
                if mod.in_channels != c:
                    return f"{user.target}.in_channels={mod.in_channels} != {c}"
                readers.append((str(user.target), 0))
                continue
            lin = _flatten_linear(facts, user, c, n)
            if isinstance(lin, str):
                return lin
            readers.append(lin)
    return perm, producers, readers
