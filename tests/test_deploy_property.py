"""Property: on small random graphs, converted with every method, ``deploy`` computes what the model does.

The graphs mix what the rewrites must get right: residual adds (including ``a + conv(a)``, where one conv
reads and writes the same channel group), adds broadcast along channels, taps (a conv's output also
returned), a conv shared by two calls, pooling, ``flatten -> Linear`` and BN with and without affine
parameters. Each is converted with ``keep_stem=False`` (so the first conv is a compact one too) and
deployed with ``check=False``: the equality asserted here is the passes' own, not the safety net's.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import compconv
from compconv.deploy import deploy

WIDTHS = (16, 32)
OPS = ("conv", "convbn", "residual", "add", "broadcast", "shared", "pool", "relu", "tap")


class RandomNet(nn.Module):
    """A straight-line program over a list of tensors (torch.fx unrolls the loop)."""

    def __init__(self, program: list[tuple], mods: list[nn.Module], head: str) -> None:
        super().__init__()
        self.program = program
        self.mods = nn.ModuleList(mods)
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ts = [self.mods[0](x)]
        taps = []
        for op, *args in self.program:
            if op == "mod":  # mods[i](ts[j])
                ts.append(self.mods[args[0]](ts[args[1]]))
            elif op == "add":
                ts.append(ts[args[0]] + ts[args[1]])
            elif op == "residual":  # a + conv(a)
                ts.append(ts[args[1]] + self.mods[args[0]](ts[args[1]]))
            elif op == "relu":
                ts.append(torch.relu(ts[args[0]]))
            elif op == "tap":
                taps.append(ts[args[0]])
        y = ts[-1]
        if self.head == "gap":
            y = nn.functional.adaptive_avg_pool2d(y, 1)
        return (self.mods[-1](torch.flatten(y, 1)), *taps)


@st.composite
def random_nets(draw: st.DrawFn) -> RandomNet:
    c0 = draw(st.sampled_from(WIDTHS))
    mods: list[nn.Module] = [nn.Conv2d(8, c0, 3, padding=1)]
    shapes = [(c0, 8)]  # (channels, spatial size) of each tensor
    convs: list[int] = []  # indices of convs (for "shared")
    program: list[tuple] = []

    def new(mod: nn.Module) -> int:
        mods.append(mod)
        return len(mods) - 1

    for _ in range(draw(st.integers(2, 6))):
        op = draw(st.sampled_from(OPS))
        j = draw(st.integers(0, len(shapes) - 1))
        c, s = shapes[j]
        if op in ("conv", "convbn"):
            c_out, k = draw(st.sampled_from(WIDTHS)), draw(st.sampled_from([1, 3]))
            conv = new(nn.Conv2d(c, c_out, k, padding=k // 2, bias=draw(st.booleans())))
            convs.append(conv)
            program.append(("mod", conv, j))
            shapes.append((c_out, s))
            if op == "convbn":
                affine = draw(st.booleans())
                program.append(("mod", new(nn.BatchNorm2d(c_out, affine=affine)), len(shapes) - 1))
                shapes.append((c_out, s))
        elif op == "residual":
            conv = new(nn.Conv2d(c, c, 3, padding=1))
            convs.append(conv)
            program.append(("residual", conv, j))
            shapes.append((c, s))
        elif op == "add":
            same = [i for i, sh in enumerate(shapes) if sh == (c, s)]
            program.append(("add", j, draw(st.sampled_from(same))))
            shapes.append((c, s))
        elif op == "broadcast":  # t + conv_1ch(t'): (N, c, s, s) + (N, 1, s, s)
            src = [i for i, sh in enumerate(shapes) if sh[1] == s]
            one = new(nn.Conv2d(shapes[src[-1]][0], 1, 1))
            program.append(("mod", one, src[-1]))
            shapes.append((1, s))
            program.append(("add", j, len(shapes) - 1))
            shapes.append((c, s))
        elif op == "shared":  # call an existing conv again, on a tensor of its width
            fits = [m for m in convs if mods[m].in_channels == c]
            if not fits:
                continue
            m = draw(st.sampled_from(fits))
            program.append(("mod", m, j))
            shapes.append((mods[m].out_channels, s))
        elif op == "pool" and s >= 4:
            pool = nn.MaxPool2d(2) if draw(st.booleans()) else nn.AvgPool2d(2)
            program.append(("mod", new(pool), j))
            shapes.append((c, s // 2))
        elif op == "relu":
            program.append(("relu", j))
            shapes.append((c, s))
        elif op == "tap":
            program.append(("tap", j))
    head = draw(st.sampled_from(["flatten", "gap"]))
    c, s = shapes[-1]
    mods.append(nn.Linear(c * (s * s if head == "flatten" else 1), 5))
    return RandomNet(program, mods, head)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model.eval()


@pytest.mark.parametrize("method", compconv.list_methods())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=random_nets(), seed=st.integers(0, 2**16))
def test_deploy_is_exact_on_random_graphs(method: str, net: RandomNet, seed: int) -> None:
    torch.manual_seed(seed)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "converted nothing", "BN kept" ...: the outputs are what counts
        try:
            model = compconv.convert(net, method, keep_stem=False)
        except ValueError:  # nothing this method can convert in this graph: deploy the dense net
            model = net
        model = _randomize(model, seed)
        x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(seed))
        dep = deploy(model, example_input=x, check=False)  # x: the shapes the shuffle pass verifies
    with torch.no_grad():
        ref, out = model(x), dep(x)
    assert len(ref) == len(out)
    for r, o in zip(ref, out, strict=True):
        scale = max(1.0, r.abs().max().item())
        assert (o - r).abs().max().item() < 1e-4 * scale
