"""Facts about a model's traced graph that every rewrite asks, derived once.

* which module a graph node calls, and how often each module runs per forward (``calls``; torch.fx names
  a module by one canonical path however many names it is registered under, so counting per target is
  counting per module *object*);
* which modules the forward reads parameters of directly (``get_attr`` nodes: ``self.conv.weight``);
* which modules carry user hooks (a hook sees the values a rewrite changes);
* the shape of every tensor in the graph, from one run on the example input (channel counts, broadcasts);
* which ops act on each channel alike (activations, pooling, dropout, ``a + b``), so a channel
  permutation commutes with them;
* how to replace a module object at every name it is registered under (aliases, shared parents).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from compconv.layers.base import CompactConv2d
from compconv.layers.compconv import CompConv2d

__all__ = ["GraphFacts", "only_first_arg", "replace_module", "trace", "user_hooks"]


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A module with hooks stays whole: a hook must keep seeing the values it saw (no rewrite inside).
        return isinstance(m, self.leaf_types) or user_hooks(m) or super().is_leaf_module(m, qualname)


def _proxies(v: Any) -> list[fx.Node]:
    if isinstance(v, fx.Proxy):
        return [v.node]
    if isinstance(v, list | tuple):
        return [n for x in v for n in _proxies(x)]
    if isinstance(v, dict):
        return [n for x in v.values() for n in _proxies(x)]
    return []


def trace(model: nn.Module) -> tuple[fx.Graph | None, str | None, set[fx.Node]]:
    """FX graph with CompConvs (and timm's BN+act, and hooked modules) as leaves; peers traced through when
    possible, else kept as leaves. Returns ``(graph, None, escaped)`` or ``(None, why tracing failed, {})``.

    ``escaped``: nodes whose value the forward stored in a module attribute (``self.feat = self.conv(x)``,
    read after the forward: a tap the graph does not show). Such attributes are restored after tracing.
    """
    from compconv.deploy.bn import BN_ACT, LINEAR_CONV_TYPES
    from compconv.deploy.compconv import DeployedCompConv2d

    # Convs that a BN folds into are leaves (torch.fx would trace compconv's own subclasses through).
    extra = LINEAR_CONV_TYPES + ((BN_ACT,) if BN_ACT is not None else ())
    why = None
    before = [(m, dict(m.__dict__)) for m in model.modules()]
    for leaves in ((CompConv2d, DeployedCompConv2d), (CompactConv2d, DeployedCompConv2d)):
        try:
            graph = _Tracer(leaves + extra).trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: try the next, coarser option
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            graph = None
        escaped: set[fx.Node] = set()
        for m, saved in before:
            for k, v in list(m.__dict__.items()):
                nodes = _proxies(v)
                if not nodes:
                    continue
                escaped.update(nodes)
                if k in saved:
                    m.__dict__[k] = saved[k]
                else:
                    del m.__dict__[k]
        if graph is not None:
            return graph, None, escaped
    return None, why, set()


def user_hooks(m: nn.Module, allow: list[object] | None = None) -> bool:
    """Whether ``m`` has forward (pre-)hooks other than those in ``allow`` (e.g. weight norm's)."""
    allowed = {id(h) for h in allow or ()}
    hooks = list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())
    return any(id(h) not in allowed for h in hooks)


def only_first_arg(node: fx.Node, src: fx.Node) -> bool:
    """``node`` reads ``src`` as its first argument and no other tensor."""
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
    return bool(node.args) and node.args[0] is src and not others


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Put ``new`` at every name ``old`` is registered under in ``model``; returns those names."""
    names = []
    for pname, parent in model.named_modules(remove_duplicate=False):
        for attr, child in list(parent._modules.items()):
            if child is old:
                parent._modules[attr] = new
                names.append(f"{pname}.{attr}" if pname else attr)
    return names


# Parameter-free ops that act on each channel alone: a channel permutation commutes with them.
CHANNELWISE_MODULES: tuple[type, ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardtanh,
    nn.GELU,
    nn.ELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
)
CHANNELWISE_FUNCTIONS: set[Any] = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.silu,
    F.hardswish,
    F.gelu,
    F.elu,
    torch.sigmoid,
    torch.tanh,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.dropout,
    torch.relu_,
    F.relu_,
}
CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
ADD_FUNCTIONS: set[Any] = {operator.add, operator.iadd, torch.add}


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


@dataclass
class GraphFacts:
    """What the passes know about ``model``: its graph (None if untraceable) and the facts above."""

    model: nn.Module
    graph: fx.Graph | None
    trace_error: str | None = None
    escaped: set[fx.Node] = field(default_factory=set)  # values the forward stores in module attributes
    calls: dict[str, int] = field(default_factory=dict)  # module target -> call_module nodes
    attr_read: set[int] = field(default_factory=set)  # id(module) whose tensors a get_attr node reads
    shapes: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)
    shape_error: str | None = None
    observed_calls: dict[int, int] | None = None  # fallback: id(module) -> calls on the example input

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, example: tuple[Any, ...] | None) -> GraphFacts:
        graph, why, escaped = trace(model)
        facts = cls(model, graph, why, escaped=escaped)
        if graph is None:
            if example is not None:
                facts.observed_calls = _count_calls(model, example)
            return facts
        for node in graph.nodes:
            if node.op == "call_module":
                facts.calls[node.target] = facts.calls.get(node.target, 0) + 1
            elif node.op == "get_attr":
                owner, _, _ = str(node.target).rpartition(".")
                try:
                    mod = model.get_submodule(owner) if owner else model
                except AttributeError:
                    continue
                facts.attr_read.add(id(mod))
        if example is None:
            facts.shape_error = "no example input"
        else:
            try:
                rec = _ShapeRecorder(fx.GraphModule(model, graph))
                rec.run(*example)
                facts.shapes = rec.shapes
            except Exception as e:  # noqa: BLE001 - no shapes: the passes that need them do nothing
                facts.shape_error = f"{type(e).__name__}: {e}"
        return facts

    def module(self, node: Any) -> nn.Module | None:
        """The module a ``call_module`` node calls (as the model holds it now), else None."""
        if not isinstance(node, fx.Node) or node.op != "call_module":
            return None
        return self.model.get_submodule(node.target)

    def channels(self, node: fx.Node) -> int | None:
        """Channel count (dim 1) of a 4-d tensor node, None if unknown or not 4-d."""
        shape = self.shapes.get(node)
        return shape[1] if shape is not None and len(shape) == 4 else None

    def channelwise_inputs(self, node: fx.Node) -> list[fx.Node] | None:
        """The tensor inputs whose channel order ``node``'s output shares (None if ``node`` is not a
        channelwise op). An input broadcast along channels (``(N, 1, H, W) + (N, C, H, W)``) does not
        share it and is left out (the op is then a reader of that input, not part of its group)."""
        if node.op == "call_module":
            mod = self.module(node)
            if (
                isinstance(mod, CHANNELWISE_MODULES)
                and node.args
                and isinstance(node.args[0], fx.Node)
                and only_first_arg(node, node.args[0])
            ):
                return [node.args[0]]
            return None
        unary = (node.op == "call_function" and node.target in CHANNELWISE_FUNCTIONS) or (
            node.op == "call_method" and node.target in CHANNELWISE_METHODS
        )
        if unary:
            src = node.args[0] if node.args else None
            return [src] if isinstance(src, fx.Node) and only_first_arg(node, src) else None
        add = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
            node.op == "call_method" and node.target in ("add", "add_")
        )
        if add and len(node.args) == 2 and not node.kwargs:
            if not all(isinstance(a, fx.Node | int | float) for a in node.args):
                return None
            ins = [a for a in node.args if isinstance(a, fx.Node)]
            c = self.channels(node)
            same = [a for a in ins if c is not None and self.channels(a) == c]
            return same or None
        return None


def _count_calls(model: nn.Module, example: tuple[Any, ...]) -> dict[int, int] | None:
    """Calls per module object in one eval forward of ``example`` (None if the forward fails)."""
    counts: dict[int, int] = {}

    def hook(m: nn.Module, _args: Any) -> None:
        counts[id(m)] = counts.get(id(m), 0) + 1

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        model(*example)
    except Exception:  # noqa: BLE001 - unobserved: the fallback folds nothing
        return None
    finally:
        handle.remove()
    return counts
