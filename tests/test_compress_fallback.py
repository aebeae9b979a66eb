"""rule="search" is checked against Eq. 6's assignment on held-out calibration data (compconv.compress).

The failure this guards against (measured on the trained CIFAR ResNet-20, docs/compress.md): per-layer
sensitivities, each measured with one layer compressed in an otherwise dense network, do not add up to
the network's error once every chosen layer is compressed and errors compound, so the search's choice
could be far worse than Eq. 6's rule at the same budget.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from compconv.compress import compress

cc = sys.modules["compconv.compress"]  # the package (compconv.compress the attribute is the function)

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Module:
    torch.manual_seed(0)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    net = nn.Sequential(*block(3, 8), *block(8, 16), *block(16, 16), *block(16, 16),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():  # non-trivial BN statistics, so the fits are not all alike
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.2, 0.2)
    return net


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(4)]


def _misleading(model, method, layers, fit, held, **kw):  # noqa: ANN001, ANN003, ANN202
    """Sensitivities that call the deepest option free: what a per-layer measure that misses compounding
    errors can look like. The greedy search then takes the cheapest option everywhere it can."""
    return {lc.name: [0.0] + [1.0 / (i + 1) for i in range(1, len(lc.candidates))] for lc in layers}


def test_search_falls_back_to_eq6_when_eq6_is_closer_to_the_original(monkeypatch):
    net, calib = _net(), _calib()
    _, eq6 = compress(net, "compconv", 0.6, calib, rule="eq6")
    monkeypatch.setattr(cc, "measure_sensitivity", _misleading)
    _, alone = compress(net, "compconv", 0.6, calib, fallback=False)
    model, checked = compress(net, "compconv", 0.6, calib)
    # the misled search alone is further from the original than Eq. 6 on the held-out batches ...
    assert alone.kl is not None and eq6.kl is not None and alone.kl > eq6.kl
    # ... so the checked search returns Eq. 6's model: the same choices and the same held-out KL
    assert [r.choice for r in checked.layers] == [r.choice for r in eq6.layers]
    assert checked.kl == pytest.approx(eq6.kl, rel=1e-9)
    assert "kept eq6 (c0=" in checked.rule_detail and checked.rule == "search"
    assert checked.macs_after <= 0.6 * checked.macs_before
    from compconv.compress.calib import split_batches

    x = torch.cat(split_batches(calib, 0.25, seed=0)[1])  # the held-out images (seed 0, compress's default)
    with torch.no_grad():  # the returned model is the one the report describes
        lp, lq = torch.log_softmax(net(x).double(), 1), torch.log_softmax(model(x).double(), 1)
    assert float((lp.exp() * (lp - lq)).sum(1).mean()) == pytest.approx(checked.kl, rel=1e-6)


@pytest.mark.parametrize("budget", [0.5, 0.7])
def test_search_is_never_worse_than_eq6_on_the_held_out_objective(budget):
    net, calib = _net(), _calib()
    _, eq6 = compress(net, "compconv", budget, calib, rule="eq6")
    _, search = compress(net, "compconv", budget, calib)
    assert search.kl is not None and eq6.kl is not None
    assert search.kl <= eq6.kl * (1 + 1e-9)
    assert search.macs_after <= budget * search.macs_before


def test_inplace_search_carries_the_kept_result(monkeypatch):
    monkeypatch.setattr(cc, "measure_sensitivity", _misleading)
    net, calib = _net(), _calib()
    copy_model, rep = compress(net, "compconv", 0.6, calib)
    assert "kept eq6" in rep.rule_detail
    same, rep2 = compress(net, "compconv", 0.6, calib, inplace=True)
    assert same is net and [r.choice for r in rep2.layers] == [r.choice for r in rep.layers]
    x = calib[0]
    with torch.no_grad():
        torch.testing.assert_close(net(x), copy_model(x))
