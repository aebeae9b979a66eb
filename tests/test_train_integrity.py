"""Every input path that reads weights goes through one integrity-checked loader (``read_verified``).

Real files written here (a cifar_resnet20 state, a ``compconv.save`` file, a plain state_dict) get bytes
changed inside a weight tensor's stored data; each path must refuse them naming the file.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

import compconv
from compconv.cli import main
from compconv.train import sources
from compconv.train.checkpoint import CheckpointError, read_verified


def _xor_inside_a_tensor(path: Path) -> None:
    """XOR 8 bytes in the middle of the largest tensor's stored (uncompressed) data."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    blob = bytearray(path.read_bytes())
    # local header: 30 bytes + name + extra, then the stored data
    n, m = struct.unpack("<HH", blob[info.header_offset + 26 : info.header_offset + 30])
    at = info.header_offset + 30 + n + m + info.file_size // 2
    for i in range(8):
        blob[at + i] ^= 0x5A
    path.write_bytes(bytes(blob))


@pytest.fixture()
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return compconv.get_model("cifar_resnet20", num_classes=10)


@pytest.fixture()
def damaged_save(tmp_path: Path, model: torch.nn.Module) -> Path:
    p = compconv.save(model, tmp_path / "comp.pt", base="cifar_resnet20", base_kwargs={"num_classes": 10})
    compconv.load(p)  # intact: loads
    _xor_inside_a_tensor(p)
    return p


def test_damaged_compconv_save_is_refused_on_every_path(damaged_save: Path, model: torch.nn.Module) -> None:
    p = damaged_save
    with pytest.raises(CheckpointError, match=rf"compconv model file '{p}'.* fails its CRC-32 check"):
        compconv.load(p)
    with pytest.raises(CheckpointError, match=rf"weights '{p}'.* CRC-32"):
        sources.load_weights(model, p)
    with pytest.raises(CheckpointError, match=rf"init '{p}'.* CRC-32"):
        sources.arch_of_save(p)
    with pytest.raises(CheckpointError, match=rf"teacher '{p}'.* CRC-32"):
        sources.build_teacher(str(p), None, 10)


def test_damaged_plain_state_dict_and_non_finite_weights_are_refused(tmp_path: Path,
                                                                      model: torch.nn.Module) -> None:
    p = tmp_path / "sd.pt"
    torch.save(model.state_dict(), p)
    sources.load_weights(model, p)  # intact: loads
    _xor_inside_a_tensor(p)
    with pytest.raises(CheckpointError, match=rf"weights '{p}'.* CRC-32"):
        sources.load_weights(model, p)
    sd = model.state_dict()
    sd["fc.weight"] = sd["fc.weight"].clone()
    sd["fc.weight"][0, 0] = float("nan")
    q = tmp_path / "nan.pt"
    torch.save(sd, q)
    with pytest.raises(CheckpointError, match=rf"'{q}' holds non-finite values in 'fc.weight'"):
        read_verified(q, "weights file")
    with pytest.raises(CheckpointError, match="non-finite"):
        sources.load_weights(model, q)


def test_cli_eval_and_compress_exit_non_zero_on_a_damaged_file(damaged_save: Path, capsys) -> None:
    assert main(["eval", str(damaged_save), "--no-progress"]) != 0
    assert "CRC-32" in capsys.readouterr().err
    rc = main(["compress", "--model", "cifar_resnet20", "--weights", str(damaged_save), "--budget", "0.5", "--out",
               str(damaged_save.with_name("out.pt"))])
    assert rc != 0
    assert "CRC-32" in capsys.readouterr().err
    assert not damaged_save.with_name("out.pt").exists()


def test_a_teacher_init_or_weights_trained_on_other_classes_is_refused(tmp_path: Path) -> None:
    # Review finding: a teacher trained where `cat` was named `zcat` was accepted: its logit j meant another
    # class than label j, and distillation silently mixed up labels.
    from compconv.train.engine import train
    from train_helpers import tiny_folder_config, tiny_tree

    other = tiny_tree(tmp_path / "other", classes=("airplane", "zcat"))
    data = tiny_tree(tmp_path / "data", classes=("airplane", "cat"))
    train(tiny_folder_config(other, tmp_path / "runs", name="teacher", max_steps=1, epochs=1), command="pytest")
    ckpt = tmp_path / "runs" / "teacher" / "checkpoints" / "last.pt"
    assert sources.recorded_classes(ckpt, "teacher") == ["airplane", "zcat"]
    for kw in ({"teacher": str(tmp_path / "runs" / "teacher")}, {"weights": str(ckpt)}):
        cfg = tiny_folder_config(data, tmp_path / "runs", name=f"student-{next(iter(kw))}", max_steps=1, epochs=1,
                                 **kw)
        with pytest.raises(ValueError, match=r"trained on the classes \['airplane', 'zcat'\].*differing names"):
            train(cfg, command="pytest")
    # the same classes pass the check (and the run trains)
    res = train(tiny_folder_config(other, tmp_path / "runs", name="ok", max_steps=1, epochs=1,
                                   teacher=str(tmp_path / "runs" / "teacher")), command="pytest")
    assert res["epochs_done"] == 1


def test_init_gives_the_model_and_a_conflicting_model_is_refused(tmp_path: Path) -> None:
    # Review finding: `--init FILE --model cifar_resnet56` trained FILE's ResNet-20 but recorded cifar_resnet56.
    from compconv.train.engine import train
    from train_helpers import tiny_folder_config, tiny_tree

    data = tiny_tree(tmp_path / "data", classes=("airplane", "cat"))
    init = compconv.save(compconv.get_model("cifar_resnet20", num_classes=2), tmp_path / "init.pt",
                         base="cifar_resnet20", base_kwargs={"num_classes": 2})
    with pytest.raises(ValueError, match="holds a 'cifar_resnet20' model, but model='cifar_resnet56'"):
        train(tiny_folder_config(data, tmp_path / "runs", name="bad", model="cifar_resnet56", init=str(init),
                                 max_steps=1, epochs=1), command="pytest")
    res = train(tiny_folder_config(data, tmp_path / "runs", name="ok", init=str(init), max_steps=1, epochs=1),
                command="pytest")
    assert res["config"]["model"] == "cifar_resnet20"
