"""Image folders never mislabel: hidden entries, empty classes, bad images, class names, subsets (no CIFAR needed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import compconv.train.images as images_mod
from compconv.train.config import TrainConfig
from compconv.train.data import _remap, build_data, match_classes
from compconv.train.images import BadImageError, load_small_folder, scan_folder


def _write(root: Path, split: str, classes: dict[str, int], size: int = 8, fmt: str = "png") -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for c, n in classes.items():
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = root / split / c / f"{i:03d}.{fmt}"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
            out.append(p)
    return out


def _cfg(root: Path, tmp: Path, **kw: object) -> TrainConfig:
    cfg = TrainConfig(dataset="folder", data_dir=str(root), batch_size=4, cache_dir=str(tmp / "cache"), workers=0)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg.validate()


def _hide(root: Path) -> None:
    """What notebooks and macOS zips leave behind: hidden folders and AppleDouble files."""
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()
        (root / split / "__MACOSX" / "a").mkdir(parents=True)
        (root / split / "__MACOSX" / "a" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (root / split / "a" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")


@pytest.mark.parametrize("size", [8, 72])  # the small-image array path and the large-image DataLoader path
def test_hidden_folders_and_files_are_never_classes_or_images(tmp_path: Path, size: int) -> None:
    root = tmp_path / "d"
    _write(root, "train", {"a": 2, "b": 2}, size=size)
    _write(root, "val", {"a": 1, "b": 1}, size=size)
    _hide(root)
    paths, labels, classes = scan_folder(root, "train")
    assert classes == ["a", "b"] and labels == [0, 0, 1, 1]
    assert all("/._" not in p and "__MACOSX" not in p for p in paths)
    b = build_data(_cfg(root, tmp_path))
    # before: the small path made '.ipynb_checkpoints' label 0 of a 4-output model
    assert (b.classes, b.n_train, b.n_eval) == (["a", "b"], 4, 2)
    assert b.kind == ("array" if size <= 64 else "folder")
    ys = sorted(int(v) for _, y in b.train for v in y)
    assert ys == [0, 0, 1, 1]


@pytest.mark.parametrize("size", [8, 72])
def test_an_empty_class_folder_is_refused_on_both_paths(tmp_path: Path, size: int) -> None:
    root = tmp_path / "d"
    _write(root, "train", {"a": 2, "b": 2}, size=size)
    _write(root, "val", {"a": 1, "b": 1}, size=size)
    (root / "train" / "c").mkdir()
    with pytest.raises(ValueError, match=r"no images found under '.*train/c': an empty class folder"):
        build_data(_cfg(root, tmp_path))


def _bad_files(d: Path) -> dict[str, Path]:
    """A real truncated JPEG, a zero-byte file and a text file named .jpg."""
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buf, "JPEG")
    files = {"truncated": d / "t.jpg", "empty": d / "z.jpg", "garbage": d / "g.jpg"}
    files["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(b"this is not an image at all")
    return files


def test_bad_images_small_path_error_lists_every_file_and_skip_counts_them(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _write(root, "train", {"a": 3, "b": 3})
    _write(root, "val", {"a": 1, "b": 1})
    bad = _bad_files(root / "train" / "b")
    with pytest.raises(BadImageError) as e:
        build_data(_cfg(root, tmp_path))
    msg = str(e.value)
    assert "3 image(s)" in msg and "--bad-images skip" in msg
    for p in bad.values():  # every one, not only the first
        assert str(p) in msg
    assert sorted(p for p, _ in e.value.bad) == sorted(str(p) for p in bad.values())
    b = build_data(_cfg(root, tmp_path, bad_images="skip"))  # the cache now knows the bad files
    assert b.n_train == 6 and sorted(p for p, _ in b.bad) == sorted(str(p) for p in bad.values())
    ys = sorted(int(v) for _, y in b.train for v in y)
    assert ys == [0, 0, 0, 1, 1, 1]
    with pytest.raises(BadImageError, match="3 image"):  # error mode again, now from the cache
        build_data(_cfg(root, tmp_path))


def test_bad_images_large_path_are_named_not_an_anonymous_worker_traceback(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _write(root, "train", {"a": 3, "b": 3}, size=72)
    _write(root, "val", {"a": 1, "b": 1}, size=72)
    bad = _bad_files(root / "train" / "b")
    with pytest.raises(BadImageError, match=r"z\.jpg: empty file"):  # found before any epoch
        build_data(_cfg(root, tmp_path))
    bad["empty"].unlink()
    b = build_data(_cfg(root, tmp_path, image_size=32, workers=1))
    # decoded mid-epoch in a worker: the batch's bad file comes back by name, as a clean error
    with pytest.raises(BadImageError, match=r"cannot be decoded.*\n  .*/train/b/[tg]\.jpg: "):
        for _ in b.train:
            pass
    b = build_data(_cfg(root, tmp_path, image_size=32, workers=1, bad_images="skip"))
    seen = sum(len(y) for _, y in b.train)
    assert seen == 6 and sorted(Path(p).name for p, _ in b.bad) == ["g.jpg", "t.jpg"]


def test_a_subset_decodes_only_its_images_and_equals_the_cached_full_split(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "d"
    _write(root, "train", {"a": 20, "b": 20})
    calls = []
    real = images_mod._try_decode
    monkeypatch.setattr(images_mod, "_try_decode", lambda p, s: calls.append(p) or real(p, s))
    pick = [1, 5, 22, 39]
    sub = load_small_folder(root, "train", cache_dir=tmp_path / "c", select=lambda n: pick)
    assert len(calls) == 4 and not (tmp_path / "c").exists()  # 4 of 40 decoded, no partial cache written
    full = load_small_folder(root, "train", cache_dir=tmp_path / "c")
    assert len(calls) == 44 and len(list((tmp_path / "c").iterdir())) == 1
    again = load_small_folder(root, "train", cache_dir=tmp_path / "c", select=lambda n: pick)
    assert len(calls) == 44  # served from the full cache
    for got in (sub, again):
        assert np.array_equal(got.images, full.images[pick]) and got.labels.tolist() == [0, 0, 1, 1]


def test_progress_is_shown_while_decoding(tmp_path: Path, capsys) -> None:
    _write(tmp_path / "d", "train", {"a": 3})
    load_small_folder(tmp_path / "d", "train", cache_dir=tmp_path / "c", progress=True)
    assert "decoding train images" in capsys.readouterr().err


def test_a_mistyped_data_dir_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "cifra10"
    for dataset in ("cifar10", "folder"):
        with pytest.raises(FileNotFoundError, match="data_dir .*cifra10.* does not exist.*Nothing was created"):
            build_data(TrainConfig(dataset=dataset, data_dir=str(typo)))
    assert not typo.exists()


def test_classes_are_matched_by_name_and_another_set_is_refused() -> None:
    names = ["airplane", "automobile", "bird"]
    with pytest.raises(ValueError, match=r"not in the model: \['car'\]; missing from the data: \['automobile'\]"):
        match_classes(["airplane", "bird", "car"], names, "the folder")
    # the same set in another order: labels follow the names, not the positions
    images = np.zeros((3, 3, 2, 2), np.uint8)
    x, y, classes = _remap((images, np.array([0, 1, 2]), ["bird", "airplane", "automobile"]), names, "t")
    assert classes == names and y.tolist() == [2, 0, 1]


def test_curves_are_titled_with_the_run_name(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.figure

    from compconv.train.results import plot_history

    titles = []
    real = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **k: titles.append(t) or real(self, t))
    row = dict(epoch=1, train_loss=2.0, train_acc=20.0, test_loss=1.9, test_top1=25.0)
    (tmp_path / "r20-comp16-s0").mkdir()
    assert plot_history([row], tmp_path / "r20-comp16-s0" / "curves.png").is_file()
    assert titles == ["r20-comp16-s0"]
