"""deploy never returns a model that computes something else (issue 14, section 5).

Each example of the issue: the rewrite is exact (checked with ``check=False``, so the passes themselves are
right, not merely caught), or it is skipped and the report says why.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import compconv
from compconv import CompConv2d
from compconv.deploy import DeployedCompConv2d, deploy, example_input_for, fold_bn_into_conv

TOL = 1e-4
deploy_pkg = importlib.import_module("compconv.deploy")  # the package (compconv.deploy is the function)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model.eval()


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return list(out) if isinstance(out, tuple) else [out]


def _assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    for ra, rb in zip(_outputs(a, x), _outputs(b, x), strict=True):
        err = (ra - rb).abs().max().item()
        assert err < TOL * max(1.0, ra.abs().max().item()), f"max abs err {err}"


# -- 1. a conv that reads and writes the same channel group ---------------------------------------------
class ResidualOnA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(16, 32, 3, padding=1)
        self.conv_b = nn.Conv2d(32, 32, 3, padding=1)
        self.conv_c = nn.Conv2d(32, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_a(x)
        return self.conv_c(a + self.conv_b(a))


def test_shuffle_fold_when_a_conv_reads_and_writes_its_group() -> None:
    # conv_b reads the group {a, conv_b(a), a + conv_b(a)} and produces into it: before the fix the union-
    # find treated it as a producer only and never permuted its input channels (off by 0.67 here).
    torch.manual_seed(0)
    model = compconv.convert(ResidualOnA(), "compconv", depth=1, keep_stem=False).eval()
    assert all(isinstance(getattr(model, n), CompConv2d) for n in ("conv_a", "conv_b", "conv_c"))
    x = torch.randn(2, 16, 8, 8)
    dep, report = deploy(model, check=False, return_report=True)
    _assert_same(model, dep, x)
    # The fold still happens (exactly): both producers of the group write in the unshuffled order.
    assert {"conv_a", "conv_b"} <= set(report.folded_shuffles)
    assert dep.conv_a._shuffle_g == 1 and dep.conv_b._shuffle_g == 1


# -- 2. a broadcast add ---------------------------------------------------------------------------------
class BroadcastAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = CompConv2d(16, 32, 3, padding=1, depth=1)
        self.one = nn.Conv2d(16, 1, 3, padding=1)
        self.h = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.c(x) + self.one(x))


def test_shuffle_fold_on_a_broadcast_add_is_exact() -> None:
    # Before: IndexError (the 1-channel conv was permuted as a producer of the 32-channel group).
    # perm(u) + v = perm(u + v) when v broadcasts over channels: c's group can still be folded, while
    # the 1-channel tensor is only *read* by the add (not part of c's group).
    torch.manual_seed(0)
    model = BroadcastAdd().eval()
    x = torch.randn(2, 16, 8, 8)
    dep, report = deploy(model, check=False, return_report=True)
    _assert_same(model, dep, x)
    assert report.folded_shuffles == ["c"]
    assert torch.equal(dep.one.weight, model.one.weight)  # the 1-channel conv is untouched


# -- 3. the fallback for untraceable models -------------------------------------------------------------
class Tapped(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it); ``direct``: the parent calls the conv too."""

    def __init__(self, direct: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.tail = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
        self.direct = direct

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.tail(self.body(x)) if x.sum() > -1e9 else -x
        if self.direct:
            return y, self.body[0](x)  # the conv's output, read outside the Sequential
        return y


def test_fallback_does_not_fold_a_tapped_conv_output() -> None:
    torch.manual_seed(0)
    taps: dict[str, torch.Tensor] = {}
    model = _randomize_bn(Tapped())
    model.body[0].register_forward_hook(lambda m, i, o: taps.__setitem__("conv", o.clone()))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    ref_tap = taps["conv"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dep, report = deploy(model, check=False, return_report=True)
    msgs = [str(m.message) for m in w]
    assert any("could not trace Tapped" in m for m in msgs)  # the warning names the model
    assert isinstance(dep.body[1], nn.BatchNorm2d)  # kept: the hook reads the conv's output
    assert "forward hooks" in report.kept_bn["body.1"]
    assert isinstance(dep.tail[1], nn.Identity)  # the untapped pair is still folded
    _assert_same(model, dep, x)
    assert (taps["conv"] - ref_tap).abs().max().item() < TOL  # the tap sees what it saw (off by 1.68 before)


def test_fallback_does_not_fold_a_conv_its_parent_also_calls() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(Tapped(direct=True))
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep, report = deploy(model, check=False, return_report=True)
    assert isinstance(dep.body[1], nn.BatchNorm2d)
    assert "outside its nn.Sequential" in report.kept_bn["body.1"]
    _assert_same(model, dep, x)


def test_traced_model_with_a_hook_tap_keeps_the_bn() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    taps: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda m, i, o: taps.append(o.clone()))
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dep = deploy(model, check=False)
    assert isinstance(dep[1], nn.BatchNorm2d)
    assert any("kept unfolded" in str(m.message) and "forward hooks" in str(m.message) for m in w)
    taps.clear()
    _outputs(model, x)
    _outputs(dep, x)
    assert (taps[0] - taps[1]).abs().max().item() < TOL


class AttributeTap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.feat = self.conv(x)  # read by the user after the forward: the graph does not show it
        return self.bn(self.feat)


def test_traced_model_that_stores_the_conv_output_keeps_the_bn() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(AttributeTap())
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="kept unfolded in AttributeTap: bn: the forward stores the conv's output"):
        dep, report = deploy(model, check=False, return_report=True)
    assert isinstance(dep.bn, nn.BatchNorm2d) and "module attribute" in report.kept_bn["bn"]
    assert isinstance(dep.feat, torch.Tensor)  # the tracer's placeholder (an fx.Proxy) is not left behind
    _assert_same(model, dep, x)
    assert (dep.feat - model.feat).abs().max().item() < TOL


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = CompConv2d(16, 16, 3, padding=1, depth=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def test_a_hook_on_a_block_sees_the_channel_order_it_saw() -> None:
    # Folding the shuffle would hand the block's hook permuted channels: a hooked module stays whole.
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Conv2d(16, 4, 1)).eval()
    taps: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda m, i, o: taps.append(o.clone()))
    x = torch.randn(2, 16, 8, 8)
    dep, report = deploy(model, check=False, return_report=True)
    assert "kept whole" in report.kept_shuffles["0.conv"]
    taps.clear()
    _assert_same(model, dep, x)
    assert (taps[0] - taps[1]).abs().max().item() < TOL
    unhooked = deploy(nn.Sequential(Block(), nn.Conv2d(16, 4, 1)).eval(), check=False)
    assert unhooked[0].conv._shuffle_g == 1  # without the hook the same shuffle is folded


# -- 4. parametrized convs ------------------------------------------------------------------------------
def _weight_norm_hook(conv: nn.Conv2d) -> nn.Conv2d:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(conv)


PARAMETRIZED = {
    "parametrizations.weight_norm": parametrizations.weight_norm,
    "parametrizations.spectral_norm": parametrizations.spectral_norm,
    "hook weight_norm": _weight_norm_hook,
    "hook spectral_norm": torch.nn.utils.spectral_norm,
}


@pytest.mark.parametrize("kind", list(PARAMETRIZED))
def test_bn_folds_into_a_parametrized_conv(kind: str) -> None:
    # Before: KeyError "attribute 'weight' already exists" (parametrizations) or a model whose forward
    # raised (hook API). Now the effective weight goes into a fresh plain conv.
    torch.manual_seed(0)
    conv = PARAMETRIZED[kind](nn.Conv2d(3, 8, 3, bias=False))
    model = _randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8)
    dep = deploy(model, check=False)
    assert type(dep[0]) is nn.Conv2d and isinstance(dep[1], nn.Identity)
    assert not dep[0]._forward_pre_hooks
    _assert_same(model, dep, x)
    folded = fold_bn_into_conv(model[0], model[1])
    with torch.no_grad():
        assert (folded(x) - model[1](model[0](x))).abs().max().item() < TOL


def test_fold_bn_into_conv_refuses_a_conv_subclass_with_its_own_forward() -> None:
    class StdConv(nn.Conv2d):  # weight standardisation: not linear in the weight
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mean, std = self.weight.mean((1, 2, 3), keepdim=True), self.weight.std((1, 2, 3), keepdim=True)
            w = (self.weight - mean) / (std + 1e-5)
            return self._conv_forward(x, w, self.bias)

    with pytest.raises(TypeError, match="StdConv is an nn.Conv2d subclass"):
        fold_bn_into_conv(StdConv(3, 8, 3), nn.BatchNorm2d(8))
    model = _randomize_bn(nn.Sequential(StdConv(3, 8, 3), nn.BatchNorm2d(8)))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dep, report = deploy(model, return_report=True)
    assert isinstance(dep[1], nn.BatchNorm2d) and "own forward" in report.kept_bn["1"]
    assert any("1 BatchNorm2d after a conv kept unfolded" in str(m.message) for m in w)
    _assert_same(model, dep, torch.randn(2, 3, 8, 8))


# -- 6. aliases and tied convs --------------------------------------------------------------------------
class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)  # registered first: torch.fx names the call "conv"
        self.body = nn.Sequential(self.conv, nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_bn_fold_replaces_an_aliased_conv_at_every_name() -> None:
    # Before: the folded conv went to "conv" only, body.0 stayed the unfolded conv, body.1 became
    # Identity: the BN was lost (off by ~1.5).
    torch.manual_seed(0)
    model = _randomize_bn(Aliased())
    dep, report = deploy(model, check=False, return_report=True)
    assert dep.conv is dep.body[0] and isinstance(dep.body[1], nn.Identity)
    assert report.folded_bn == [("conv", "body.1")]
    _assert_same(model, dep, torch.randn(2, 3, 8, 8))


class Tied(nn.Module):
    def __init__(self, twice: bool) -> None:
        super().__init__()
        shared = nn.Conv2d(3, 8, 3)
        self.a = nn.Sequential(shared, nn.BatchNorm2d(8))
        self.b = nn.Sequential(shared, nn.BatchNorm2d(8))
        self.twice = twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) if self.twice else self.a(x)


def test_a_conv_shared_by_two_parents() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    # Run twice (once per BN): no BN can go into it.
    model = _randomize_bn(Tied(twice=True))
    with pytest.warns(UserWarning, match="2 BatchNorm2d after a conv kept unfolded in Tied: a.1: the conv or the BN"):
        dep, report = deploy(model, check=False, return_report=True)
    assert isinstance(dep.a[1], nn.BatchNorm2d) and isinstance(dep.b[1], nn.BatchNorm2d)
    assert "more than once" in report.kept_bn["a.1"]
    assert dep.a[0] is dep.b[0]  # still one module
    _assert_same(model, dep, x)
    # Run once: folded, and the one folded conv sits at both names.
    model = _randomize_bn(Tied(twice=False))
    dep = deploy(model, check=False)
    assert dep.a[0] is dep.b[0] and isinstance(dep.a[1], nn.Identity)
    _assert_same(model, dep, x)


# -- 7. the last line of defence ------------------------------------------------------------------------
def _comp_model() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(
        nn.Sequential(CompConv2d(8, 16, 3, padding=1, depth=2), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    )


def test_check_names_the_rewrite_that_changed_the_output(monkeypatch) -> None:
    real = deploy_pkg._fold_shuffles

    def broken(facts):  # the real pass, then one weight off: what a wrong rewrite would do
        res = real(facts)
        with torch.no_grad():
            facts.model[3].weight.mul_(1.5)
        return res

    monkeypatch.setattr(deploy_pkg, "_fold_shuffles", broken)
    model = _comp_model()
    msg = r"the 'fold_shuffle' rewrite changed Sequential's output.*fold_shuffle=False avoids"
    with pytest.raises(RuntimeError, match=msg):
        deploy(model)
    deploy(model, check=False)  # skipped on request
    monkeypatch.undo()

    real_comp = deploy_pkg.deploy_compconvs

    def broken_comp(model, bns):
        names = real_comp(model, bns)
        model[0].shift.add_(1.0)  # the CompConv's BN folded with a wrong shift
        return names

    monkeypatch.setattr(deploy_pkg, "deploy_compconvs", broken_comp)
    with pytest.raises(RuntimeError, match="the 'compconv' rewrite changed"):
        deploy(model)


def test_deploy_keeps_the_original_intact_and_reports_the_checks() -> None:
    model = _comp_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dep, report = deploy(model, return_report=True)
    assert model.training and isinstance(model[0], CompConv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(dep[0], DeployedCompConv2d) and isinstance(dep[1], nn.Identity)
    # The example input: (2, C_in of the first conv = 8, 32, 32), the first size in EXAMPLE_SIZES.
    assert report.example_input_shapes == [(2, 8, 32, 32)]
    assert set(report.max_error) == {"all rewrites"} and report.max_error["all rewrites"] < 1e-4
    assert "1 BN folded" in str(report)


def test_example_input_is_built_at_a_size_the_model_accepts() -> None:
    class Big(nn.Module):  # accepts only inputs of at least 64x64
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(5, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._assert(x.shape[-1] >= 64, "too small")
            return self.conv(x)

    assert example_input_for(Big()).shape == (2, 5, 64, 64)

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + y

    with pytest.raises(ValueError, match=r"could not build an example input for TwoInputs.*example_input="):
        deploy(TwoInputs())
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 6, 6)
    model = TwoInputs().eval()
    dep = deploy(model, example_input=(x, y))
    with torch.no_grad():
        assert (dep(x, y) - model(x, y)).abs().max() == 0
    with pytest.raises(ValueError, match="has no Conv2d"):
        deploy(nn.Linear(3, 4))
    assert isinstance(deploy(nn.Linear(3, 4), check=False), nn.Linear)


# -- 5. timm's BatchNormAct2d -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["regnetx_002", "mobilenetv3_large_100", "efficientnet_b0"])
def test_timm_batchnormact_is_folded_and_its_activation_kept(name: str) -> None:
    # Before: all 44-49 BatchNormAct2d left unfolded without a word (torch.fx traced through them).
    timm = pytest.importorskip("timm")
    from timm.layers.norm_act import BatchNormAct2d

    torch.manual_seed(0)
    model = _randomize_bn(timm.create_model(name, pretrained=False, num_classes=10))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    acts = sum(not isinstance(m.act, nn.Identity) for m in model.modules() if isinstance(m, BatchNormAct2d))
    assert n_bn >= 44 and acts > 0
    x = torch.randn(2, 3, 32, 32)
    dep, report = deploy(model, example_input=x, check=False, return_report=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules())
    assert len(report.folded_bn) == n_bn and not report.kept_bn
    _assert_same(model, dep, x)


def test_a_deployed_compconv_takes_unbatched_input_like_the_converted_model() -> None:
    # Review finding: the converted model accepted (C, H, W), its deployed copy raised in _fused_output.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1))
    compconv.convert(m, "compconv")
    m.eval()
    x = torch.randn(3, 16, 16)
    ref = m(x)
    for collapse in (False, "lowrank"):
        got = compconv.deploy(m, collapse_1x1=collapse)(x)
        assert got.shape == ref.shape == (32, 16, 16)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_a_deployed_model_refuses_training_mode_with_a_clear_error() -> None:
    # Review finding: .train() on the eval-only deployed model was silently allowed (its BNs are folded away).
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    compconv.convert(m, "compconv")
    fast = compconv.deploy(m.eval())
    fast.train()
    with pytest.raises(RuntimeError, match="eval-only"):
        fast(torch.randn(2, 3, 8, 8))
    fast.eval()
    assert fast(torch.randn(2, 3, 8, 8)).shape == (2, 16, 8, 8)
    again = compconv.deploy(fast)  # deploying a deployed model keeps one guard
    assert len(again._forward_pre_hooks) == 1


def test_a_deployed_bare_module_is_returned_in_eval_mode() -> None:
    # deploy(CompConv2d) builds a fresh DeployedCompConv2d, which nn.Module creates in training mode.
    fast = compconv.deploy(CompConv2d(16, 16, 3, padding=1, depth=2).eval())
    assert not fast.training
