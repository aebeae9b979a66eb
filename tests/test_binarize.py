"""compconv.binarize (XNOR-Net): the binary forward and gradients by hand, counting, every method, save/load,
training on real CIFAR-10, and the errors."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import compconv
from compconv import BinaryConv2d, binarize, convert, profile
from compconv.binary import binary_sign
from compconv.layers.base import CompactConv2d
from compconv.models import get_model
from train_helpers import CIFAR, needs_cifar, tiny_folder_config, tiny_tree

# -- the sign and its straight-through gradient --------------------------------------------------------------


def test_sign_is_plus_minus_one_with_sign_zero_plus_one() -> None:
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([-2.0, -0.5, -0.0, 0.0, 1e-30, 0.5, 3.0], dtype=dtype)
        s = binary_sign(x)
        assert s.dtype == dtype
        assert s.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # sign(0) = sign(-0.0) = +1, never 0


def test_sign_gradient_is_the_clipped_straight_through_estimator() -> None:
    x = torch.tensor([-1.5, -1.0, -0.3, 0.0, 0.7, 1.0, 1.2], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    (binary_sign(x) * g).sum().backward()
    # passes where |x| <= 1 (both ends included), zero outside (Hubara et al.; XNOR-Net Sec. 3.1)
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=1, max_size=20))
def test_sign_and_gradient_for_any_values(values: list[float]) -> None:
    x = torch.tensor(values, requires_grad=True)
    s = binary_sign(x)
    s.sum().backward()
    assert s.tolist() == [1.0 if v >= 0 else -1.0 for v in values]
    assert x.grad.tolist() == [1.0 if abs(v) <= 1 else 0.0 for v in values]


def test_sign_of_infinities_is_plus_minus_one_not_nan() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.tensor([-math.inf, -2.0, -1.0, 0.5, 1.0, math.inf], dtype=dtype, requires_grad=True)
        s = binary_sign(x)
        assert s.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]  # inf * 0 in the STE term would give NaN
        s.sum().backward()
        assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]  # still 1_{|x| <= 1}
    nan = binary_sign(torch.tensor([math.nan]))
    assert nan.isnan().all()  # a NaN stays NaN (never silently a sign)
    # plain autograd ops: double backward and torch.func see no custom Function
    x = torch.tensor([0.3, -2.0], requires_grad=True)
    (g,) = torch.autograd.grad(binary_sign(x).sum(), x, create_graph=True)
    assert g.tolist() == [1.0, 0.0]
    assert torch.func.grad(lambda t: binary_sign(t).sum())(torch.tensor([0.3, 5.0])).tolist() == [1.0, 0.0]


# -- the binary convolution by hand ----------------------------------------------------------------------


def _hand_conv(x: list, w: list, alpha: list[float], bias: list[float], k: int) -> list:
    """Valid cross-correlation of sign(x) (C, H, W lists) with sign(w) (O, C, k, k), times alpha, plus bias."""

    def sgn(v: float) -> float:
        return 1.0 if v >= 0 else -1.0

    c_in, h, wd = len(x), len(x[0]), len(x[0][0])
    out = []
    for o in range(len(w)):
        plane = []
        for i in range(h - k + 1):
            row = []
            for j in range(wd - k + 1):
                acc = sum(
                    sgn(x[c][i + a][j + b]) * sgn(w[o][c][a][b])
                    for c in range(c_in)
                    for a in range(k)
                    for b in range(k)
                )
                row.append(alpha[o] * acc + bias[o])
            plane.append(row)
        out.append(plane)
    return out


def test_forward_equals_a_hand_computation() -> None:
    conv = nn.Conv2d(2, 2, 2, bias=True)
    w = [
        [[[0.5, -0.25], [0.0, 1.0]], [[-2.0, 0.75], [0.1, -0.1]]],  # a 0.0 weight: sign +1
        [[[-0.3, -0.3], [0.6, 0.2]], [[0.4, 0.0], [-0.8, 1.5]]],
    ]
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(w))
        conv.bias.copy_(torch.tensor([0.1, -0.2]))
    # alpha_o = mean |W_o| over C_in x k x k = 8 values (XNOR-Net Sec. 3.1)
    alpha = [(0.5 + 0.25 + 0.0 + 1.0 + 2.0 + 0.75 + 0.1 + 0.1) / 8, (0.3 + 0.3 + 0.6 + 0.2 + 0.4 + 0.0 + 0.8 + 1.5) / 8]
    x = [
        [[1.0, -2.0, 0.0], [0.5, -0.5, 3.0], [-1.0, 0.0, 2.0]],  # zeros in the input: sign +1
        [[-0.1, 0.2, -0.3], [0.0, 1.0, -1.0], [2.0, -2.0, 0.5]],
    ]
    b = BinaryConv2d(conv, input_bn=False)
    y = b(torch.tensor([x]))
    expected = _hand_conv(x, w, alpha, [0.1, -0.2], 2)
    assert torch.allclose(y[0], torch.tensor(expected), atol=1e-6, rtol=0)
    assert torch.allclose(b.alpha(), torch.tensor(alpha))
    assert b.binary_weight().abs().eq(1).all()
    # with the input BN (train mode: batch statistics), the same by hand on the normalised input
    bn_b = BinaryConv2d(conv, input_bn=True).train()
    xt = torch.tensor([x, [[[v * 2 - 0.25 for v in r] for r in ch] for ch in x]])  # no value at a channel mean
    mean = xt.mean(dim=(0, 2, 3), keepdim=True)
    var = xt.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    x_hat = ((xt - mean) / torch.sqrt(var + bn_b.bn.eps)).tolist()
    y2 = bn_b(xt)
    for n in range(2):
        assert torch.allclose(y2[n], torch.tensor(_hand_conv(x_hat[n], w, alpha, [0.1, -0.2], 2)), atol=1e-5)


def test_gradients_equal_hand_values() -> None:
    # 1x1 conv, so each output is alpha_o * sum_c B_oc s_c at one pixel; loss = sum(G * y)
    conv = nn.Conv2d(3, 2, 1, bias=False)
    w = torch.tensor([[0.5, -0.2, 1.5], [-0.4, 0.3, -0.1]])
    with torch.no_grad():
        conv.weight.copy_(w.view(2, 3, 1, 1))
    x = torch.tensor([[[[0.2, -1.5]], [[-0.7, 0.9]], [[1.0, -0.3]]]], requires_grad=True)  # (1, 3, 1, 2)
    g = torch.tensor([[[[1.0, -2.0]], [[0.5, 3.0]]]])  # (1, 2, 1, 2)
    b = BinaryConv2d(conv, input_bn=False)
    (b(x) * g).sum().backward()
    B, s = torch.where(w >= 0, 1.0, -1.0), torch.where(x.detach()[0, :, 0] >= 0, 1.0, -1.0)  # (2, 3), (3, 2)
    alpha = w.abs().mean(1)  # (2,)
    G = g[0, :, 0]  # (2, 2): output channel x pixel
    # input: dL/dx_cp = sum_o G_op alpha_o B_oc, passed where |x| <= 1
    dx = torch.einsum("op,o,oc->cp", G, alpha, B) * (x.detach()[0, :, 0].abs() <= 1)
    assert torch.allclose(x.grad[0, :, 0], dx)
    # weights: S_oc = sum_p G_op s_cp; dL/dW_oc = alpha_o S_oc 1_{|W|<=1} + sign(W_oc)/n sum_j B_oj S_oj (n = 3)
    S = G @ s.T
    dw = alpha.view(2, 1) * S * (w.abs() <= 1) + torch.sign(w) / 3 * (B * S).sum(1, keepdim=True)
    assert torch.allclose(conv.weight.grad.view(2, 3), dw)
    # the scale's own gradient, dL/dalpha_o = sum_c B_oc S_oc, is inside the second term: check it apart
    a = alpha.clone().requires_grad_(True)
    y = torch.einsum("o,oc,cp->op", a, B, s)
    (y * G).sum().backward()
    assert torch.allclose(a.grad, (B * S).sum(1))


def test_binary_sums_are_exact_under_bf16_autocast() -> None:
    conv = nn.Conv2d(2302, 1, 1, bias=False)
    nn.init.constant_(conv.weight, 0.5)  # alpha = 0.5, sign(W) = +1
    b = BinaryConv2d(conv, input_bn=False)
    x = torch.rand(1, 2302, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = b(x)
    assert y.dtype == torch.float32 and y.item() == 0.5 * 2302  # bf16 would round the sum 2302 to 2304
    torch.manual_seed(0)
    big = BinaryConv2d(nn.Conv2d(256, 32, 3, padding=1), input_scale=True).eval()
    xb = torch.randn(2, 256, 8, 8)
    ref = big(xb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(big(xb), ref)
        big(xb.requires_grad_()).sum().backward()
    assert xb.grad is not None and big.conv.weight.grad is not None
    half = BinaryConv2d(nn.Conv2d(8, 4, 3), input_bn=False).to(torch.bfloat16)
    assert half(torch.randn(1, 8, 5, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16  # a bf16 model stays bf16


def test_input_scale_is_xnor_nets_k() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    b = BinaryConv2d(conv, input_bn=False, input_scale=True)
    x = torch.full((1, 2, 4, 4), -0.5)
    x[:, 1] = 0.5  # |x| = 0.5 everywhere, so A = 0.5 and K = 0.5 x (share of the 3x3 window inside the image)
    k = b._input_scale(x)
    assert k.shape == (1, 3, 4, 4)
    assert torch.allclose(k[0, 0, 1, 1], torch.tensor(0.5))  # interior: 9 of 9 taps
    assert torch.allclose(k[0, 0, 0, 0], torch.tensor(0.5 * 4 / 9))  # corner: 4 of 9 taps (zero padding)
    plain = BinaryConv2d(conv, input_bn=False)
    assert torch.allclose(b(x), plain(x) * k)
    # its box filter is real: N H_out W_out g k_h k_w = 1 * 4 * 4 * 1 * 9 MACs
    assert profile(nn.Sequential(b), (1, 2, 4, 4)).total_macs == 144


# -- counting ----------------------------------------------------------------------------------------------


def test_bops_of_a_binarized_conv_equal_the_hand_count() -> None:
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
    model = nn.Sequential(BinaryConv2d(conv))
    p = profile(model, (2, 8, 9, 9))
    # N H_out W_out C_out C_in/g k k = 2 * 5 * 5 * 16 * 4 * 9
    assert p.total_bops == 2 * 5 * 5 * 16 * 4 * 9 == 28_800
    assert p.total_macs == 0  # the binary MACs are not real MACs
    assert p.binary_params == 16 * 4 * 9 and p.real_params == 16 + 2 * 8  # bias + the input BN
    assert p.scales == 16
    assert p.storage_bits == 576 + 32 * (32 + 16)
    assert p.combined_macs() == 28_800 / 64 and p.combined_macs(32) == 28_800 / 32
    assert p.uncounted_macs == 0  # what the binary conv executes is attributed to it
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(torch.zeros(2, 8, 9, 9))
    assert fc.get_total_flops() // 2 == p.total_bops  # the simulated conv executes exactly that many MACs


@settings(max_examples=15, deadline=None)
@given(
    c=st.sampled_from([2, 4, 6]),
    k=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    hw=st.integers(3, 9),
    n=st.integers(1, 2),
)
def test_bops_hand_count_any_geometry(c: int, k: int, stride: int, groups: int, hw: int, n: int) -> None:
    conv = nn.Conv2d(c, 2 * c, k, stride=stride, padding=k // 2, groups=groups)
    p = profile(nn.Sequential(BinaryConv2d(conv)), (n, c, hw, hw))
    h_out = (hw + 2 * (k // 2) - k) // stride + 1
    assert p.total_bops == n * h_out * h_out * 2 * c * (c // groups) * k * k
    assert p.total_macs == 0


def test_profile_of_a_model_without_binary_layers_is_unchanged() -> None:
    model = get_model("cifar_resnet20")
    p = profile(model, (1, 3, 32, 32))
    assert not p.has_binary and p.total_bops == 0 and p.binary_params == 0
    assert p.combined_macs() == p.total_macs
    d = p.to_dict()
    assert set(d) == {"input_size", "units", "total_params", "total_macs", "uncounted_macs", "rows"}
    assert set(d["rows"][0]) == {"name", "type", "params", "macs", "output_shape"}
    assert "BOPs" not in p.table() and "binary" not in p.table() and "bops" not in repr(p)
    assert set(p.by_module(1)[""]) == {"params", "macs"}


def test_table_min_macs_shows_binary_convs_by_their_bops() -> None:
    fp = profile(get_model("cifar_resnet20"), (1, 3, 32, 32))
    p = profile(binarize(get_model("cifar_resnet20")), (1, 3, 32, 32))
    rows = [ln.split()[0] for ln in p.table(min_macs=100_000).splitlines()]
    # the 18 binary 3x3 convs (0 real MACs, >= 1.1M BOPs each) are shown, with the real stem
    assert "layer1.0.conv1" in rows and "layer3.2.conv2" in rows and "conv1" in rows
    assert "layer1.0.conv1.bn" not in rows  # the input BN: params, but neither MACs nor BOPs
    assert not any(r.startswith("fc") for r in rows)  # 640 MACs < 100,000
    # a full-precision table is unchanged: rows hidden or shown by their MACs alone
    full = fp.table(min_macs=500_000)
    shown = [ln.split()[0] for ln in full.splitlines()]
    assert "layer1.0.conv1" in shown and "fc" not in shown and "bn1" not in shown


def test_profile_of_a_binarized_model_reports_bops_apart() -> None:
    model = binarize(get_model("cifar_resnet20"))
    p = profile(model, (1, 3, 32, 32))
    # real MACs: the stem and the classifier; every other MAC of the full-precision model is now a BOP
    fp = profile(get_model("cifar_resnet20"), (1, 3, 32, 32))
    fp_rows = {r.name: r for r in fp.rows}
    assert p.total_macs == fp_rows["conv1"].macs + fp_rows["fc"].macs == 442_368 + 640
    assert p.total_bops == fp.total_macs - p.total_macs
    assert p.binary_params == sum(m.conv.weight.numel() for m in model.modules() if isinstance(m, BinaryConv2d))
    d = p.to_dict()
    assert d["total_bops"] == p.total_bops and d["combined_macs_bops64"] == p.total_bops / 64 + p.total_macs
    assert "BOPs" in p.table() and "Bi-Real Net" in p.table()
    assert math.isclose(p.storage_mb, (p.binary_params + 32 * (p.real_params + p.scales)) / 8e6)


# -- which layers, on every method ------------------------------------------------------------------------


def test_stem_and_classifier_stay_real() -> None:
    model, rep = binarize(get_model("cifar_vgg16"), return_report=True)
    rows = {r.name: r for r in rep.layers}
    assert rows["features.0"].action == "kept" and rows["features.0"].reason.startswith("stem")
    assert rows["classifier"].action == "kept" and "nn.Linear" in rows["classifier"].reason
    assert type(model.features[0]) is nn.Conv2d and type(model.classifier) is nn.Linear
    assert len(rep.binarized) == 12 and isinstance(model.features[3], BinaryConv2d)
    # a conv classifier (the last layer registered) is kept too; keep_stem=False binarizes the stem
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1))
    _, rep = binarize(net, return_report=True)
    assert [r.action for r in rep.layers] == ["kept", "binarized", "kept"]
    assert rep.layers[2].reason.startswith("classifier")
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(10))
    _, rep = binarize(net, keep_stem=False, return_report=True)
    assert [r.action for r in rep.layers] == ["binarized", "binarized", "kept"]


class _HeadFirst(nn.Module):
    """A model that registers its Linear head before its convs: registration order is not forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 10)
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c3(self.c2(self.c1(x))).mean((2, 3)))


def test_a_conv_kept_as_classifier_beside_a_linear_head_says_how_to_binarize_it() -> None:
    _, rep = binarize(_HeadFirst(), return_report=True)
    rows = {r.name: r for r in rep.layers}
    assert rows["c3"].action == "kept"
    assert rows["c3"].reason.endswith("(registration order; the model also has nn.Linear 'fc': if that is its "
                                      "classifier, pass keep_classifier=False)")
    _, rep = binarize(_HeadFirst(), keep_classifier=False, return_report=True)  # the last registered is a conv
    assert [(r.name, r.action) for r in rep.layers] == [("fc", "kept"), ("c1", "kept"), ("c2", "binarized"),
                                                        ("c3", "binarized")]
    _, rep = binarize(get_model("cifar_vgg16"), return_report=True)  # a model without the ambiguity: no note
    assert not any("registration order" in r.reason for r in rep.layers)


def _compact_host(method: str) -> tuple[nn.Module, tuple[int, ...]]:
    if method == "xsepconv":  # only depthwise convs: a host that has them
        return convert(get_model("cifar_mobilenet_v3_small"), method), (2, 3, 32, 32)
    return convert(get_model("cifar_resnet20"), method), (2, 3, 32, 32)


@pytest.mark.parametrize("method", compconv.list_methods())
def test_every_methods_inner_convs_are_binarized(method: str) -> None:
    torch.manual_seed(0)
    model, size = _compact_host(method)
    compact = [(n, m) for n, m in model.named_modules() if isinstance(m, CompactConv2d)]
    assert compact, method
    stem = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | CompactConv2d))
    model, rep = binarize(model, return_report=True)
    wrapped = {id(m.conv) for m in model.modules() if isinstance(m, BinaryConv2d)}
    se = {r.name for r in rep.kept if r.reason.startswith("squeeze-excitation gate")}
    assert se or method != "slimconv", se  # SlimConv's gate (and a MobileNet host's SE): fully connected on 1x1
    for name, c in compact:
        inner = [
            (n, m) for n, m in c.named_modules(prefix=name) if type(m) is not BinaryConv2d and isinstance(m, nn.Conv2d)
        ]
        assert inner, (method, name)
        for n, m in inner:  # every inner conv of every compact conv (but a compact stem) is a binary conv's
            assert (id(m) in wrapped) != (name == stem or n in se), (method, n)
    assert any(r.unit != r.name for r in rep.binarized)  # rows name the compact conv each inner conv belongs to
    model.train()
    x = torch.randn(size)
    model(x).square().mean().backward()
    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            assert m.conv.weight.grad is not None and torch.isfinite(m.conv.weight.grad).all()
    assert profile(model, (1, *size[1:])).total_bops > 0


def test_se_gates_stay_real_so_batch_1_trains() -> None:
    import torchvision

    torch.manual_seed(0)
    model, rep = binarize(torchvision.models.mobilenet_v3_small(num_classes=10), return_report=True)
    se = [r for r in rep.kept if r.reason.startswith("squeeze-excitation gate")]
    assert len(se) == 18 and all(r.name.rsplit(".", 1)[-1] in ("fc1", "fc2") for r in se)  # 9 SE blocks x (fc1, fc2)
    assert "fully connected layer" in se[0].reason and rep.options["keep_se"] is True
    assert isinstance(model.features[1].block[0][0], BinaryConv2d)  # the depthwise conv beside the gate is binary
    model.train()
    model(torch.randn(1, 3, 64, 64)).sum().backward()  # batch 1 in training: no BN on a 1x1 map
    # keep_se=False binarizes the gates too: their input BN sees one value per channel at batch 1
    bin_all = binarize(torchvision.models.mobilenet_v3_small(num_classes=10), keep_se=False).train()
    assert isinstance(bin_all.features[1].block[1].fc1, BinaryConv2d)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bin_all(torch.randn(1, 3, 64, 64))
    # a hand-written Sequential(pool, conv, ..., sigmoid) gate is found structurally
    gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 16, 1), nn.Sigmoid())
    host = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), gate, nn.Conv2d(16, 16, 3), nn.Conv2d(16, 2, 1))
    _, rep2 = binarize(host, return_report=True)
    assert [r.name for r in rep2.binarized] == ["1", "3"]
    assert {r.name for r in rep2.kept if r.reason.startswith("squeeze")} == {"2.1", "2.3"}


def test_bin_comp_and_bin_ghost_are_binarize_of_convert() -> None:
    for method in ("compconv", "ghost"):
        model = binarize(
            convert(get_model("cifar_vgg16"), method, c0=128)
            if method == "compconv"
            else convert(get_model("cifar_vgg16"), method)
        )
        kinds = {type(m.conv).__name__ for m in model.modules() if isinstance(m, BinaryConv2d)}
        assert "Conv2d" in kinds and ("PadAnyConv2d" in kinds or "DepthwiseConv2d" in kinds), (method, kinds)


def test_hetconv_self_counting_impls_are_kept_with_the_reason() -> None:
    model = convert(get_model("cifar_resnet20"), "hetconv", part=2, impl="masked", exclude="layer3.*")
    _, rep = binarize(model, return_report=True)
    het = [r for r in rep.layers if r.type == "HetConv2d"]
    assert het and all(r.action == "kept" and "impl='exact'" in r.reason for r in het)
    assert {r.action for r in rep.layers if r.name.startswith("layer3")} == {"binarized"}
    with pytest.raises(ValueError, match="nothing to binarize in CifarResNet: 20 layer.*impl='exact'"):
        binarize(convert(get_model("cifar_resnet20"), "hetconv", part=2, impl="masked"))


def test_binary_input_is_centred_not_constant_after_a_relu() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 2),
    )
    x = torch.randn(16, 3, 6, 6)
    h = net[:3](x)  # what the binary conv receives: a ReLU output, >= 0 everywhere
    assert (h >= 0).all() and binary_sign(h).eq(1).all()  # the degenerate case: sign(ReLU(.)) is constant +1
    model = binarize(net)
    seen = {}
    model[3].bn.register_forward_hook(lambda m, i, o: seen.setdefault("x_hat", o.detach()))
    model.train()(x)
    s = binary_sign(seen["x_hat"])
    plus = (s > 0).float().mean(dim=(0, 2, 3))  # share of +1 per channel
    assert ((plus > 0.05) & (plus < 0.95)).all(), plus  # every channel gets both signs: the BN centres it
    bare = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    assert binarize(bare, input_bn=False)[2].bn is None  # input_bn=False: the user's choice, no BN added


def test_keep_selectors() -> None:
    _, rep = binarize(get_model("cifar_resnet20"), keep="layer3.*", return_report=True)
    assert all(r.action == "kept" for r in rep.layers if r.name.startswith("layer3"))
    assert all(r.action == "binarized" for r in rep.layers if r.name.startswith("layer2"))
    model = convert(get_model("cifar_resnet20"), "ghost")
    _, rep = binarize(model, keep=lambda n, m: m.groups > 1, return_report=True)  # the cheap depthwise ops
    assert {r.action for r in rep.layers if r.name.endswith(".cheap")} == {"kept"}
    assert {r.action for r in rep.layers if r.name.endswith(".primary") and r.unit != "conv1"} == {"binarized"}
    model = get_model("cifar_resnet20")
    _, rep = binarize(model, keep=model.layer1, return_report=True)
    assert {r.action for r in rep.layers if r.name.startswith("layer1")} == {"kept"}


def test_a_shared_conv_is_one_binary_conv_at_every_name(tmp_path: Path) -> None:
    shared = nn.Conv2d(8, 8, 3, padding=1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), shared, nn.ReLU(), shared, nn.Flatten(), nn.Linear(8 * 16, 2))
    net, rep = binarize(net, return_report=True)
    assert isinstance(net[1], BinaryConv2d) and net[1] is net[3]
    assert [(r.name, r.aliases, r.action) for r in rep.layers if r.type == "Conv2d"][1] == ("1", ["3"], "binarized")
    path = compconv.save(net, tmp_path / "shared.pt")
    again = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        shared2 := nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        shared2,
        nn.Flatten(),
        nn.Linear(8 * 16, 2),
    )
    back = compconv.load(path, model=again)
    assert back[1] is back[3] and isinstance(back[1], BinaryConv2d)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(back(x), net.eval()(x))


# -- errors ------------------------------------------------------------------------------------------------


def test_errors_name_the_problem() -> None:
    model = binarize(get_model("cifar_resnet20"))
    with pytest.raises(ValueError, match="already binarized .*'layer1.0.conv1'.*binarize once"):
        binarize(model)
    with pytest.raises(ValueError, match="convert first, then binarize"):
        convert(model, "compconv")
    with pytest.raises(ValueError, match=r"deploy does not rewrite binarized models: binary layers \['layer1.0.conv1'"):
        compconv.deploy(model)
    with pytest.raises(ValueError, match="nothing to binarize in Sequential: 2 layer.*stem"):
        binarize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="nothing to binarize in Linear: it has no conv layer"):
        binarize(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="unknown argument 'keep_first'.*did you mean 'keep_stem'"):
        binarize(get_model("cifar_resnet20"), keep_first=True)
    with pytest.raises(ValueError, match="input_bn must be True or False, but got 'yes'"):
        binarize(get_model("cifar_resnet20"), input_bn="yes")
    with pytest.raises(ValueError, match=r"keep selector\(s\) matched no layer: \['layr3.\*'\]"):
        binarize(get_model("cifar_resnet20"), keep="layr3.*")
    with pytest.raises(ValueError, match=r"'layer3' names a container, not a conv: use 'layer3\.\*'"):
        binarize(get_model("cifar_resnet20"), keep="layer3")
    with pytest.raises(ValueError, match="'fc' names an nn.Linear: Linear layers are always kept"):
        binarize(get_model("cifar_resnet20"), keep="fc")
    _, r18 = binarize(get_model("cifar_resnet18"), keep="*.downsample.*", return_report=True)  # Bi-Real Net
    kept = {r.name for r in r18.kept if r.reason == "kept (keep=...)"}
    assert kept == {f"layer{i}.0.downsample.0" for i in (2, 3, 4)}
    with pytest.raises(ValueError, match=r"keep=\[\] selects nothing"):
        binarize(get_model("cifar_resnet20"), keep=[])
    with pytest.raises(TypeError, match="keep must be"):
        binarize(get_model("cifar_resnet20"), keep=3)
    with pytest.raises(ValueError, match="model is itself a Conv2d"):
        binarize(nn.Conv2d(3, 3, 3))
    with pytest.raises(TypeError, match="BinaryConv2d wraps an nn.Conv2d"):
        BinaryConv2d(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="input_scale must be True or False, but got 'no'"):
        BinaryConv2d(nn.Conv2d(2, 2, 1), input_scale="no")  # a truthy string used to switch K on
    with pytest.raises(ValueError, match="input_bn must be True or False, but got 0"):
        BinaryConv2d(nn.Conv2d(2, 2, 1), input_bn=0)
    with pytest.raises(ValueError, match=r"keep_classifier=False changes nothing here: the last layer registered, "
                                         r"'fc', is an nn.Linear"):
        binarize(get_model("cifar_resnet20"), keep_classifier=False)
    with pytest.raises(ValueError, match=r"matched no layer: \[<class 'torch.nn.modules.linear.Linear'>\].*Linear "
                                         r"selects nn.Linear layers: Linear layers are always kept"):
        binarize(get_model("cifar_resnet20"), keep=nn.Linear)
    with pytest.raises(ValueError, match=r"matched no layer: \['<Sequential>'\] .* the Sequential given is not a "
                                         r"submodule of this model \(of another instance\?\)") as e:
        binarize(get_model("cifar_resnet20"), keep=get_model("cifar_resnet20").layer3)
    assert "BasicBlock(" not in str(e.value)  # the module's repr is not dumped
    with pytest.raises(ValueError, match="bops_per_mac must be a positive int"):
        profile(model, (1, 3, 32, 32)).combined_macs(0)


# -- save / load, training, resume, eval ------------------------------------------------------------------


def test_save_load_round_trip_reproduces_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, rep = convert(get_model("cifar_resnet20"), "compconv", c0=128, return_report=True)
    model = binarize(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):  # change weights and BN statistics away from their initial values
        opt.zero_grad()
        model(torch.randn(8, 3, 32, 32)).square().mean().backward()
        opt.step()
    path = compconv.save(model, tmp_path / "bin_comp.pt", base="cifar_resnet20", conversion=rep)
    assert torch.load(path, weights_only=True)["version"] == 2
    back = compconv.load(path)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(back(x), model.eval()(x))
    assert len([m for m in back.modules() if isinstance(m, BinaryConv2d)]) == 36
    # a training run's --init rebuilds it binarized from the file's record
    from compconv.train.sources import arch_of_save, build_from_arch

    arch = arch_of_save(path)
    assert arch["binary"]["layer1.0.conv1.convs.0"] == {"input_bn": True, "input_scale": False}
    rebuilt = build_from_arch(arch)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    b = back.layer1[0].conv1.convs[0].eval()
    xb = torch.randn(16, 8, 8)
    assert torch.equal(b(xb), b(xb.unsqueeze(0))[0])  # unbatched input, as nn.Conv2d takes it
    # XNOR-Net's K has no tensor: a model= binarized without it would take the weights and compute otherwise
    ks = binarize(get_model("cifar_resnet20"), input_scale=True)
    ks_path = compconv.save(ks, tmp_path / "ks.pt", base="cifar_resnet20")
    with pytest.raises(ValueError, match=r"binarized layer 'layer1.0.conv1' is already a BinaryConv2d with "
                                         r"\{'input_bn': True, 'input_scale': False\} in this model, but the record "
                                         r"says \{'input_bn': True, 'input_scale': True\}"):
        compconv.load(ks_path, model=binarize(get_model("cifar_resnet20")))
    assert torch.equal(compconv.load(ks_path)(x), ks.eval()(x))  # as recorded, K included
    # a full-precision save stays format version 1 (older compconv versions read it)
    fp = compconv.save(get_model("cifar_resnet20"), tmp_path / "fp.pt", base="cifar_resnet20")
    assert torch.load(fp, weights_only=True)["version"] == 1


@needs_cifar
@pytest.mark.slow
def test_train_binarize_on_real_cifar_learns_above_chance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compconv.cli import main

    # 2,500 real CIFAR-10 images, one epoch (50 steps), AdamW: a binary ResNet-20 reaches ~27% on 500 test
    # images (chance: 10%, binomial sd 1.3 points); about 30 s on one core
    args = [
        "train",
        "--model",
        "cifar_resnet20",
        "--binarize",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(CIFAR),
        "--train-subset",
        "2500",
        "--eval-subset",
        "500",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--lr",
        "0.005",
        "--wd",
        "0",
        "--set",
        "optimizer=adamw",
        "--threads",
        "1",
        "--out-dir",
        str(tmp_path),
        "--name",
        "bin",
        "--no-progress",
        "--set",
        "tensorboard=false",
        "--set",
        "plots=false",
    ]
    capsys.readouterr()
    assert main(args) == 0
    run = tmp_path / "bin"
    res = json.loads((run / "results.json").read_text())
    assert res["binarize"] is True and res["bops"] > 30_000_000 and res["macs"] == 442_368 + 640
    assert res["top1"] > 18.0, res["top1"]
    assert yaml.safe_load((run / "config.yaml").read_text())["binarize"] is True
    # the summary line gives the BOPs beside the real MACs (443,008 MACs alone would read as a 90x cheaper model)
    assert f"MACs 443,008 real + {res['bops']:,} BOPs (binarized)" in capsys.readouterr().out.splitlines()[-1]
    assert main(["eval", str(run), "--check", "--no-progress"]) == 0  # the checkpoint rebuilds binarized
    assert "(epoch 1, binarized, split test)" in capsys.readouterr().out


def test_binarized_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    from compconv.train.engine import train

    data = tiny_tree(tmp_path / "data")
    full = train(tiny_folder_config(data, tmp_path / "a", binarize=True, epochs=2))
    first = train(tiny_folder_config(data, tmp_path / "b", binarize=True, epochs=2, stop_after=1))
    assert first["epochs_done"] == 1
    resumed = train(resume=str(tmp_path / "b" / "run"))
    assert resumed["epochs_done"] == 2 and resumed["binarize"] is True and resumed["bops"] > 0
    assert resumed["test_loss"] == full["test_loss"] and resumed["top1"] == full["top1"]
    state = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert "layer1.0.conv1.conv.weight" in state["model"] and "layer1.0.conv1.bn.running_mean" in state["model"]
    assert state["config"]["binarize"] is True


def test_init_from_a_binarized_file_is_a_binarized_run(tmp_path: Path) -> None:
    from compconv.train.engine import train

    data = tiny_tree(tmp_path / "data")
    torch.manual_seed(0)
    src = binarize(get_model("cifar_resnet20", num_classes=2))
    init = compconv.save(src, tmp_path / "binr20.pt", base="cifar_resnet20", base_kwargs={"num_classes": 2})
    for flag in (False, True):  # without --binarize the run is labelled binarized; with it, not binarized twice
        out = tmp_path / f"run{flag}"
        cfg = tiny_folder_config(data, out, init=str(init), binarize=flag, epochs=1, name=None)
        res = train(cfg)
        (run,) = [d for d in out.iterdir() if d.name != "cache"]
        assert run.name == "binr20-init-bin-folder-s0"
        assert res["binarize"] is True and res["bops"] > 0
        assert json.loads((run / "results.json").read_text())["binarize"] is True
        assert yaml.safe_load((run / "config.yaml").read_text())["binarize"] is True
        state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
        assert "layer1.0.conv1.conv.weight" in state["model"]
        assert "layer1.0.conv1.conv.conv.weight" not in state["model"]  # binarized once


def test_binarize_from_full_precision_weights(tmp_path: Path) -> None:
    """The two-step recipe (Bi-Real Net, ReActNet): train full precision, then --binarize --weights FP_FILE."""
    from compconv.train.config import TrainConfig
    from compconv.train.modelbuild import build_model

    torch.manual_seed(1)
    fp = get_model("cifar_resnet20")
    torch.save(fp.state_dict(), tmp_path / "fp.pt")
    model = build_model(TrainConfig(binarize=True, weights=str(tmp_path / "fp.pt")), 10)
    assert isinstance(model.layer1[0].conv1, BinaryConv2d)
    assert torch.equal(model.layer1[0].conv1.conv.weight, fp.layer1[0].conv1.weight)  # loaded, then binarized
    assert torch.equal(model.fc.weight, fp.fc.weight)
    # a binarized weights file is loaded after binarizing
    torch.save(model.state_dict(), tmp_path / "bin.pt")
    again = build_model(TrainConfig(binarize=True, weights=str(tmp_path / "bin.pt"), seed=5), 10)
    assert torch.equal(again.layer1[0].conv1.conv.weight, fp.layer1[0].conv1.weight)
    with pytest.raises(ValueError, match="do not fit the model.*With --binarize, --weights must hold either the "
                       "full-precision model .* or the binarized one"):
        build_model(TrainConfig(model="cifar_resnet32", binarize=True, weights=str(tmp_path / "fp.pt")), 10)
    # binarized weights without --binarize: the key mismatch says what the file is and what to add
    with pytest.raises(ValueError, match=r"do not fit the model.*The weights file is a binarized model file "
                                         r"\(compconv.binarize\): add --binarize to train it binarized"):
        build_model(TrainConfig(weights=str(compconv.save(model, tmp_path / "b.pt", base="cifar_resnet20"))), 10)
    # a file binarized with other options (K has no tensor: its weights load, then would run without K)
    ks = compconv.save(binarize(get_model("cifar_resnet20"), input_scale=True), tmp_path / "ks.pt",
                       base="cifar_resnet20")
    with pytest.raises(ValueError, match=r"weights file '.*ks.pt' was binarized otherwise than --binarize "
                                         r"binarizes .*: layer 'layer1.0.conv1' has \{'input_bn': True, 'input_scale': "
                                         r"True\} in the file, \{'input_bn': True, 'input_scale': False\} in the "
                                         r"model. Start from the file's own architecture with --init .*ks.pt"):
        build_model(TrainConfig(binarize=True, weights=str(ks)), 10)


def test_compress_refuses_a_binarized_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compconv.cli import main
    from compconv.compress import compress
    from compconv.train.engine import train

    model = binarize(get_model("cifar_resnet20"))
    calib = [torch.randn(8, 3, 32, 32)]
    with pytest.raises(ValueError, match="model is binarized .*compress the full-precision model first, then binarize"):
        compress(model, "compconv", 0.5, calib)
    data = tiny_tree(tmp_path / "data")
    train(tiny_folder_config(data, tmp_path / "r", binarize=True, epochs=1))
    ckpt = tmp_path / "r" / "run" / "checkpoints" / "last.pt"
    saved = compconv.save(model, tmp_path / "b.pt", base="cifar_resnet20")
    for weights, why in ((ckpt, "is the checkpoint of a binarized run"), (saved, "is a binarized model file")):
        capsys.readouterr()
        assert main(["compress", "--model", "cifar_resnet20", "--weights", str(weights), "--method", "compconv",
                     "--budget", "0.5", "--out", str(tmp_path / "c.pt")]) == 2
        err = capsys.readouterr().err
        assert why in err and "compress the full-precision model first, then binarize" in err, err
        assert "missing keys" not in err


def test_binarize_refuses_a_deployed_model() -> None:
    model = get_model("cifar_resnet20").eval()
    deployed = compconv.deploy(model)
    with pytest.raises(ValueError, match="by compconv.deploy and is eval-only.*binarize the model before deploy"):
        binarize(deployed)
    with pytest.raises(ValueError, match="its submodule 'inner'.*binarize the model before deploy"):
        binarize(nn.Sequential(OrderedDict(inner=deployed)))
    binarize(model)  # the model passed to deploy is untouched and binarizes


def test_config_key_and_flag() -> None:
    from compconv.cli import main
    from compconv.train.config import resolve_config
    from compconv.train.engine import default_run_name

    cfg = resolve_config(overrides={"binarize": "true", "method": "compconv"})
    assert cfg.binarize is True and default_run_name(cfg) == "cifar_resnet20-compconv-bin-cifar10-s0"
    with pytest.raises(ValueError, match="config key 'binarize' expects bool"):
        resolve_config(overrides={"binarize": "maybe"})
    assert main(["train", "--model", "cifar_resnet20", "--set", "binarize=maybe"]) == 2


def test_print_config_shows_binarize(capsys: pytest.CaptureFixture[str]) -> None:
    from compconv.cli import main

    assert main(["train", "--model", "cifar_resnet20", "--binarize", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["binarize"] is True


# -- the paper's Table 6 -----------------------------------------------------------------------------------


def test_table6_is_built_from_our_modules() -> None:
    from compconv.paper.compconv_tables import _table6

    rows = _table6()
    assert [r.row for r in rows] == ["Bin-VGG16", "Bin-Ghost-VGG16 (s=2)", "Bin-Comp-VGG16 (C0=128)"]
    assert all(r.table == "6" and r.status == "gap" and "not built" not in r.note for r in rows)
    assert all("closest reading:" in r.note and "closest over the three rows:" in r.note for r in rows)
    # Bin-VGG16, stem + classifier real: BOPs = 313,201,664 - 1,769,472 (stem) - 5,120 (fc) = 311,427,072;
    # FLOPs = 311,427,072 / 64 + 1,774,592 (stem + fc) = 6,640,640; params = binary / 32 + real
    vgg = rows[0]
    assert vgg.ours_macs == pytest.approx(6.640640)
    p = profile(binarize(get_model("cifar_vgg16")), (1, 3, 32, 32))
    assert p.total_bops == 311_427_072 and p.total_macs == 1_774_592
    assert vgg.ours_params == pytest.approx((p.binary_params / 32 + p.real_params) / 1e6)
    assert (vgg.paper_params, vgg.paper_macs) == (1.3, 22.4)
