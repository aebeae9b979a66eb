"""HetConv2d: equivalence to the dense masked kernel, counts, errors, conversion, and the paper's tables."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compconv.convert import convert
from compconv.layers import HetConv2d, get_method
from compconv.layers.hetconv import hetconv_kernel_mask
from compconv.profile import profile

IMPLS = ("exact", "masked", "dense")


def reference_kernel(m: HetConv2d) -> torch.Tensor:
    """The dense ``(N, M, kh, kw)`` kernel built from the module's weights by the spec's rules (section 1.4).

    Independent of ``HetConv2d.dense_weight``: it uses the spec's ``perm_out`` list and gather sets verbatim.
    """
    M, N, P = m.in_channels, m.out_channels, m.part
    kh, kw = m.kernel_size
    ch, cw = kh // 2, kw // 2
    W = torch.zeros(N, M, kh, kw, dtype=torch.float64)
    if m.impl == "dense":
        w = m.weight.detach().double()
        for n in range(N):
            for c in range(M):
                if (c - n) % P == 0:
                    W[n, c] = w[n, c]
                else:
                    W[n, c, ch, cw] = w[n, c, ch, cw]
        return W
    perm_out = [r + P * j for r in range(P) for j in range(N // P)]
    wk = m.conv_k.weight.detach().double()
    for o, n in enumerate(perm_out):
        r = o // (N // P)
        for j, c in enumerate(r + P * q for q in range(M // P)):
            W[n, c] = wk[o, j]
    if P > 1 and m.impl == "exact":
        w1 = m.conv_1.weight.detach().double()[:, :, 0, 0]
        for o, n in enumerate(perm_out):
            r = o // (N // P)
            for j, c in enumerate(c for c in range(M) if c % P != r):
                W[n, c, ch, cw] = w1[o, j]
    elif P > 1:
        w1 = m.weight_1x1.detach().double()[:, :, 0, 0]
        for n in range(N):
            for c in range(M):
                if (c - n) % P != 0:
                    W[n, c, ch, cw] = w1[n, c]
    return W


def reference_forward(m: HetConv2d, x: torch.Tensor) -> torch.Tensor:
    ref = nn.Conv2d(
        m.in_channels,
        m.out_channels,
        m.kernel_size,
        m.stride,
        m.padding,
        m.dilation,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
    ).double()
    with torch.no_grad():
        ref.weight.copy_(reference_kernel(m))
        if m.bias is not None:
            ref.bias.copy_(m.bias.detach().double())
    return ref(x)


def eq4_macs(M: int, N: int, K: tuple[int, int], P: int, pixels: int) -> int:
    """Eq. 2 + Eq. 3: ``FL_K + FL_1 = Do^2 M N K^2 / P + Do^2 N (M - M/P)``."""
    return pixels * M * N * K[0] * K[1] // P + pixels * N * (M - M // P)


# (M, N, P, kernel, stride, padding, dilation, padding_mode, H, W)
CASES = [
    (8, 12, 4, 3, 1, 1, 1, "zeros", 7, 9),
    (8, 12, 4, 3, 2, 1, 1, "zeros", 7, 9),  # stride 2, odd sizes
    (8, 16, 2, 3, 2, 2, 1, "zeros", 6, 5),  # more padding than "same": centre taps read the zero border
    (6, 6, 3, 3, 1, 0, 1, "zeros", 5, 6),  # no padding: centre taps are offset by 1
    (6, 12, 6, 3, 2, 2, 2, "zeros", 9, 8),  # P = M ("PC"), dilation 2
    (8, 8, 4, (3, 5), (2, 1), (1, 2), 1, "zeros", 8, 7),  # non-square kernel and stride
    (8, 8, 2, 3, 1, "same", 1, "zeros", 5, 5),
    (8, 8, 2, 3, 1, "valid", 1, "zeros", 5, 6),
    (4, 8, 4, 3, 2, 1, 1, "reflect", 7, 6),
    (4, 4, 2, 3, 1, 1, 1, "circular", 5, 5),
    (4, 4, 2, 3, 2, 1, 1, "replicate", 6, 7),
    (4, 8, 1, 3, 1, 1, 1, "zeros", 5, 5),  # P = 1: a plain conv
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])  # the dense training form / grouped ops
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_equals_dense_masked_reference(impl: str, case: tuple, train: bool) -> None:
    M, N, P, k, s, p, d, pm, H, W = case
    torch.manual_seed(0)
    m = HetConv2d(M, N, k, s, p, d, bias=True, padding_mode=pm, part=P, impl=impl).double().train(train)
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(2, M, H, W, dtype=torch.float64)
    y = m(x)
    ref = reference_forward(m, x)
    conv = nn.Conv2d(M, N, k, s, p, d, padding_mode=pm)
    assert y.shape == ref.shape == conv(x.float()).shape
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    # dense_weight() is the same kernel
    torch.testing.assert_close(m.dense_weight().double(), reference_kernel(m), rtol=0, atol=0)


def test_kernel_mask_is_the_shifted_pattern() -> None:
    # Filter n has its K x K kernels on channels n, n+P, ... (mod P); every channel in N/P filters.
    mask = hetconv_kernel_mask(8, 12, 4)
    assert mask.sum(1).tolist() == [2] * 12  # M/P per filter
    assert mask.sum(0).tolist() == [3] * 8  # N/P per channel
    assert mask[0].nonzero().flatten().tolist() == [0, 4]
    assert mask[1].nonzero().flatten().tolist() == [1, 5]
    assert mask[5].nonzero().flatten().tolist() == [1, 5]


def test_dense_impl_allows_part_not_dividing_out_channels() -> None:
    torch.manual_seed(0)
    m = HetConv2d(8, 6, 3, 1, 1, part=4, impl="dense", bias=False).double()
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference_forward(m, x), rtol=0, atol=1e-12)
    w = m.dense_weight()
    off_centre = w.clone()
    off_centre[:, :, 1, 1] = 0
    live = off_centre.abs().sum((2, 3)) > 0
    assert torch.equal(live, hetconv_kernel_mask(8, 6, 4))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_reach_every_parameter(impl: str) -> None:
    torch.manual_seed(0)
    m = HetConv2d(8, 12, 3, 2, 1, part=4, impl=impl)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    if impl == "masked":  # dead weights of the masked 1x1 get exactly zero gradient
        dead = hetconv_kernel_mask(8, 12, 4)
        assert m.weight_1x1.grad[:, :, 0, 0][dead].abs().max() == 0
        assert m.weight_1x1.grad[:, :, 0, 0][~dead].abs().min() > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [(8, 12, 4, 3, 2, 9, 7), (16, 16, 16, 3, 1, 6, 6), (6, 12, 3, (3, 5), 1, 5, 8)])
def test_macs_and_params_match_formulas(impl: str, case: tuple) -> None:
    M, N, P, k, s, H, W = case
    m = HetConv2d(M, N, k, s, 1, part=P, impl=impl, bias=False)
    x = torch.randn(3, M, H, W)
    with FlopCounterMode(display=False) as fc:
        y = m(x)
    K = m.kernel_size
    pixels = y.shape[0] * y.shape[2] * y.shape[3]
    expected = eq4_macs(M, N, K, P, pixels)
    prof = profile(m, x)
    assert prof.total_macs == expected
    live_params = N * (M * K[0] * K[1] // P + M - M // P)  # params_HC of the spec (section 2)
    assert prof.total_params == live_params
    if impl == "exact":
        # Nothing dead: every counter sees Eq. 4 and numel() is the paper's count.
        assert fc.get_total_flops() == 2 * expected
        assert sum(p.numel() for p in m.parameters()) == live_params
        assert not hasattr(m, "count_macs")  # counted through its real convs
    else:
        assert m.count_macs((x,), y) == expected and m.count_params() == live_params
        assert fc.get_total_flops() > 2 * expected  # executes the dead MACs, which profile leaves out


def test_pinned_vgg_layer_counts() -> None:
    # VGG-16 CIFAR layer 5-7 shape: 256 -> 256 at 8x8, P=4: Eq. 5 R = 1/4 + (3/4)/9 = 1/3 of
    # 8*8*256*256*9 = 37,748,736 MACs, i.e. 64*256*(64*9 + 192) = 12,582,912; params 256*768 = 196,608.
    m = HetConv2d(256, 256, 3, 1, 1, part=4, bias=False)
    prof = profile(m, (1, 256, 8, 8))
    assert prof.total_macs == 12_582_912
    assert prof.total_params == 196_608


def test_part_pc_and_part_1() -> None:
    m = HetConv2d(16, 32, 3, 1, 1, part="pc")
    assert m.part == 16 and m.conv_k.groups == 16
    p1 = HetConv2d(4, 8, 3, 1, 1, part=1, bias=False)
    assert p1.conv_1 is None
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(p1(x), F.conv2d(x, p1.conv_k.weight, padding=1))


def test_init_keeps_dense_conv_output_variance() -> None:
    # Kaiming fan_out on both parts gives each output the variance of a fan_out-initialised dense conv (2M/N).
    torch.manual_seed(0)
    x = torch.randn(4, 64, 16, 16)
    het = torch.stack([HetConv2d(64, 64, 3, 1, 1, part=4, bias=False)(x).var() for _ in range(8)]).mean()
    dense = nn.Conv2d(64, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(dense.weight, mode="fan_out", nonlinearity="relu")
    ref = 2.0 * 64 / 64  # 2 M / N for unit-variance input
    assert abs(het.item() / ref - 1) < 0.15
    assert abs(dense(x).var().item() / ref - 1) < 0.15


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=8, out_channels=8, kernel_size=3, groups=8), r"depthwise conv \(groups=8\)"),
        (dict(in_channels=8, out_channels=8, kernel_size=3, groups=2), r"grouped conv \(groups=2\)"),
        (dict(in_channels=8, out_channels=8, kernel_size=1), r"1x1 conv"),
        (dict(in_channels=8, out_channels=8, kernel_size=2), r"kernel_size must be odd"),
        (
            dict(in_channels=8, out_channels=8, kernel_size=3, part=3),
            r"part=3 must divide in_channels=8; allowed part values: \[1, 2, 4, 8\]",
        ),
        (
            dict(in_channels=8, out_channels=6, kernel_size=3, part=4),
            r"part=4 must divide out_channels=6 .*allowed part values: \[1, 2\].*impl='dense'",
        ),
        (dict(in_channels=8, out_channels=8, kernel_size=3, part=0), r"part must be a positive int or 'pc'"),
        (
            dict(in_channels=8, out_channels=8, kernel_size=3, part="half"),
            r"part must be a positive int or 'pc'",
        ),
        (dict(in_channels=8, out_channels=8, kernel_size=3, impl="fast"), r"impl must be one of"),
    ],
)
def test_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HetConv2d(**kwargs)


def test_ineligible_reason_and_from_conv() -> None:
    assert get_method("hetconv") is HetConv2d
    assert "depthwise" in HetConv2d.ineligible_reason(nn.Conv2d(16, 16, 3, groups=16))
    assert "1x1 conv" in HetConv2d.ineligible_reason(nn.Conv2d(16, 32, 1))
    assert "part=4 must divide in_channels=6" in HetConv2d.ineligible_reason(nn.Conv2d(6, 8, 3), part=4)
    assert HetConv2d.ineligible_reason(nn.Conv2d(16, 32, 3, padding=1), part=4) is None
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2, bias=True, padding_mode="reflect").double()
    m = HetConv2d.from_conv(conv, part=8)
    assert isinstance(m, HetConv2d) and m.conv_k.weight.dtype == torch.float64
    assert (m.stride, m.padding, m.dilation, m.padding_mode) == ((2, 2), (2, 2), (2, 2), "reflect")
    assert m.bias is not None and m.part == 8
    x = torch.randn(1, 16, 11, 10, dtype=torch.float64)
    assert m(x).shape == conv(x).shape
    assert "part=8" in repr(m) and "impl=exact" in repr(m)


@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_and_pickle_round_trip(impl: str) -> None:
    torch.manual_seed(0)
    a = HetConv2d(8, 8, 3, 1, 1, part=4, impl=impl)
    b = HetConv2d(8, 8, 3, 1, 1, part=4, impl=impl)
    sd = a.state_dict()
    assert not any("mask" in k or "index" in k for k in sd)  # derived buffers are not saved
    b.load_state_dict(sd)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    c = torch.load(buf, weights_only=False)
    d = copy.deepcopy(a)
    for other in (c, d):
        torch.testing.assert_close(other(x), a(x), rtol=0, atol=0)
        if impl != "exact":  # the self-count hooks survive and point at the copy
            assert other.count_params() == a.count_params()
            assert other.count_params.__self__ is other


def test_convert_reports_why_layers_are_kept() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),  # stem
        nn.Conv2d(16, 32, 3, padding=1),  # converted
        nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise
        nn.Conv2d(32, 24, 1),  # 1x1
        nn.Conv2d(24, 6, 3, padding=1),  # P=4 does not divide 6
        nn.Conv2d(6, 8, 3, padding=1),  # P=4 does not divide 6 (in)
    )
    model, report = convert(model, "hetconv", part=4, return_report=True)
    reasons = {r.name: r.reason for r in report.layers}
    assert isinstance(model[1], HetConv2d)
    assert "stem" in reasons["0"]
    assert "depthwise" in reasons["2"]
    assert "1x1 conv" in reasons["3"]
    assert "part=4 must divide out_channels=6" in reasons["4"]
    assert "part=4 must divide in_channels=6" in reasons["5"]
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 8, 8, 8)


@settings(max_examples=40, deadline=None)
@given(
    mq=st.integers(1, 4),
    nq=st.integers(1, 4),
    P=st.sampled_from([1, 2, 3, 4]),
    k=st.sampled_from([3, 5, (3, 1), (1, 5)]),
    s=st.integers(1, 3),
    p=st.integers(0, 3),
    d=st.integers(1, 2),
    H=st.integers(1, 10),
    W=st.integers(1, 10),
    impl=st.sampled_from(IMPLS),
    bias=st.booleans(),
    train=st.booleans(),
)
def test_hypothesis_shapes_and_equivalence(mq, nq, P, k, s, p, d, H, W, impl, bias, train) -> None:
    M, N = mq * P, nq * P
    kk = (k, k) if isinstance(k, int) else k
    if any(size + 2 * p - d * (kd - 1) < 1 for size, kd in zip((H, W), kk, strict=True)):
        return  # no output pixel: nn.Conv2d refuses such inputs too
    if kk == (1, 1):
        return
    m = HetConv2d(M, N, k, s, p, d, bias=bias, part=P, impl=impl).double().train(train)
    x = torch.randn(2, M, H, W, dtype=torch.float64)
    y = m(x)
    ref = reference_forward(m, x)
    assert y.shape == ref.shape
    assert y.shape[-2:] == m.output_size(H, W)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-11)
    assert profile(m, x).total_macs == eq4_macs(M, N, kk, P, 2 * y.shape[2] * y.shape[3])


# -- the paper's tables, rebuilt live ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def table_rows():
    from compconv.paper.hetconv_tables import rows

    # "Table 1:VGG-16_P4" -> row (Tables 1 and 5 both have a VGG-16_P4)
    return {f"{r.table.split(' (')[0]}:{r.row}": r for r in rows()}


@pytest.mark.slow
def test_tables_reproducible_rows_within_tolerance(table_rows) -> None:
    for r in table_rows.values():
        assert r.status in ("reproduced", "gap", "not reproducible", "info"), r.row
        if r.status == "reproduced":
            if r.tol_macs is not None and r.macs_diff is not None:
                assert abs(r.macs_diff) <= r.tol_macs, r.row
            if r.tol_params is not None and r.params_diff is not None:
                assert abs(r.params_diff) <= r.tol_params, r.row
        if r.status != "reproduced":
            assert r.note, f"{r.row}: a row that is not reproduced must say why"
    expected = [f"Table 1:VGG-16_P{p}" for p in (1, 2, 4, 8, 16, 32, 64)] + [
        "Table 3:ResNet-56_P1",
        "Table 3:ResNet-56_P2",
        "Table 3:ResNet-56_P4",
        "Table 3:ResNet-56_P2_SE",
        "Table 3:ResNet-56_P4_SE",
        "Table 4:MobileNet",
        "Table 4:MobileNet_P32",
        "Table 4:MobileNet_P32_SE",
        "Table 5:VGG-16_P4",
        "Table 6:ResNet-34_P1 (projections not counted)",
        "Table 6:ResNet-34_P4 (projections not counted)",
        "Table 7:ResNet-50_P1",
    ]
    for name in expected:
        assert table_rows[name].status == "reproduced", (name, table_rows[name].note)
    # SE rows: params cannot match (paper inconsistency), MACs must.
    for p in (1, 2, 4, 8, 16, 32, 64):
        r = table_rows[f"Table 1:VGG-16_P{p}_SE"]
        assert abs(r.macs_diff) <= 0.01 and r.note.startswith("within tolerance: MACs"), r.row
    for key, r in table_rows.items():
        # `compconv tables` fails on a "gap" row that has tolerances: only unexpected gaps may have them.
        assert not (r.status == "gap" and (r.tol_macs is not None or r.tol_params is not None)), key
        # Even the by-design gaps stay close to the paper's totals (a regression in a module would not).
        if r.macs_diff is not None:
            assert abs(r.macs_diff) < 0.02, key


@pytest.mark.slow
def test_tables_pinned_counts(table_rows) -> None:
    # VGG-16 P4 (Li et al. host, conv1 kept): Eq. 4 summed over the 12 HetConv layers (M, N, Do) + conv1 + FC:
    layers = [
        (64, 64, 32),
        (64, 128, 16),
        (128, 128, 16),
        (128, 256, 8),
        (256, 256, 8),
        (256, 256, 8),
        (256, 512, 4),
        (512, 512, 4),
        (512, 512, 4),
        (512, 512, 2),
        (512, 512, 2),
        (512, 512, 2),
    ]
    macs = 32 * 32 * 3 * 64 * 9 + sum(eq4_macs(M, N, (3, 3), 4, D * D) for M, N, D in layers) + 512 * 512 + 512 * 10
    assert macs == 105_845_760  # the spec's "VGG P4 105.846M"
    assert round(table_rows["Table 1:VGG-16_P4"].ours_macs * 1e6) == macs
    # MobileNet P32: the spec's exact 55,945,216 (Eq. 4 over the 13 blocks + conv1 + FC 1024*10).
    assert round(table_rows["Table 4:MobileNet_P32"].ours_macs * 1e6) == 55_945_216
    assert round(table_rows["Table 4:MobileNet"].ours_macs * 1e6) == 46_354_432


def test_tables_registered() -> None:
    from compconv.paper import TABLES, _load

    assert _load(TABLES["hetconv"]).__module__ == "compconv.paper.hetconv_tables"


@pytest.mark.parametrize("impl", ["masked", "dense"])
def test_profile_of_a_converted_model_is_the_same_for_every_impl(impl: str) -> None:
    # The masked/dense impls execute and hold dead MACs/weights, but profile reports the architecture's counts,
    # which the exact impl has for real (counted through its convs).
    from compconv.models import get_model

    counts = {}
    for name in ("exact", impl):
        with torch.device("meta"):
            model = convert(get_model("cifar_vgg16_li"), "hetconv", part=8, impl=name)
        prof = profile(model, (1, 3, 32, 32))
        counts[name] = (prof.total_params, prof.total_macs)
    assert counts["exact"] == counts[impl]


def test_wrong_channel_count_names_in_channels_not_a_reshape() -> None:
    """Issue 14: a 15-channel input to HetConv2d(12, ...) said "shape '[2, 4, 3, 8, 8]' is invalid ..."."""
    m = HetConv2d(12, 8, 3, padding=1, part=4)
    with pytest.raises(ValueError, match=r"HetConv2d expected in_channels=12 input channels.*15 channels"):
        m(torch.randn(2, 15, 8, 8))


@pytest.mark.parametrize("impl", IMPLS)
def test_unbatched_input_and_weight_as_in_conv2d(impl: str) -> None:
    torch.manual_seed(0)
    m = HetConv2d(8, 8, 3, padding=1, part=4, impl=impl)
    x = torch.randn(8, 6, 6)
    torch.testing.assert_close(m(x), m(x[None])[0])
    if impl == "dense":  # the one impl with a single kernel: usable as nn.Conv2d's weight
        torch.testing.assert_close(F.conv2d(x[None], m.weight, m.bias, padding=1), m(x[None]))
    else:  # was `weight = None`: a TypeError deep inside F.conv2d
        with pytest.raises(AttributeError, match=r"HetConv2d has no single .weight.*conv_k.weight"):
            F.conv2d(x[None], m.weight)


# -- the training form (train_form="dense"): the same function and gradients through one dense conv ----------
def _conv_weight_shapes(m: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """The weight shapes of the convolutions a forward executes (a dispatch mode: no module hooks)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: list[tuple[int, ...]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                self.shapes.append(tuple(args[1].shape))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        m(x)
    return rec.shapes


def test_training_form_runs_one_dense_conv_only_while_training() -> None:
    """One dense conv while training with grad; the grouped ops (Eq. 4's MACs) otherwise."""
    M, N, P, H = 16, 16, 4, 8
    m = HetConv2d(M, N, 3, 1, 1, part=P, bias=False)
    x = torch.randn(2, M, H, H)
    grouped = [(16, 4, 3, 3), (16, 12, 1, 1)]
    assert _conv_weight_shapes(m.train(), x) == [(16, 16, 3, 3)]
    with torch.no_grad():
        assert _conv_weight_shapes(m.train(), x) == grouped  # no grad: nothing to train
    assert _conv_weight_shapes(m.eval(), x) == grouped  # inference, export
    m.train_form = "grouped"
    assert _conv_weight_shapes(m.train(), x) == grouped
    m.train_form = "dense"
    # profile counts the architecture whatever mode the model is in, and FlopCounterMode (whose module tracker
    # hooks every module) sees the grouped ops: a global module hook makes the inner convs run
    het = eq4_macs(M, N, (3, 3), P, 2 * H * H)
    assert profile(m.train(), x).total_macs == het and m.training
    with FlopCounterMode(display=False) as counter:
        m(x)
    assert counter.get_total_flops() == 2 * het


def test_training_form_calls_replaced_or_hooked_inner_convs() -> None:
    """A hooked or replaced inner conv must run (binarize, QAT, feature hooks): never gathered around."""
    torch.manual_seed(0)
    m = HetConv2d(8, 8, 3, padding=1, part=4)
    x = torch.randn(2, 8, 6, 6)
    seen = []
    h = m.conv_k.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    assert not m._trains_dense()
    m(x)
    assert seen == [torch.Size([2, 8, 6, 6])]
    h.remove()
    assert m._trains_dense()

    class Doubled(nn.Conv2d):  # a conv subclass computing something else: its forward must be called
        def forward(self, x):
            return 2 * super().forward(x)

    ref = m(x)
    odd = copy.deepcopy(m)
    k = odd.conv_k
    odd.conv_k = Doubled(k.in_channels, k.out_channels, k.kernel_size, k.stride, k.padding, k.dilation, k.groups,
                         bias=False)
    odd.conv_k.load_state_dict(k.state_dict())
    assert not odd._trains_dense()
    assert not torch.allclose(odd(x), ref)
    from compconv import binarize

    net = binarize(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), copy.deepcopy(m),
                                 nn.Flatten(), nn.Linear(288, 2)))
    het = net[2] if isinstance(net[2], HetConv2d) else next(x for x in net.modules() if isinstance(x, HetConv2d))
    assert not het._trains_dense()  # its convs are binary now


def test_training_form_option_checked_and_shown() -> None:
    with pytest.raises(ValueError, match=r"train_form must be one of \('dense', 'grouped'\), but got 'fast'"):
        HetConv2d(8, 8, 3, part=4, train_form="fast")
    with pytest.raises(ValueError, match=r"train_form"):
        convert(nn.Sequential(nn.Conv2d(8, 8, 3)), "hetconv", part=4, train_form="fast", keep_stem=False)
    model = convert(nn.Sequential(nn.Conv2d(8, 8, 3)), "hetconv", part=4, train_form="grouped", keep_stem=False)
    assert model[0].train_form == "grouped" and "train_form=grouped" in repr(model[0])
    assert "train_form" not in repr(HetConv2d(8, 8, 3, part=4))  # the default is not shown


def test_training_form_follows_the_device_and_trains_after_a_copy() -> None:
    """The gather index is built for the device in use; a deepcopy/pickle round trip trains the same."""
    torch.manual_seed(0)
    m = HetConv2d(8, 12, 3, 2, 1, part=4).double()
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    y = m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    torch.testing.assert_close(m2(x), y, rtol=0, atol=0)
    for name in ("dense_index", "dense_inverse"):  # as if built on another device: rebuilt, not reused
        m2._derived_cache[name] = m2._derived_cache[name].to("meta")
    torch.testing.assert_close(m2(x), y, rtol=0, atol=0)
    assert all(t.device.type == "cpu" for t in m2._derived_cache.values())
    assert not any("dense" in k or "derived" in k for k in m.state_dict())


@pytest.mark.parametrize("impl", ["exact", "masked"])
def test_training_form_per_sample_gradients_with_torch_func(impl: str) -> None:
    """vmap(grad) in training mode (the dense form's custom gather under torch.func) equals a loop and the
    grouped form, per sample; the masked impl's dead weights get zero."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    m = HetConv2d(8, 12, 3, 1, 1, part=4, impl=impl).double().train()
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)

    def loss(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return (functional_call(m, p, (xi.unsqueeze(0),)) ** 2).sum()

    dense = vmap(grad(loss), in_dims=(None, 0))(params, x)
    m.train_form = "grouped"
    grouped = vmap(grad(loss), in_dims=(None, 0))(params, x)
    m.train_form = "dense"
    for i in range(x.shape[0]):
        ref = torch.autograd.grad((m(x[i : i + 1]) ** 2).sum(), list(m.parameters()))
        for (name, _), r in zip(m.named_parameters(), ref, strict=True):
            torch.testing.assert_close(dense[name][i], r)
            torch.testing.assert_close(grouped[name][i], r)
    if impl == "masked":
        assert (dense["weight_1x1"][:, m.pointwise_mask.squeeze() == 0] == 0).all()


class _DenseWeight(nn.Module):
    """``forward()`` returns ``het.dense_weight()``, so ``functional_call`` can swap its parameters."""

    def __init__(self, het: HetConv2d) -> None:
        super().__init__()
        self.het = het

    def forward(self) -> torch.Tensor:
        return self.het.dense_weight()


@pytest.mark.parametrize("impl", ["exact", "masked"])
def test_dense_weight_gradient_is_the_gather_of_the_incoming_one(impl: str) -> None:
    """dense_weight's backward (a gather through the inverse index) gives each weight the gradient of the
    entry it is placed in, as autograd's own indexing backward does, and is twice differentiable."""
    from torch.func import functional_call

    torch.manual_seed(0)
    m = HetConv2d(8, 12, 3, part=4, impl=impl, bias=False).double()
    ws = [m.conv_k.weight, m.conv_1.weight if impl == "exact" else m.weight_1x1]  # in dense_weight's order
    assert {id(w) for w in ws} == {id(w) for w in m.parameters()}
    g = torch.randn(12, 8, 3, 3, dtype=torch.float64)
    got = torch.autograd.grad(m.dense_weight(), ws, g)
    flat = torch.cat([ws[0].new_zeros(1), *(w.reshape(-1) for w in ws)])
    ref = torch.autograd.grad(flat[m._derived("dense_index", flat)].view(12, 8, 3, 3), ws, g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    wrap = _DenseWeight(m)
    names = [n for n, _ in wrap.named_parameters()]
    ws = list(wrap.parameters())

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(wrap, dict(zip(names, ps, strict=True)), ()) ** 2

    assert torch.autograd.gradgradcheck(f, tuple(p.detach().clone().requires_grad_() for p in ws))


@pytest.mark.parametrize("impl", ["exact", "masked"])
@pytest.mark.parametrize("case", CASES)
def test_training_forms_agree_in_outputs_and_gradients(impl: str, case: tuple) -> None:
    """Every geometry case, float64: the dense training form gives the grouped ops' outputs and the same
    gradients for the input and every parameter (the masked impl's dead weights: zero in both)."""
    M, N, P, k, s, p, d, pm, H, W = case
    torch.manual_seed(0)
    m = HetConv2d(M, N, k, s, p, d, bias=True, padding_mode=pm, part=P, impl=impl).double().train()
    x = torch.randn(2, M, H, W, dtype=torch.float64, requires_grad=True)
    g = None
    results = []
    for form in ("dense", "grouped"):
        m.train_form = form
        assert m._trains_dense() == (form == "dense")
        y = m(x)
        g = torch.randn_like(y) if g is None else g
        results.append((y, *torch.autograd.grad(y, [x, *m.parameters()], g)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["exact", "masked"])
def test_training_form_supports_forward_mode_ad(impl: str) -> None:
    """jvp / jacfwd through dense_weight's gather (torch.func and torch.autograd.forward_ad) in float64."""
    from torch.func import functional_call, jvp

    torch.manual_seed(0)
    m = HetConv2d(4, 4, 3, padding=1, part=2, impl=impl).double().train()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    params = {k: v.detach() for k, v in m.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    outs = []
    for form in ("dense", "grouped"):
        m.train_form = form
        outs.append(jvp(lambda p: functional_call(m, p, (x,)), (params,), (tangents,))[1])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    m.train_form = "dense"

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, tuple(p.clone().requires_grad_() for p in params.values()),
                                    check_forward_ad=True, check_backward_ad=False, fast_mode=True)


def test_training_form_respects_backward_hooks() -> None:
    """A backward pre-hook on an inner conv, or a global backward hook, must fire: the grouped ops run."""
    from torch.nn.modules.module import register_module_full_backward_hook, register_module_full_backward_pre_hook

    x = torch.randn(2, 8, 6, 6)
    m = HetConv2d(8, 8, 3, padding=1, part=4).train()
    seen: list[str] = []
    h = m.conv_k.register_full_backward_pre_hook(lambda mod, go: seen.append("pre"))
    m(x).sum().backward()
    h.remove()
    assert seen == ["pre"]
    for register in (register_module_full_backward_hook, register_module_full_backward_pre_hook):
        names: list[str] = []
        h = register(lambda mod, *grads, names=names: names.append(type(mod).__name__))
        try:
            assert not m._trains_dense()
            m(x).sum().backward()
        finally:
            h.remove()
        assert sorted(names) == ["Conv2d", "Conv2d", "HetConv2d"], register.__name__
    assert m._trains_dense()


def test_traced_and_exported_training_graphs_record_the_grouped_ops() -> None:
    """jit.trace (with its re-trace check), torch.export and torch.fx of a training-mode layer record the
    architecture."""
    torch.manual_seed(0)
    m = HetConv2d(8, 8, 3, padding=1, part=4).train()
    x = torch.randn(2, 8, 6, 6)
    traced = torch.jit.trace(m, x)  # check_trace re-runs the trace: the graphs must agree
    torch.testing.assert_close(traced(x), m(x))
    assert str(traced.inlined_graph).count("aten::_convolution") == 2  # conv_k and conv_1, not one dense conv
    ep = torch.export.export(m, (x,))
    convs = [n for n in ep.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 2
    gm = torch.fx.symbolic_trace(m)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv_k", "conv_1"]
    torch.testing.assert_close(gm(x), m(x))


@pytest.mark.parametrize("impl", IMPLS)
def test_meta_device_build_then_to_empty_and_load_state_dict(impl: str) -> None:
    """Built on the meta device, materialised with to_empty(), loaded: the same model in train and eval
    (the gather index and masks are derived from the geometry, never left uninitialised)."""
    torch.manual_seed(0)
    net = lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # noqa: E731
                                nn.Conv2d(8, 12, 3, padding=1))
    real = convert(net(), "hetconv", part=4, impl=impl, keep_stem=False)
    with torch.device("meta"):
        meta = convert(net(), "hetconv", part=4, impl=impl, keep_stem=False)
    meta = meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    x = torch.randn(2, 8, 6, 6)
    for mode in (True, False):
        torch.testing.assert_close(meta.train(mode)(x), real.train(mode)(x), rtol=0, atol=0)


def test_train_form_checked_when_set_after_construction() -> None:
    m = HetConv2d(8, 8, 3, part=4)
    with pytest.raises(ValueError, match=r"train_form must be one of \('dense', 'grouped'\), but got 'bogus'"):
        m.train_form = "bogus"
    assert m.train_form == "dense"
    with pytest.raises(ValueError, match=r"did you mean 'dense'\?"):
        HetConv2d(8, 8, 3, part=4, train_form="Dense")
    assert not hasattr(m, "kernel_mask") and not hasattr(m, "pointwise_mask") and hasattr(m, "gather_index")


def test_training_form_compiles_in_one_graph() -> None:
    """torch.compile(fullgraph=True) of a training-mode layer (the dense form): same outputs and gradients."""
    torch.manual_seed(0)
    m = HetConv2d(8, 8, 3, padding=1, part=4).train()
    x = torch.randn(2, 8, 6, 6)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    g_got = torch.autograd.grad(got.square().sum(), list(m.parameters()))
    ref = m(x)
    g_ref = torch.autograd.grad(ref.square().sum(), list(m.parameters()))
    torch.testing.assert_close(got, ref)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b)
