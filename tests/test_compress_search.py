"""Budget search and the compress() API (compconv.compress)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

import compconv
import compconv.serialization
from compconv.compress import compress
from compconv.compress.candidates import Candidate, LayerCandidates
from compconv.compress.search import greedy_select

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n: int = 3, size: int = 32, seed: int = 0, batch: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def _lc(name: str, costs: list[int]) -> LayerCandidates:
    return LayerCandidates(name, (1, 1, 1, 1), [Candidate(f"c{i}", None if i == 0 else {}, 0, m)
                                                for i, m in enumerate(costs)])


def test_greedy_takes_the_cheapest_sensitivity_per_mac_and_gives_back_overshoot():
    layers = [_lc("a", [100, 50, 20]), _lc("b", [100, 60])]
    sens = {"a": [0.0, 0.1, 0.5], "b": [0.0, 0.05]}
    # total 200 (a and b only); target 150: b->c1 costs 0.05/40 = 0.00125 per MAC, a->c1 0.1/50 = 0.002:
    # b first (cost 160), then a->c1 (0.1/50) vs a->c2 (0.5/80): a->c1, cost 110 <= 150.
    # Give-back: b back to keep (+40 -> 150 <= 150, gain 0.05): taken.
    assert greedy_select(layers, sens, 200, 150) == [1, 0]
    assert greedy_select(layers, sens, 200, 200) == [0, 0]
    with pytest.raises(ValueError, match=r"smallest reachable macs is 0\.4000"):  # (20 + 60) / 200
        greedy_select(layers, sens, 200, 60)


@pytest.mark.slow
def test_compress_resnet20_meets_budget_reproducibly_and_leaves_the_input_alone(tmp_path):
    model = compconv.get_model("cifar_resnet20").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 3 fit batches x 8 images x 8x8 pixels = 1536 rows per filter of layer3 (64 x 3 x 3 = 576 unknowns)
    calib = _calib(4, batch=8)
    m1, r1 = compress(model, "compconv", 0.6, calib)
    m2, r2 = compress(model, "compconv", 0.6, [(x, torch.zeros(8)) for x in calib])  # (input, label) pairs
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(isinstance(m, nn.Conv2d) for m in model.modules() if "conv" in type(m).__name__.lower())
    assert [r.choice for r in r1.layers] == [r.choice for r in r2.layers]
    x = calib[0]
    torch.testing.assert_close(m1(x), m2(x))
    assert r1.macs_after <= 0.6 * r1.macs_before
    assert r1.macs_after == compconv.profile(m1, (1, 3, 32, 32)).total_macs
    # the report's per-layer MACs add up to the model's change
    assert r1.macs_before - r1.macs_after == sum(r.macs_before - r.macs_after for r in r1.layers)
    fitted = [r for r in r1.layers if r.options is not None]
    assert fitted and all(r.err_fit is not None and r.err_fit < r.err_init for r in fitted)
    # 1536 rows < 4 x 576: the report warns about layer3 (layer1/2: 24 x 16x16 or 32x32 rows, enough)
    assert any("calibration is small" in n and "layer3." in n for n in r1.notes)
    assert any(r.assignment == "matched" for r in fitted)  # conv1 -> bn1 -> relu -> conv2 is permutable
    assert not any(r.assignment == "matched" for r in fitted if r.name.endswith("conv2"))  # residual add
    json.dumps(r1.to_dict())
    back = compconv.serialization.load(compconv.serialization.save(m1, tmp_path / "c.pt", base="cifar_resnet20",
                                                                   conversion=r1))
    torch.testing.assert_close(back(x), m1.eval()(x), rtol=0, atol=0)
    text = str(r1)
    assert "layer1.0.conv1" in text and "achieved" in text


@pytest.mark.slow
def test_compress_rules_and_warm_start_off():
    model = compconv.get_model("cifar_resnet20").eval()
    calib = _calib(2)
    _, eq6 = compress(model, "compconv", 0.6, calib, rule="eq6")
    assert eq6.rule_detail.startswith("c0=") and eq6.macs_after <= 0.6 * eq6.macs_before
    _, cold = compress(model, "ghost", 0.7, calib, rule="uniform", warm_start=False)
    assert cold.rule_detail == "ratio=2" and all(r.err_fit is None for r in cold.layers)
    assert all(r.err_init is not None for r in cold.layers if r.options is not None)


@pytest.mark.parametrize("kwargs,match", [
    ({"budget": 1.5}, "budget must be"),
    ({"budget_type": "flops"}, r"budget_type must be one of \('macs', 'params', 'latency'\)"),
    ({"rule": "eq7"}, "rule must be one of"),
    ({"method": "ghost", "rule": "eq6"}, "needs method='compconv'"),
    ({"assignment": "best"}, "assignment must be one of"),
    ({"budget": 0.05}, "smallest reachable macs"),
])
def test_compress_bad_arguments(kwargs, match):
    args = {"method": "compconv", "budget": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        compress(compconv.get_model("cifar_resnet20"), args.pop("method"), args.pop("budget"), _calib(2),
                 rule=args.pop("rule", "uniform"), **args)
    with pytest.raises(TypeError, match="calib"):
        compress(compconv.get_model("cifar_resnet20"), "compconv", 0.5, 3)


@pytest.mark.slow
@pytest.mark.parametrize("arch,method,budget", [("resnet18", "compconv", 0.5), ("resnet18", "ghost", 0.6),
                                                ("mobilenet_v2", "compconv", 0.8)])
def test_budget_met_on_torchvision_models(arch, method, budget):
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    calib = _calib(2, size=32)
    _, rep = compress(model, method, budget, calib, rule="uniform" if arch == "resnet18" else "search",
                      warm_start=arch != "resnet18")
    assert rep.macs_after <= budget * rep.macs_before
    assert rep.macs_after == compconv.profile(_, (1, 3, 32, 32)).total_macs


def test_held_out_images_are_a_random_share_not_the_last_batches() -> None:
    """A class-ordered loader (e.g. 8 batches of class 0, then 8 of class 1) must not hold out one class."""
    from compconv.compress.calib import split_batches

    batches = [torch.full((4, 1, 2, 2), float(c)) for c in (0, 0, 0, 0, 1, 1, 1, 1)]  # value = class
    fit, held = split_batches(batches, 0.25, seed=0)
    fit_x, held_x = torch.cat(fit), torch.cat(held)
    assert fit_x.shape[0] == 24 and held_x.shape[0] == 8
    assert set(fit_x.unique().tolist()) == {0.0, 1.0}  # the fit sees both classes
    assert all(x.shape[0] <= 4 for x in fit + held)  # re-batched at the loader's batch size
    again = split_batches(batches, 0.25, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again[1], held, strict=True))  # seeded: reproducible
    single = split_batches([torch.arange(10.0).view(10, 1, 1, 1)], 0.3)
    assert sum(x.shape[0] for x in single[0]) == 7 and sum(x.shape[0] for x in single[1]) == 3
    with pytest.raises(ValueError, match="at least 2 images"):
        split_batches([torch.zeros(1, 1, 2, 2)], 0.25)


def test_a_conv_called_twice_costs_its_macs_twice() -> None:
    """A conv shared by two calls in one forward (a detection head on every pyramid level) saves its MACs
    on every call: the budget is met on the real model's MACs, and a budget only depth 1 reaches is met."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.c = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.c(torch.relu(self.c(torch.relu(self.stem(x))))))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    m = Shared().eval()
    calib = torch.randn(16, 3, 16, 16)
    whole = compconv.profile(m, (1, 3, 16, 16)).total_macs
    shares = {}
    for d in (1, 2):
        c = compconv.convert(copy.deepcopy(m), "compconv", overrides={"c": {"depth": d}}, exclude="stem")
        shares[d] = compconv.profile(c, (1, 3, 16, 16)).total_macs / whole
    for budget in (0.7, 0.6):  # depth 1 (0.537 of the MACs) meets both; the search must not go deeper
        out, rep = compress(m, "compconv", budget, calib)
        assert rep.layers[0].choice == "depth=1"
        assert rep.achieved == pytest.approx(shares[1])
        assert compconv.profile(out, (1, 3, 16, 16)).total_macs == rep.macs_after


def test_typos_in_exclude_ladder_and_method_options_are_errors_naming_them() -> None:
    net = compconv.get_model("cifar_resnet20")
    calib = torch.randn(8, 3, 16, 16)
    with pytest.raises(ValueError, match=r"exclude selector\(s\) matched no conv layer: \['layr3\.\*'\]"):
        compress(net, "compconv", 0.7, calib, exclude="layr3.*", rule="uniform")
    with pytest.raises(ValueError, match=r"ladder\[0\].*dept.*depth"):
        compress(net, "compconv", 0.7, calib, ladder=[{"dept": 1}])
    with pytest.raises(ValueError, match=r"method_options: .*foo"):
        compress(net, "compconv", 0.7, calib, method_options={"foo": 1})


def test_exclude_takes_every_selector_convert_takes() -> None:
    """A module type, a module object, a callable and a container pattern, read as ``convert`` reads them."""
    net = compconv.get_model("cifar_resnet20").eval()
    calib = torch.randn(8, 3, 16, 16)
    changed = lambda rep: {r.name for r in rep.layers if r.choice != "keep"}  # noqa: E731
    _, rep = compress(net, "compconv", 0.7, calib, exclude=net.layer1[0].conv1, rule="uniform")
    assert "layer1.0.conv1" not in {r.name for r in rep.layers} and "layer1.0.conv2" in changed(rep)
    _, rep = compress(net, "compconv", 0.7, calib, exclude=net.layer3, rule="uniform")
    assert not {n for n in {r.name for r in rep.layers} if n.startswith("layer3.")}
    _, rep = compress(net, "compconv", 0.7, calib, exclude=lambda n, m: m.out_channels == 64, rule="uniform")
    assert {r.name for r in rep.layers} and all(not n.startswith("layer3.") for n in {r.name for r in rep.layers})
    with pytest.raises(ValueError, match="no conv is left to compress"):
        compress(net, "compconv", 0.7, calib, exclude=nn.Conv2d, rule="uniform")
    with pytest.raises(ValueError, match=r"matched no conv layer: \['layer3'\]; to keep the convs inside "
                                         r"'layer3', use 'layer3\.\*'"):
        compress(net, "compconv", 0.7, calib, exclude="layer3", rule="uniform")
    with pytest.raises(ValueError, match=r"matched no conv layer: \[<class 'torch.nn.modules.linear.Linear'>\]"):
        compress(net, "compconv", 0.7, calib, exclude=nn.Linear, rule="uniform")
    with pytest.raises(TypeError, match="exclude selectors must be"):
        compress(net, "compconv", 0.7, calib, exclude=[3], rule="uniform")
    for wrong in (b"layer1.*", {"layer1.*": 1}):  # iterable, but of ints / keys
        with pytest.raises(TypeError, match=f"exclude must be .* but got {type(wrong).__name__} "):
            compress(net, "compconv", 0.7, calib, exclude=wrong, rule="uniform")


def test_non_finite_calibration_data_is_refused() -> None:
    calib = torch.randn(8, 3, 16, 16)
    calib[3, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="calib batch 0 holds non-finite values"):
        compress(compconv.get_model("cifar_resnet20"), "compconv", 0.5, calib)


@pytest.mark.parametrize("calib,error,match", [
    (torch.randn(8, 1, 16, 16), ValueError,
     r"calib batch 0 of shape \(8, 1, 16, 16\) does not fit the model: RuntimeError: .*channels"),
    (torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8), TypeError,
     r"calib batch 0 has dtype torch.uint8; compress needs the model's inputs \(torch.float32\)"),
    ([torch.randn(4, 3, 16, 16), torch.randn(4, 1, 16, 16)], ValueError,
     r"calib batches have different channel counts"),
    (torch.randn(8, 3), ValueError, r"calib batch 0 has shape \(8, 3\); calib must hold image batches \(N, C, H, W\)$"),
    (torch.randn(3, 16, 16), ValueError, r"calib batch 0 has shape \(3, 16, 16\).*one unbatched image\? add the "
                                         r"batch dimension: x.unsqueeze\(0\)"),
])
def test_malformed_calibration_data_is_refused_naming_the_batch(calib, error, match) -> None:
    net = compconv.get_model("cifar_resnet20")
    with pytest.raises(error, match=match):
        compress(net, "compconv", 0.5, calib)
    assert net.training  # the check's eval() is undone


def test_compress_leaves_the_callers_random_stream_alone() -> None:
    net, calib = compconv.get_model("cifar_resnet20"), torch.randn(8, 3, 16, 16)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    compress(net, "compconv", 0.6, calib, rule="uniform")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("size,match", [
    ((1, 1, 16, 16), r"input_size=\(1, 1, 16, 16\) has 1 channels but the calib batches have 3: .*\(1, 3, 16, 16\)"),
    ((1, 3, 16), r"input_size must be \(N, C, H, W\) of positive ints, got \(1, 3, 16\)"),
    ((0, 3, 16, 16), r"input_size must be \(N, C, H, W\) of positive ints"),
])
def test_a_wrong_input_size_is_an_error_naming_it(size, match) -> None:
    with pytest.raises(ValueError, match=match):
        compress(compconv.get_model("cifar_resnet20"), "compconv", 0.5, torch.randn(8, 3, 16, 16), input_size=size)


def test_nothing_to_compress_says_why_not_raise_the_budget() -> None:
    """No eligible conv (xsepconv takes depthwise convs only; every conv excluded) is not an unreachable budget."""
    net, calib = compconv.get_model("cifar_resnet20"), torch.randn(8, 3, 16, 16)
    with pytest.raises(ValueError, match=r"no conv of this model can take method 'xsepconv': none of the 18 convs "
                                         r"compress may change .*e.g. 'layer1.0.conv1': .*choose another method "
                                         r"\(compconv, ghost, hetconv, slimconv\)"):
        compress(net, "xsepconv", 0.5, calib)
    with pytest.raises(ValueError, match=r"no conv is left to compress: every nn.Conv2d .* is the stem "
                                         r"\(keep_stem=True\) or matches exclude="):
        compress(net, "compconv", 0.5, calib, exclude=lambda n, m: True)


def test_a_result_far_under_the_budget_says_so_in_the_report() -> None:
    """Ghost's whole-number ratio: the mildest uniform ratio (2) already lands far under a 0.6 budget."""
    net = compconv.get_model("cifar_resnet20").eval()
    _, rep = compress(net, "ghost", 0.6, torch.randn(8, 3, 16, 16), rule="uniform", warm_start=False)
    assert rep.achieved < 0.57
    note = next(n for n in rep.notes if "under the budget" in n)
    assert note.startswith(f"lands at {rep.achieved:.3f} of the model's macs, ")
    assert "under the budget 0.6: the mildest option on every layer lands there (the uniform rule changes " \
           "every layer)" in note
    assert note in str(rep)
    # ResNet-20's widths (<= 64): Eq. 6's largest C0 (2048) gives d = 1 everywhere, at 0.525 of the MACs
    _, mild = compress(net, "compconv", 0.6, torch.randn(8, 3, 16, 16), rule="eq6", warm_start=False)
    assert [n for n in mild.notes if "under the budget" in n] == [
        f"lands at {mild.achieved:.3f} of the model's macs, {100 * (1 - mild.achieved / 0.6):.0f}% under the budget "
        "0.6: Eq. 6's largest C0 (2048) already compresses this far (it changes every layer it can)"]
    _, eq6 = compress(net, "compconv", 0.5, torch.randn(8, 3, 16, 16), rule="eq6", warm_start=False)
    assert [n for n in eq6.notes if "under the budget" in n] == [
        f"lands at {eq6.achieved:.3f} of the model's macs, {100 * (1 - eq6.achieved / 0.5):.0f}% under the budget "
        "0.5: Eq. 6's C0 steps are coarse; the next larger C0 exceeds the budget"]
    from compconv.compress import _undershoot_note

    assert _undershoot_note(0.49, 0.5, "macs", "search", "") == []  # within 5% of the budget: nothing to say
    assert "kept for its lower held-out error" in _undershoot_note(0.3, 0.5, "params", "search",
                                                                   "sensitivity=kl; kept eq6 (c0=32): ...")[0]
