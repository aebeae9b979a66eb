"""Image folders: scanning, the decoded-array cache, and the large-image DataLoader path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compconv.train.config import TrainConfig
from compconv.train.data import build_data, load_small_folder, scan_folder
from train_helpers import DATA, tiny_config


def _folder(
    root: Path, classes: dict[str, int], size: int = 8, split: str = "train"
) -> dict[str, np.ndarray]:
    """Write ``n`` random PNG images per class; returns the arrays written, by path."""
    rng = np.random.default_rng(0)
    out = {}
    for c, n in classes.items():
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            p = root / split / c / f"{i:03d}.png"
            Image.fromarray(a).save(p)
            out[str(p)] = a
    return out


def test_scan_sorts_classes_and_files_and_skips_non_images(tmp_path: Path) -> None:
    _folder(tmp_path, {"dog": 2, "cat": 3})
    (tmp_path / "train" / "cat" / "README.txt").write_text("x")
    paths, labels, classes = scan_folder(tmp_path, "train")
    assert classes == ["cat", "dog"] and labels == [0, 0, 0, 1, 1]
    assert [Path(p).name for p in paths] == ["000.png", "001.png", "002.png", "000.png", "001.png"]


def test_eval_split_is_val_then_test_and_uses_the_training_labels(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 1, "b": 1, "c": 1})
    _folder(tmp_path, {"c": 2}, split="test")
    _, labels, classes = scan_folder(tmp_path, "auto", classes=["a", "b", "c"])
    assert labels == [2, 2] and classes == ["a", "b", "c"]
    _folder(tmp_path, {"zebra": 1}, split="val")
    with pytest.raises(ValueError, match="classes not in the training split"):
        scan_folder(tmp_path, "auto", classes=["a", "b", "c"])


def test_missing_split_and_empty_folder_are_clear_errors(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 1})
    with pytest.raises(FileNotFoundError, match="no 'val' or 'test' folder"):
        scan_folder(tmp_path, "auto")
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found under"):
        scan_folder(tmp_path / "empty", "train")


def test_small_folder_is_decoded_once_then_read_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    written = _folder(tmp_path / "d", {"a": 3, "b": 2})
    cache = tmp_path / "cache"
    x, y, classes, _ = load_small_folder(tmp_path / "d", "train", cache_dir=cache)
    assert x.shape == (5, 3, 8, 8) and x.dtype == np.uint8 and y.tolist() == [0, 0, 0, 1, 1]
    assert np.array_equal(x[0], next(iter(written.values())).transpose(2, 0, 1))  # PNG: lossless
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"

    import compconv.train.images as data_mod

    monkeypatch.setattr(data_mod, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    x2, y2, _, _ = load_small_folder(tmp_path / "d", "train", cache_dir=cache)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    monkeypatch.undo()

    files[0].write_bytes(b"garbage")  # a damaged cache is rebuilt, not trusted
    x3, _, _, _ = load_small_folder(tmp_path / "d", "train", cache_dir=cache)
    assert np.array_equal(x, x3)
    _folder(tmp_path / "d", {"c": 1})  # a changed folder gets a new cache entry
    x4, y4, classes4, _ = load_small_folder(tmp_path / "d", "train", cache_dir=cache)
    assert len(x4) == 6 and classes4 == ["a", "b", "c"]


def test_mixed_sizes_are_refused_by_name_unless_an_image_size_resizes_all(tmp_path: Path) -> None:
    from compconv.train.images import ImageSizeError

    _folder(tmp_path, {"a": 2}, size=8)
    odd = tmp_path / "train" / "a" / "999.png"
    Image.fromarray(np.zeros((12, 10, 3), dtype=np.uint8)).save(odd)  # 10 wide, 12 high
    with pytest.raises(ImageSizeError, match=rf"1 of 3 image\(s\) .* are not 8x8.*\n  {odd}: 10x12") as e:
        load_small_folder(tmp_path, "train", cache_dir=tmp_path / "cache")
    assert e.value.odd == [(str(odd), (10, 12))] and not (tmp_path / "cache").exists()  # nothing cached
    x, _, _, _ = load_small_folder(tmp_path, "train", cache_dir=tmp_path / "cache", image_size=8)  # explicit
    assert x.shape == (3, 3, 8, 8)


def test_batch_size_must_split_evenly_over_ranks(tmp_path: Path) -> None:
    _folder(tmp_path / "d", {"a": 2, "b": 2})
    _folder(tmp_path / "d", {"a": 1, "b": 1}, split="val")
    cfg = TrainConfig(
        dataset="folder", data_dir=str(tmp_path / "d"), batch_size=3, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(ValueError, match="batch_size=3 must be divisible by the number of processes \\(2\\)"):
        build_data(cfg.validate(), rank=0, world=2)
    b = build_data(cfg, rank=0, world=1)
    assert (b.kind, b.num_classes, b.n_train, b.n_eval, b.image_size) == ("array", 2, 4, 2, 8)


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "imagenette" / "train").is_dir(), reason=f"Imagenette not found under {DATA}")
def test_large_images_go_through_dataloader_workers_with_imagenet_transforms(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        dataset="folder",
        data_dir=str(DATA / "imagenette"),
        train_subset=24,
        eval_subset=16,
        batch_size=8,
        image_size=64,
        workers=2,
    )
    b = build_data(cfg)
    assert (b.kind, b.num_classes, b.n_train, b.n_eval, b.image_size) == ("folder", 10, 24, 16, 64)
    x, y = next(iter(b.train))
    assert x.shape == (8, 3, 64, 64) and x.dtype.is_floating_point and y.max() < 10
    ev = [t for t, _ in b.eval]
    assert sum(len(t) for t in ev) == 16
    b.train.set_epoch(1)
    x1, _ = next(iter(b.train))
    b.train.set_epoch(1)
    x2, _ = next(iter(b.train))
    assert x1.equal(x2)  # workers' random crops are seeded by (seed, epoch): reproducible


@pytest.mark.parametrize("record,why", [
    ({"mean": [0.5, 0.5, 0.5]}, "one of 'mean' and 'std' without the other"),
    ({"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2]}, "must be equal-length lists of finite numbers, std > 0"),
    ({"mean": "x", "std": [0.2]}, "must be equal-length lists of finite numbers"),
    ({"mean": [0.5], "std": [0.0]}, "std > 0"),
    ({"classes": "cat"}, "classes 'cat' must be a list of names"),
    ({"mean": [float("nan")] * 3, "std": [0.2] * 3}, "lists of finite numbers"),
    ({"image_size": -4}, "image_size -4 must be a positive integer"),
    ({"image_wh": [32]}, "image_wh [32] must be [width, height]"),
    ({"kind": "weird"}, "kind 'weird' must be 'array' or 'folder'"),
    ({"eval_dir": 5}, "eval_dir 5 must be a folder name"),
    ([1, 2], "a list, not a dict"),
])
def test_a_malformed_data_record_is_one_clear_error(record: object, why: str) -> None:
    """A save file's hand-written ``extra['data']`` must not end in a KeyError traceback (compconv eval)."""
    import re

    with pytest.raises(ValueError, match=r"the recorded data \(the checkpoint's or save file's 'data'\) is "
                                         r"malformed: .*" + re.escape(why)):
        build_data(TrainConfig(dataset="cifar10").validate(), train=False, recorded=record)
