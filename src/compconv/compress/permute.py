"""When a conv's output channels may be permuted for free, and how to absorb the permutation.

A conv's output channels can be reordered without changing the network's function when every path from
its output reaches only dense convs (``groups=1``) through channelwise, parameter-free ops or BN: then
the BNs on the way and the consumers' input channels are permuted to match. Anything else on a path
(a residual add, a concatenation, a flatten into a linear layer, a depthwise conv, a reshape) would need
its other inputs permuted alike, so such convs keep the plain assignment. The graph is read with
``torch.fx.symbolic_trace``; a model that cannot be traced has no permutable convs (the report says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["PermutableOutput", "apply_permutation", "permutable_outputs"]

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Tanh,
                 nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.ELU, nn.Mish)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.silu, F.hardswish, F.gelu, torch.sigmoid, F.max_pool2d,
                   F.avg_pool2d, F.dropout, F.leaky_relu, torch.tanh}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}


@dataclass
class PermutableOutput:
    """A conv whose output order is free: the BNs on its paths and the dense convs that consume it."""

    norms: list[str]
    consumers: list[str]


def permutable_outputs(model: nn.Module) -> tuple[dict[str, PermutableOutput], str]:
    """``({conv name: PermutableOutput}, note)`` for every conv whose output channels may be permuted.

    ``note`` is ``""`` or why nothing could be analysed (e.g. the model does not trace with torch.fx).
    """
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: no permutation, with the reason
        return {}, f"torch.fx could not trace the model ({type(e).__name__}); plain assignment everywhere"
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    mods = dict(model.named_modules())
    out: dict[str, PermutableOutput] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.Conv2d):
            continue
        if calls[node.target] != 1:
            continue
        res = _walk(node, mods, calls)
        if res is not None and res.consumers:
            out[node.target] = res
    return out, ""


def _walk(start: torch.fx.Node, mods: dict[str, nn.Module], calls: dict[str, int]) -> PermutableOutput | None:
    norms: list[str] = []
    consumers: list[str] = []
    todo = list(start.users)
    seen: set[torch.fx.Node] = set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            m = mods.get(n.target)
            if calls.get(n.target, 0) != 1 and not isinstance(m, _PASS_MODULES):
                return None  # a shared BN or conv also sees other inputs (a shared ReLU is harmless)
            if isinstance(m, nn.Conv2d) and m.groups == 1 and n.args and len(n.all_input_nodes) == 1:
                consumers.append(n.target)
                continue
            if isinstance(m, nn.BatchNorm2d):
                norms.append(n.target)
            elif not isinstance(m, _PASS_MODULES):
                return None
        elif n.op == "call_function":
            if n.target not in _PASS_FUNCTIONS or len(n.all_input_nodes) != 1:
                return None
        elif n.op == "call_method":
            if n.target not in _PASS_METHODS or len(n.all_input_nodes) != 1:
                return None
        else:
            return None  # the output node, a placeholder, getattr: the order is visible outside
        todo.extend(n.users)
    return PermutableOutput(norms, consumers)


def apply_permutation(model: nn.Module, spec: PermutableOutput, pi: list[int]) -> None:
    """Make ``model`` consistent with a conv whose output ``j`` now holds what channel ``pi[j]`` held.

    The BNs' parameters and statistics and the dense consumers' input channels are reordered (exact).
    A consumer that is not a plain ``nn.Conv2d`` any more (a compact conv, fitted later on its real input)
    is left alone.
    """
    idx = torch.as_tensor(pi, dtype=torch.long)
    with torch.no_grad():
        for name in spec.norms:
            bn = model.get_submodule(name)
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                if t is not None:
                    t.copy_(t[idx.to(t.device)])
        for name in spec.consumers:
            conv = model.get_submodule(name)
            if type(conv) is nn.Conv2d:
                conv.weight.copy_(conv.weight[:, idx.to(conv.weight.device)])

