"""Only plain nn.Conv2d layers are converted (and timm Conv2dSame where an explicit padding is exact)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from compconv import CompConv2d, convert
from compconv.eligibility import plain_conv_view, same_padding_amounts


def _host(conv: nn.Module, c_in: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, c_in, 3, padding=1), conv)


def _kept_reason(conv: nn.Module, **kw: object) -> str:
    model = _host(conv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "converted 0": asserted elsewhere
        _, rep = convert(model, "compconv", depth=1, return_report=True, **kw)  # type: ignore[arg-type]
    assert model[1] is conv and rep.layers[1].action == "kept"
    return rep.layers[1].reason


def test_tf_same_padding_by_input_size_mod_stride() -> None:
    # timm: pad = max((ceil(i/s) - 1) s + (k - 1) d + 1 - i, 0). k=3, s=2: i even -> (i/2-1)*2 + 3 - i = 1,
    # i odd -> ((i+1)/2 - 1)*2 + 3 - i = 2. k=3, s=1: 2 for every i. k=1, s=2: 0 for every i.
    assert same_padding_amounts(3, 2, 1) == [1, 2]
    assert same_padding_amounts(3, 1, 1) == [2]
    assert same_padding_amounts(1, 2, 1) == [0, 0]
    assert same_padding_amounts(3, 1, 2) == [4]  # dilation 2: (k - 1) d = 4


def test_timm_conv2d_same_with_asymmetric_padding_is_kept_and_the_output_size_unchanged() -> None:
    timm = pytest.importorskip("timm")
    conv = timm.layers.Conv2dSame(16, 16, 3, stride=2)
    model = _host(conv)
    x = torch.randn(1, 3, 32, 32)
    assert model(x).shape == (1, 16, 16, 16)  # TF "same": ceil(32 / 2) = 16, padding 0 before and 1 after
    with pytest.warns(UserWarning, match="converted 0"):
        _, rep = convert(model, "compconv", depth=1, input_size=(1, 3, 32, 32), return_report=True)
    assert model[1] is conv and "asymmetric" in rep.layers[1].reason
    assert model(x).shape == (1, 16, 16, 16)  # not the 15x15 a padding-0 replacement gives


@pytest.mark.parametrize(("k", "s"), [(3, 1), (5, 1), (1, 2)])
def test_timm_conv2d_same_with_exact_padding_is_converted(k: int, s: int) -> None:
    timm = pytest.importorskip("timm")
    model = _host(timm.layers.Conv2dSame(16, 16, k, stride=s))
    for size in (15, 16):  # the padding is the same at every input size
        expected = model(torch.randn(1, 3, size, size)).shape
        m2 = _host(timm.layers.Conv2dSame(16, 16, k, stride=s))
        _, rep = convert(m2, "compconv", depth=1, input_size=(1, 3, size, size), return_report=True)
        assert isinstance(m2[1], CompConv2d) and "Conv2dSame as nn.Conv2d" in rep.layers[1].reason
        assert m2[1].padding == ((k - 1) // 2, (k - 1) // 2) and m2(torch.randn(1, 3, size, size)).shape == expected


def test_timm_weight_standardised_convs_are_kept() -> None:
    timm = pytest.importorskip("timm")
    assert "weight standardisation" in _kept_reason(timm.layers.StdConv2d(16, 16, 3, padding=1))
    assert "scaled weight standardisation" in _kept_reason(timm.layers.ScaledStdConv2d(16, 16, 3, padding=1))


def test_qat_convs_are_kept() -> None:
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.nn.qat as nnqat
    from torch.ao.quantization import get_default_qat_qconfig

    qconfig = get_default_qat_qconfig()
    assert "fused with BN" in _kept_reason(nniqat.ConvBn2d(16, 16, 3, padding=1, qconfig=qconfig))
    assert "fake-quant" in _kept_reason(nnqat.Conv2d(16, 16, 3, padding=1, qconfig=qconfig))


def test_parametrized_and_legacy_normalised_convs_are_kept() -> None:
    from torch.nn.utils import parametrizations

    assert "_WeightNorm on weight" in _kept_reason(parametrizations.weight_norm(nn.Conv2d(16, 16, 3, padding=1)))
    assert "_SpectralNorm on weight" in _kept_reason(parametrizations.spectral_norm(nn.Conv2d(16, 16, 3, padding=1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        legacy = torch.nn.utils.weight_norm(nn.Conv2d(16, 16, 3, padding=1))
    assert "weight_g" in _kept_reason(legacy)


def test_a_conv_with_a_forward_hook_is_kept() -> None:
    conv = nn.Conv2d(16, 16, 3, padding=1)

    def scale(mod: nn.Module, inp: object, out: torch.Tensor) -> torch.Tensor:
        return out * 2

    conv.register_forward_hook(scale)
    assert "forward hooks (scale)" in _kept_reason(conv)


def test_other_conv2d_subclasses_are_kept_with_their_class_named() -> None:
    class MyConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).clamp(min=0)

    reason = _kept_reason(MyConv(16, 16, 3, padding=1))
    assert "MyConv is not a plain nn.Conv2d" in reason


def test_uninitialised_lazy_conv_is_kept_and_converted_once_input_size_runs_it() -> None:
    model = _host(nn.LazyConv2d(16, 3, padding=1))
    with pytest.warns(UserWarning, match="converted 0"):
        _, rep = convert(model, "compconv", depth=1, return_report=True)
    assert "uninitialised LazyConv2d" in rep.layers[1].reason and rep.layers[1].params_before == 0
    # With input_size the traced forward initialises it (in_channels = 16): it is then a plain nn.Conv2d.
    _, rep = convert(model, "compconv", depth=1, input_size=(1, 3, 8, 8), return_report=True)
    assert isinstance(model[1], CompConv2d) and model[1].in_channels == 16
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 16, 8, 8)


def test_plain_conv_view_of_a_plain_conv_is_itself() -> None:
    conv = nn.Conv2d(4, 4, 3)
    assert plain_conv_view(conv) == (conv, "")


def _noop(*args: object) -> None:
    return None


# (how the hook is registered, the kind the reason must name); every hook dict nn.Module has in torch 2.x
HOOKS = [
    ("register_forward_hook", "forward hooks (_noop)"),
    ("register_forward_pre_hook", "forward pre hooks (_noop)"),
    ("register_full_backward_hook", "backward hooks (_noop)"),
    ("register_full_backward_pre_hook", "backward pre hooks (_noop)"),
    ("register_backward_hook", "legacy backward hooks (register_backward_hook) (_noop)"),
    ("_register_state_dict_hook", "state dict hooks (_noop)"),
    ("register_state_dict_pre_hook", "state dict pre hooks (_noop)"),
    ("register_load_state_dict_pre_hook", "load state dict pre hooks (_noop)"),
    ("register_load_state_dict_post_hook", "load state dict post hooks (_noop)"),
]


@pytest.mark.parametrize(("register", "kind"), HOOKS, ids=[r for r, _ in HOOKS])
def test_a_conv_with_any_kind_of_hook_is_kept_with_the_kind_named(register: str, kind: str) -> None:
    # A replacement is a new module object: a backward / state-dict hook on the conv was silently dropped.
    conv = nn.Conv2d(16, 16, 3, padding=1)
    getattr(conv, register)(_noop)
    reason = _kept_reason(conv)
    assert f"conv with {kind}: a compact conv would drop them" == reason


def test_every_hook_dict_of_nn_module_is_checked() -> None:
    # A hook kind torch adds later must not slip through: every non-empty *hook* dict of a conv keeps it.
    conv = nn.Conv2d(16, 16, 3, padding=1)
    dicts = sorted(k for k, v in vars(conv).items() if "hook" in k and isinstance(v, dict))
    assert {"_backward_hooks", "_backward_pre_hooks", "_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks",
            "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"} <= set(dicts)
    for name in dicts:
        c = nn.Conv2d(16, 16, 3, padding=1)
        getattr(c, name)[0] = _noop  # what any register_* does
        view, why = plain_conv_view(c)
        if name.endswith(("_with_kwargs", "_always_called")):  # flags of a hook in the main dict: none here
            assert view is c, name
        else:
            assert view is None and "a compact conv would drop them" in why, name
    c = nn.Conv2d(16, 16, 3, padding=1)
    c.register_forward_hook(_noop, with_kwargs=True, always_call=True)
    assert plain_conv_view(c)[1] == "conv with forward hooks (_noop): a compact conv would drop them"
