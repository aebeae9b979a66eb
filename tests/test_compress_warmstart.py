"""Warm start by least squares (compconv.compress.warmstart, assign, permute, bn)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compconv
from compconv.compress.assign import matched_targets, plain_targets
from compconv.compress.bn import reestimate_bn
from compconv.compress.permute import apply_permutation, permutable_outputs
from compconv.compress.warmstart import fit_layer, load_dense_weight

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(teacher: nn.Module, c_in: int, hw: int = 8, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(6, c_in, hw, hw, generator=g) for _ in range(n)]
    with torch.no_grad():
        ys = [teacher(x) for x in xs]
    return xs[:-1], ys[:-1], xs[-1:], ys[-1:]


def test_depth0_and_structurally_dense_layers_copy_exactly():
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=True)
    fx, fy, hx, hy = _data(dense, 8)
    for method, opts in [("compconv", {"depth": 0}), ("ghost", {"ratio": 1}), ("hetconv", {"part": 1})]:
        mod = compconv.get_method(method).from_conv(dense, **opts)
        res = fit_layer(mod, dense, fx, fy, hx, hy)
        assert res.how == "copy"
        assert res.err_fit < 1e-12 < res.err_init
        torch.testing.assert_close(mod(hx[0]), dense(hx[0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_compconv_in_its_own_function_class_is_recovered(depth):
    # The target is itself a CompConv (random weights + bias): the sequential fit must find it exactly,
    # identity channels included (d >= 2); d = 1 is the identity-free case.
    torch.manual_seed(depth)
    teacher = compconv.CompConv2d(32, 32, 3, padding=1, depth=depth)
    with torch.no_grad():
        teacher.bias.normal_()
    fx, fy, hx, hy = _data(teacher, 32)
    student = compconv.CompConv2d(32, 32, 3, padding=1, depth=depth)
    res = fit_layer(student, nn.Conv2d(32, 32, 3, padding=1), fx, fy, hx, hy, ridge=0)
    assert res.how == "lstsq" and res.err_init > 0.5
    assert res.err_fit < 1e-10
    assert all(v < 1e-10 for v in res.parts.values())
    assert ("identity" in res.parts) == (depth >= 2)


def test_ghost_and_hetconv_in_their_function_class_are_recovered():
    torch.manual_seed(0)
    for teacher in (compconv.get_method("ghost")(16, 24, 3, padding=1, ratio=3),
                    compconv.get_method("hetconv")(16, 24, 3, padding=1, part=4)):
        with torch.no_grad():
            teacher.bias.normal_()
        fx, fy, hx, hy = _data(teacher, 16)
        student = type(teacher)(16, 24, 3, padding=1, **({"ratio": 3} if hasattr(teacher, "ratio") else {"part": 4}))
        res = fit_layer(student, nn.Conv2d(16, 24, 3, padding=1), fx, fy, hx, hy, ridge=0)
        assert res.err_fit < 1e-10, type(teacher).__name__


def test_hetconv_dense_weight_round_trip():
    het = compconv.get_method("hetconv")(8, 8, 3, padding=1, part=2)
    w = het.dense_weight().detach().clone() * 0 + torch.randn(8, 8, 3, 3)
    load_dense_weight(het, w)
    got = het.dense_weight()
    live = got != 0
    torch.testing.assert_close(got[live], w[live])
    # 8 filters x (4 channels x 9 taps + 4 centre taps) live weights
    assert int(live.sum()) == 8 * (4 * 9 + 4)


@pytest.mark.parametrize("method,opts", [("compconv", {"depth": 1}), ("compconv", {"depth": 2}),
                                         ("ghost", {"ratio": 2}), ("hetconv", {"part": 4}),
                                         ("slimconv", {"split": 2})])
def test_fit_lowers_held_out_error_vs_random_init(method, opts):
    torch.manual_seed(0)
    dense = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    fx, fy, hx, hy = _data(dense, 16)
    mod = compconv.get_method(method).from_conv(dense, **opts)
    res = fit_layer(mod, dense, fx, fy, hx, hy, adam_steps=60)
    assert res.err_fit < res.err_init
    assert res.how == ("adam" if method == "slimconv" else "lstsq")


def test_matched_assignment_is_a_permutation_and_consistent():
    torch.manual_seed(0)
    dense = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    fx, fy, hx, hy = _data(dense, 16)
    mod = compconv.CompConv2d(16, 16, 3, padding=1, bias=False, depth=2)
    tgt = matched_targets(mod, fx, fy)
    assert sorted(tgt) == list(range(16)) and sorted(plain_targets(mod)) == list(range(16))
    res = fit_layer(mod, dense, fx, fy, hx, hy, assignment="matched")
    pi = res.permutation or list(range(16))
    # the reported error is against the permuted target: recompute it
    with torch.no_grad():
        err = float((mod(hx[0]) - hy[0][:, pi]).pow(2).sum() / hy[0].pow(2).sum())
    assert err == pytest.approx(res.err_fit, rel=1e-6)
    with pytest.raises(ValueError, match="assignment must be one of"):
        fit_layer(mod, dense, fx, fy, hx, hy, assignment="best")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.b(self.relu(self.bn(self.a(x))))
        return self.c(y) + y  # b's output meets a residual add: not permutable


def test_permutation_absorbed_exactly_where_the_graph_allows():
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.normal_()
    perms, note = permutable_outputs(net)
    assert note == "" and set(perms) == {"a"}
    assert perms["a"].norms == ["bn"] and perms["a"].consumers == ["b"]
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    pi = torch.randperm(8).tolist()
    with torch.no_grad():
        net.a.weight.copy_(net.a.weight[pi])
        net.a.bias.copy_(net.a.bias[pi])
    apply_permutation(net, perms["a"], pi)
    torch.testing.assert_close(net(x), ref)


def test_bn_reestimation_is_the_cumulative_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    net[1].momentum = 0.3
    batches = [torch.randn(5, 3, 6, 6) + i for i in range(3)]
    assert reestimate_bn(net, batches) == 1
    with torch.no_grad():
        feats = [net[0](x) for x in batches]
    means = torch.stack([f.mean((0, 2, 3)) for f in feats])
    vars_ = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats])
    torch.testing.assert_close(net[1].running_mean, means.mean(0))  # equal batches: average of batch means
    torch.testing.assert_close(net[1].running_var, vars_.mean(0))
    assert not net.training and net[1].momentum == 0.3
    with pytest.raises(ValueError, match="at least one"):
        reestimate_bn(net, [])
