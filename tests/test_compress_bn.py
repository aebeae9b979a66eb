"""BatchNorm statistics after compress: reparametrize_bn keeps the eval outputs and makes training mode agree."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compconv
from compconv.compress import compress, reparametrize_bn
from train_helpers import CIFAR, needs_cifar

pytestmark = pytest.mark.usefixtures("one_thread")


def _mismatched_resnet20() -> nn.Module:
    """A ResNet-20 whose BN running statistics are not those of its own activations (as after a warm start)."""
    torch.manual_seed(0)
    model = compconv.get_model("cifar_resnet20")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.2, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


def test_eval_outputs_are_kept_and_the_statistics_are_the_inputs_own() -> None:
    model = _mismatched_resnet20()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
        stem = model.conv1(x).double()  # bn1's input, by hand
    assert reparametrize_bn(model, [x[:32], x[32:]]) == 19  # every BN of ResNet-20
    assert not model.training
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    flat = stem.transpose(0, 1).reshape(16, -1)
    assert torch.allclose(model.bn1.running_mean.double(), flat.mean(1), rtol=1e-5, atol=1e-6)
    assert torch.allclose(model.bn1.running_var.double(), flat.var(1, unbiased=True), rtol=1e-5, atol=1e-6)
    # training mode (batch statistics) now computes nearly what eval mode does; before, it did not
    mismatched = _mismatched_resnet20().train()
    with torch.no_grad():
        train_before = mismatched(x)
        train_after = copy.deepcopy(model).train()(x)
    err = lambda y: ((y - after).norm() / after.norm()).item()  # noqa: E731
    assert err(train_after) < 0.01 < 0.3 < err(train_before)


def test_a_bn_without_affine_or_statistics_is_left_alone_and_empty_batches_are_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.BatchNorm2d(4,
                          track_running_stats=False)).eval()
    state = copy.deepcopy(model.state_dict())
    assert reparametrize_bn(model, [torch.randn(2, 3, 8, 8)]) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="reparametrize_bn needs at least one calibration batch"):
        reparametrize_bn(model, [])
    with pytest.raises(ValueError, match="reparametrize_bn needs at least one calibration batch"):
        reparametrize_bn(model, iter([]))  # an empty generator is empty too


def test_it_takes_what_compress_takes_and_refuses_non_finite_inputs() -> None:
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    counts = []
    for calib in (x, [x], [(x, torch.zeros(16))], torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, torch.zeros(16)), batch_size=8)):
        model = _mismatched_resnet20()
        counts.append(reparametrize_bn(model, calib))
    assert counts == [19] * 4
    model = _mismatched_resnet20()
    state = copy.deepcopy(model.state_dict())
    bad = x.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"batch 0 holds non-finite values \(NaN or inf\)"):
        reparametrize_bn(model, [bad])
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("inf")  # finite inputs, non-finite activations
    with pytest.raises(ValueError, match=r"the input of BN 'bn1' has non-finite values on these batches; nothing "
                                         r"was changed"):
        reparametrize_bn(model, [x])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if k != "conv1.weight")


def test_compress_with_reparametrized_bn_computes_the_same_and_says_so() -> None:
    model = compconv.get_model("cifar_resnet20").eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    plain, rep = compress(model, "compconv", 0.6, calib, rule="eq6")
    kept, rep_k = compress(model, "compconv", 0.6, calib, rule="eq6", reparametrize_bn_stats=True)
    assert rep.bn_reparametrized == 0 and rep_k.bn_reparametrized == 19 and rep_k.bn_reestimated == 0
    assert "BN re-parametrised (outputs kept): 19" in rep_k.table()
    assert rep_k.to_dict()["bn_reparametrized"] == 19
    x = torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        a, b = plain.eval()(x), kept.eval()(x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert not torch.equal(plain.bn1.running_mean, kept.bn1.running_mean)
    with pytest.raises(ValueError, match="reparametrize_bn_stats=True keeps the outputs and reestimate_bn_stats=True "
                                         "changes them: choose one"):
        compress(model, "compconv", 0.6, calib, rule="eq6", reparametrize_bn_stats=True, reestimate_bn_stats=True)
    with pytest.raises(ValueError, match="reparametrize_bn_stats must be True or False, but got 'yes'"):
        compress(model, "compconv", 0.6, calib, rule="eq6", reparametrize_bn_stats="yes")
    with pytest.raises(ValueError, match="reparametrize_bn_stats=True keeps a warm start's outputs; without a warm "
                                         "start BN is re-estimated"):  # it used to skip the re-estimation silently
        compress(model, "compconv", 0.6, calib, rule="eq6", reparametrize_bn_stats=True, warm_start=False)


@needs_cifar
def test_the_cli_flag_reaches_compress(monkeypatch, tmp_path) -> None:
    seen: dict = {}

    def fake_compress(model, method, budget, calib, **kw):  # noqa: ANN001, ANN202
        seen.update(kw)
        raise RuntimeError("stop: nothing is written")

    import importlib

    monkeypatch.setattr(importlib.import_module("compconv.compress"), "compress", fake_compress)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    weights = tmp_path / "run" / "checkpoints" / "last.pt"
    torch.save(compconv.get_model("cifar_resnet20").state_dict(), weights)
    from compconv.cli import main

    # --weights takes a run directory (its checkpoints/last.pt), as --teacher and compconv eval do
    for w, flag, want in ((weights, [], False), (tmp_path / "run", ["--reparametrize-bn"], True)):
        with pytest.raises(RuntimeError, match="stop"):
            main(["compress", "--model", "cifar_resnet20", "--weights", str(w), "--budget", "0.5",
                  "--data-dir", str(CIFAR), "--calib-images", "16", "--threads", "1", "--out", str(tmp_path / "o.pt"),
                  *flag])
        assert seen["reparametrize_bn_stats"] is want
    assert not (tmp_path / "o.pt").exists()


def test_compress_refuses_an_out_directory_before_compressing(tmp_path, capsys) -> None:
    from compconv.cli import main

    for out in (str(tmp_path), str(tmp_path / "new") + "/"):  # an existing one; one to be (a trailing slash)
        assert main(["compress", "--model", "cifar_resnet20", "--weights", str(tmp_path / "w.pt"), "--budget", "0.5",
                     "--out", out]) == 2
        assert f"--out {out!r} is a directory; pass the file to write, e.g." in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
