"""compconv.save / compconv.load (compconv.serialization)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

import compconv
from compconv.serialization import load, save

pytestmark = pytest.mark.usefixtures("one_thread")


def _converted():
    torch.manual_seed(0)
    model = compconv.get_model("cifar_resnet20")
    # per-layer options that a plain convert(model, "compconv") would not give: load must not need them
    model, report = compconv.convert(model, "compconv", include=["layer2.*", "layer3.0.conv1"],
                                     overrides={"layer2.1.conv1": {"depth": 2}}, return_report=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval(), report


@pytest.mark.slow
def test_round_trip_in_a_new_process(tmp_path):
    model, report = _converted()
    path = save(model, tmp_path / "m.pt", base="cifar_resnet20", base_kwargs={"num_classes": 10},
                conversion=report)
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary file left
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    code = (f"import torch, compconv; m = compconv.load(r'{path}'); "
            f"torch.save(m(torch.load(r'{tmp_path / 'x.pt'}')), r'{tmp_path / 'y.pt'}')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x), rtol=0, atol=0)
    again = load(path)
    assert type(again.get_submodule("layer2.1.conv1")).__name__ == "CompConv2d"
    assert again.get_submodule("layer2.1.conv1").depth == 2
    assert type(again.get_submodule("layer1.0.conv1")).__name__ == "Conv2d"  # not converted, stays so


def test_load_into_a_given_model_and_errors(tmp_path):
    model, report = _converted()
    path = save(model, tmp_path / "nobase.pt", conversion=report)
    with pytest.raises(ValueError, match="records no base model; pass model="):
        load(path)
    got = load(path, model=compconv.get_model("cifar_resnet20"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), model(x), rtol=0, atol=0)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a compconv model file"):
        load(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.pt' is corrupt or truncated"):
        load(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="prefix must be 'torchvision:' or 'timm:'"):
        save(model, tmp_path / "x.pt", base="keras:resnet")
    with pytest.raises(ValueError, match="base='cifar_resnet21' cannot be built.*unknown model 'cifar_resnet21'"):
        save(compconv.get_model("cifar_resnet20"), tmp_path / "bad.pt", base="cifar_resnet21")
    assert not (tmp_path / "bad.pt").exists()


def test_load_names_a_training_checkpoint_and_a_wrong_model(tmp_path) -> None:
    """A run's checkpoint is intact, not corrupt: the error says what it is and what takes it."""
    ckpt = compconv.get_model("cifar_resnet20").state_dict()
    torch.save({"format_version": 1, "model": ckpt, "rng": {"numpy": __import__("numpy").random.get_state()}},
               tmp_path / "last.pt")  # RNG states are pickled objects, as in compconv train's checkpoints
    with pytest.raises(ValueError, match=r"last.pt is not a compconv model file .* compconv train's checkpoints .*"
                                         r"compconv eval RUN_DIR") as e:
        load(tmp_path / "last.pt")
    assert "corrupt" not in str(e.value)
    model, report = _converted()
    path = save(model, tmp_path / "nobase.pt", conversion=report)
    with pytest.raises(ValueError, match=r"the model= given, converted as recorded, does not take the file's "
                                         r"weights: is it the model the file was saved from\?"):
        load(path, model=compconv.get_model("cifar_resnet32"))
    with_base = save(model, tmp_path / "base.pt", base="cifar_resnet20", conversion=report)
    payload = torch.load(with_base, weights_only=True)
    del payload["state_dict"]["fc.bias"]  # weights that no longer fit the recorded base
    torch.save(payload, with_base)
    with pytest.raises(ValueError, match=r"base 'cifar_resnet20', converted as recorded, does not take the file's "
                                         r"weights: .*fc.bias"):
        load(with_base)


def test_load_of_a_directory_says_so_and_names_its_checkpoints(tmp_path, capsys) -> None:
    """A run directory given where a file is read is not "missing": the error says what it is."""
    (tmp_path / "checkpoints").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "last.pt")
    # not the checkpoints inside: load does not read those either (it says what does)
    with pytest.raises(IsADirectoryError, match=r"compconv model file '.*' is a directory, not a file; compconv.load "
                                                r"reads a file written by compconv.save or compconv compress --out "
                                                r"\(a training run's directory is read by compconv eval RUN_DIR"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"compconv model file '/dev/null' is not a regular file"):
        load("/dev/null")
    with pytest.raises(FileNotFoundError, match=r"compconv model file '.*nothing.pt' does not exist"):
        load(tmp_path / "nothing.pt")
    from compconv.cli import main

    # the CLI reports it as one line (exit 2), as it does a missing file
    assert main(["train", "--model", "cifar_resnet20", "--weights", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compconv train: error: weights file ") and "is a directory, not a file; the checkpoints " \
        "in it: " in err
    assert "Traceback" not in err


def test_a_zoo_model_built_compact_saves_with_its_base(tmp_path) -> None:
    """comp128_cifar_vgg16 (Table 6's Bin-Comp model) builds its CompConv layers itself: no conversion to record."""
    torch.manual_seed(0)
    model = compconv.binarize(compconv.get_model("comp128_cifar_vgg16")).eval()
    back = load(save(model, tmp_path / "bin_comp.pt", base="comp128_cifar_vgg16"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), model(x))
    # a conversion the base does not make must still be recorded
    with pytest.raises(ValueError, match=r"compact layers that conversion does not record, .*\['features.3'"):
        save(compconv.convert(compconv.get_model("cifar_vgg16"), "compconv", c0=128), tmp_path / "c.pt",
             base="cifar_vgg16")


def test_save_refuses_a_base_that_does_not_rebuild_the_model(tmp_path) -> None:
    """A wrong base (or num_classes) saved silently would only fail at load(), when the model may be gone."""
    model, report = _converted()
    with pytest.raises(ValueError, match=r"base='cifar_resnet56', converted as recorded, does not rebuild this "
                                         r"model.*keys only in the rebuilt one: \['layer1.3"):
        save(model, tmp_path / "a.pt", base="cifar_resnet56", conversion=report)
    with pytest.raises(ValueError, match=r"base_kwargs=\{'num_classes': 100\}.*shapes differ: \['fc.weight: "
                                         r"\(10, 64\) here, \(100, 64\) rebuilt"):
        save(model, tmp_path / "b.pt", base="cifar_resnet20", base_kwargs={"num_classes": 100}, conversion=report)
    with pytest.raises(ValueError, match="base='cifar_resnet20' converted as recorded fails"):
        save(compconv.get_model("cifar_resnet20"), tmp_path / "c.pt", base="cifar_resnet20",
             conversion={"method": "compconv", "layers": {"layer1.0.conv1": {"depth": "deep"}}})
    assert not list(tmp_path.iterdir())


def test_torchvision_base_round_trip(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model, report = compconv.convert(model, "ghost", include=["layer4.*"], return_report=True)
    path = save(model.eval(), tmp_path / "tv.pt", base="torchvision:resnet18", base_kwargs={"num_classes": 10},
                conversion=report)
    got = load(path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown torchvision model"):
        save(model, tmp_path / "u.pt", base="torchvision:resnet19", conversion=report)


def test_save_refuses_compact_layers_it_would_not_record(tmp_path) -> None:
    import compconv

    model = compconv.convert(compconv.get_model("cifar_resnet20"), "compconv", c0=16)
    with pytest.raises(ValueError, match="conversion does not record.*layer1.0.conv1"):
        compconv.save(model, tmp_path / "m.pt", base="cifar_resnet20")
    assert not (tmp_path / "m.pt").exists()


def test_saved_file_has_the_usual_permissions(tmp_path) -> None:
    """Written through a temporary file (mode 0600) but left as ``open()`` would: 0666 less the umask."""
    old = os.umask(0o022)
    try:
        path = compconv.save(compconv.get_model("cifar_resnet20"), tmp_path / "m.pt", base="cifar_resnet20")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
