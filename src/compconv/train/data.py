"""Data for training and evaluation: CIFAR through torchvision and ImageNet-style folders.

Two paths, chosen by the images' size (headers read across the split, never one file):

* **small images** (<= 64 px, CIFAR-sized): decoded once into a ``uint8`` array ``(N, 3, H, W)`` held in
  memory and cached on disk (``<cache_dir>/<name>-<split>-<key>.npz``, written atomically); batches are
  cut and augmented with batched tensor ops (pad-``p`` random crop + horizontal flip) in the training
  process, so JPEG decoding never starves a 2-core epoch and no worker processes are needed;
* **large images** (ImageNet-sized): a DataLoader with workers and the usual transforms
  (RandomResizedCrop + flip for training, resize 256/224 centre crop for evaluation).

A checkpoint records which path, image size, eval folder and class names its run used (``recorded``):
evaluation and resume use those, never a new guess from the files. Which files are classes and images,
the decoding and the images that do not decode: ``images.py``; the loaders: ``loaders.py``.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compconv.train.config import TrainConfig
from compconv.train.images import (
    IMG_EXTENSIONS,
    BadImageError,
    ImageList,
    ImageSizeError,
    handle_bad_images,
    is_hidden,
    load_small_folder,
    sample_sizes,
    scan_folder,
    split_dir,
)
from compconv.train.loaders import ArrayLoader, EpochSampler, FolderLoader, epoch_generator

__all__ = [
    "IMG_EXTENSIONS",
    "ArrayLoader",
    "BadImageError",
    "DataBundle",
    "EpochSampler",
    "FolderLoader",
    "ImageSizeError",
    "build_data",
    "default_cache_dir",
    "epoch_generator",
    "load_small_folder",
    "scan_folder",
]

SMALL_MAX = 64  # images at most this many pixels on a side take the in-memory array path
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_cache_dir() -> Path:
    return Path(os.environ.get("COMPCONV_CACHE") or Path.home() / ".cache" / "compconv")


# ----------------------------------------------------------------------------------------------- bundle


@dataclass
class DataBundle:
    """What the engine needs: loaders, class names, the input size and the normalisation."""

    train: ArrayLoader | FolderLoader | None
    eval: ArrayLoader | FolderLoader
    classes: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str  # "array" | "folder"
    source: str  # where the data came from (for results.json)
    n_train: int
    n_eval: int
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of images left out (skip)
    eval_dir: str = "test"  # the evaluation folder (or torchvision split) actually read
    image_wh: tuple[int, int] | None = None  # (W, H) of the array path's images

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores so that eval and resume read the data exactly as this run did."""
        return {
            "mean": self.mean,
            "std": self.std,
            "classes": self.classes,
            "image_size": self.image_size,
            "image_wh": list(self.image_wh) if self.image_wh else None,
            "kind": self.kind,
            "eval_dir": self.eval_dir,
            "n_eval": self.n_eval,
            "n_train": self.n_train,
        }


def _subset(n: int, k: int | None, seed: int, stream: int) -> Tensor | None:
    """A seeded random subset of ``k`` of ``n`` indices, sorted (None: all)."""
    if k is None or k >= n:
        return None
    return torch.randperm(n, generator=epoch_generator(seed, -1, stream))[:k].sort().values


def _selector(k: int | None, seed: int, stream: int) -> Any:
    """``n -> _subset(n, k, ...)`` as a list, for ``load_small_folder(select=...)``."""

    def select(n: int) -> list[int] | None:
        sel = _subset(n, k, seed, stream)
        return None if sel is None else sel.tolist()

    return select


def match_classes(found: list[str], expected: list[str], where: str) -> None:
    """Refuse data whose class names differ from the model's (labels would be silently wrong).

    The same set in another order is fine: labels are always assigned by name.
    """
    if set(found) == set(expected):
        return
    extra = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    raise ValueError(
        f"the classes of {where} differ from the model's {len(expected)} classes (its checkpoint records them): "
        f"not in the model: {extra}; missing from the data: {missing}. Evaluating would mislabel images; pass "
        "a folder with the same class names (their order does not matter)"
    )


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std (in [0, 1]) of a uint8 (N, C, H, W) array, accumulated in float64."""
    c = images.shape[1]
    s = np.zeros(c)
    s2 = np.zeros(c)
    for i in range(0, len(images), 4096):
        chunk = images[i : i + 4096].astype(np.float64) / 255.0
        s += chunk.sum(axis=(0, 2, 3))
        s2 += (chunk**2).sum(axis=(0, 2, 3))
    cnt = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / cnt
    std = np.sqrt(np.maximum(s2 / cnt - mean**2, 1e-12))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _torchvision_cifar(name: str, root: Path, download: bool, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise FileNotFoundError(
                f"no torchvision {name} copy under {str(root)!r} and download is off; pass --data-dir "
                f"pointing to a directory holding torchvision's {name} files, or an ImageNet-style folder "
                "(ROOT/train/<class>/*, ROOT/test/<class>/*)"
            ) from None
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as e:  # noqa: BLE001 - offline machines fail in many ways (URLError, timeout, ...)
            raise FileNotFoundError(
                f"could not download {name} into {str(root)!r} ({type(e).__name__}: {e}). Offline? Pass "
                f"--data-dir pointing to an existing torchvision {name} directory, or to an ImageNet-style "
                "folder (ROOT/train/<class>/*, ROOT/test/<class>/*), e.g. --data-dir ../shared/data/cifar10"
            ) from None
        finally:
            socket.setdefaulttimeout(old)
    images = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
    return images, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)


def _refuse_foreign_download_dir(root: Path, name: str) -> None:
    """Never download torchvision files into a folder that holds something else (e.g. ``ROOT/train``)."""
    theirs = {"cifar-10-batches-py", "cifar-10-python.tar.gz", "cifar-100-python", "cifar-100-python.tar.gz"}
    other = sorted(e.name for e in os.scandir(root) if not is_hidden(e.name) and e.name not in theirs)
    if not other:
        return
    dirs = [n for n in other if (root / n).is_dir()]
    looks = (
        f"it holds folders ({', '.join(dirs[:5])}{', ...' if len(dirs) > 5 else ''}) but no train/ folder: if "
        f"they are class folders, pass their parent (--data-dir {root.parent})"
        if dirs
        else f"it holds other files ({', '.join(other[:5])})"
    )
    raise FileNotFoundError(
        f"data_dir {str(root)!r} is neither an image folder nor a torchvision {name} copy: {looks}. Expected "
        f"ROOT/train/<class>/* and ROOT/test/<class>/* (or ROOT/val/<class>/*), or torchvision's files. "
        "Nothing was downloaded into it"
    )


def _is_folder_layout(root: Path, train: bool) -> bool:
    if train:
        return (root / "train").is_dir()
    return any((root / s).is_dir() for s in ("train", "val", "test"))


def data_root(data_dir: str | None) -> Path | None:
    """``--data-dir`` as an absolute path; a given directory must exist (a typo never creates one)."""
    if not data_dir:
        return None
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data_dir {data_dir!r} does not exist{'' if str(root) == data_dir else f' ({str(root)!r})'}; pass "
            "--data-dir ROOT with an existing "
            "torchvision CIFAR directory or an ImageNet-style folder (ROOT/train/<class>/*, ROOT/test/<class>/*). "
            "Nothing was created or downloaded"
        )
    return root


def _pick(arrays: tuple[np.ndarray, np.ndarray, list[str]], k: int | None, seed: int, stream: int) -> Any:
    images, labels, classes = arrays
    sel = _subset(len(images), k, seed, stream)
    if sel is not None:
        images, labels = images[sel.numpy()], labels[sel.numpy()]
    return images, labels, classes


def _remap(arrays: Any, expected: list[str] | None, where: str) -> Any:
    """Labels of ``arrays`` re-indexed to ``expected``'s order (by name); refuses another set of classes."""
    if expected is None:
        return arrays
    images, labels, classes = arrays[:3]
    match_classes(list(classes), expected, where)
    if list(classes) != list(expected):
        idx = {c: i for i, c in enumerate(expected)}
        labels = np.asarray([idx[c] for c in classes], dtype=np.int64)[labels]
    return images, labels, list(expected)


def _choose_kind(cfg: TrainConfig, paths: list[str]) -> str:
    """A new run's pipeline from the headers of files spread over its splits (never the first file alone)."""
    seen = sample_sizes(paths)
    if not seen:
        raise BadImageError(f"none of the {min(len(paths), 64)} sampled images under {cfg.data_dir!r} opens")
    small = [(p, wh) for p, wh in seen if max(wh) <= SMALL_MAX]
    large = [(p, wh) for p, wh in seen if max(wh) > SMALL_MAX]
    if small and large:
        if cfg.image_size:  # an explicit size decides, and every image is resized to it
            return "array" if cfg.image_size <= SMALL_MAX else "folder"
        (ps, (ws, hs)), (pl, (wl, hl)) = small[0], large[0]
        raise ImageSizeError(
            f"the images under {cfg.data_dir!r} mix small and large sizes (e.g. {ps}: {ws}x{hs}, {pl}: "
            f"{wl}x{hl}; {len(small)} small and {len(large)} large of {len(seen)} sampled): pass --image-size N "
            f"to resize every image to NxN (N <= {SMALL_MAX}: the in-memory small-image path), or fix the files",
            [small[0], large[0]],
        )
    return "array" if small else "folder"


def _check_record(rec: dict[str, Any]) -> None:
    """A recorded ``data`` (a checkpoint's or a save file's) that cannot be used is a ValueError naming it."""
    def bad(why: str) -> ValueError:
        return ValueError(f"the recorded data (the checkpoint's or save file's 'data') is malformed: {why}; "
                          "evaluate with an intact run checkpoint, or re-save the model with a data record "
                          "from one")

    if not isinstance(rec, dict):
        raise bad(f"a {type(rec).__name__}, not a dict")
    if ("mean" in rec) != ("std" in rec):
        raise bad("it has one of 'mean' and 'std' without the other")
    if "mean" in rec:
        mean, std = rec["mean"], rec["std"]
        nums = all(isinstance(v, (list, tuple)) and v and all(_finite(x) for x in v) for v in (mean, std))
        if not nums or len(mean) != len(std) or not all(x > 0 for x in std):
            raise bad(f"mean {mean!r} / std {std!r} must be equal-length lists of finite numbers, std > 0")
    classes = rec.get("classes")
    if classes is not None and not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):
        raise bad(f"classes {classes!r} must be a list of names")
    def pixels(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16

    size = rec.get("image_size")
    if size is not None and not pixels(size):
        raise bad(f"image_size {size!r} must be a positive integer (pixels)")
    wh = rec.get("image_wh")
    if wh is not None and not (isinstance(wh, (list, tuple)) and len(wh) == 2 and all(pixels(v) for v in wh)):
        raise bad(f"image_wh {wh!r} must be [width, height] in pixels")
    if rec.get("kind") not in (None, "array", "folder"):
        raise bad(f"kind {rec['kind']!r} must be 'array' or 'folder'")
    if rec.get("eval_dir") is not None and not isinstance(rec["eval_dir"], str):
        raise bad(f"eval_dir {rec['eval_dir']!r} must be a folder name")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def build_data(
    cfg: TrainConfig,
    *,
    rank: int = 0,
    world: int = 1,
    train: bool = True,
    recorded: dict[str, Any] | None = None,
    pin_memory: bool = False,
    progress: bool = False,
) -> DataBundle:
    """Build the loaders for ``cfg``; batch size per rank is ``cfg.batch_size // world``.

    ``train=False`` builds only the evaluation loader (``compconv eval``). ``recorded`` is a checkpoint's
    ``data`` record (``DataBundle.record``): its normalisation, class names (labels are fixed by name: data
    with other class names raises ValueError), pipeline, image size and eval folder are used as they are,
    so evaluation and resume read the data exactly as the run did. Only the images the run reads are
    decoded (``train_subset`` / ``eval_subset``), unless the whole split is already cached. Raises
    FileNotFoundError for a ``data_dir`` that does not exist, ``BadImageError`` for images that do not
    decode (``bad_images="error"``; every bad file of both splits is listed), ``ImageSizeError`` for images
    of another size than the others (or than the recorded one).
    """
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    per_rank = cfg.batch_size // world
    name = cfg.dataset
    rec = recorded or {}
    _check_record(rec)
    stats = (tuple(rec["mean"]), tuple(rec["std"])) if "mean" in rec else None
    classes: list[str] | None = rec.get("classes")
    fixed = classes is not None  # a checkpoint's classes: the data must hold exactly these
    root = data_root(cfg.data_dir)
    need_train = train or stats is None
    # the recorded eval folder, unless another split was asked for (compconv eval --split)
    ev_split = rec.get("eval_dir") if cfg.eval_split == "auto" and rec.get("eval_dir") else cfg.eval_split
    if name in ("cifar10", "cifar100") and not (root is not None and _is_folder_layout(root, need_train)):
        if root is not None:
            _refuse_foreign_download_dir(root, name)
        # download only into the default cache or an existing --data-dir, never a new folder
        root = root or default_cache_dir() / "datasets"
        if ev_split not in ("auto", "test", "train"):
            raise ValueError(f"eval_split {ev_split!r}: torchvision {name} has only 'test' (auto) and 'train'")
        tr = _torchvision_cifar(name, root, cfg.download, True) if need_train else None
        if tr is not None:
            tr = _pick(tr, cfg.train_subset, cfg.seed, 1)
        ev = _torchvision_cifar(name, root, cfg.download, ev_split == "train")
        ev = _pick(ev, cfg.eval_subset, cfg.seed, 2)
        ev = _remap(ev, classes, f"torchvision {name} under {str(root)!r}")
        source = f"torchvision {name} ({root})"
        out = _array_bundle(cfg, tr, ev, rank, world, per_rank, train, stats, source, [])
        out.eval_dir = "train" if ev_split == "train" else "test"
        return out
    if root is None:
        raise ValueError(f"dataset {name!r} needs data_dir (--data-dir ROOT with ROOT/train/<class>/*)")
    tr_paths: list[str] = []
    if classes is None or need_train:
        tr_paths, _, found = scan_folder(root, "train", classes, fixed=fixed)
        if name == "cifar10" and len(found) != 10 or name == "cifar100" and len(found) != 100:
            raise ValueError(
                f"dataset {name!r} expects {10 if name == 'cifar10' else 100} classes, but "
                f"{str(root / 'train')!r} has {len(found)}"
            )
        if classes is not None:
            match_classes(found, classes, repr(str(root / "train")))
        classes = classes or found
    ev_dir = split_dir(root, ev_split)
    if ev_dir.is_dir():
        ev_found = sorted(e.name for e in os.scandir(ev_dir) if e.is_dir() and not is_hidden(e.name))
        if train:  # a training run's eval split may lack a class, never add one
            extra = sorted(set(ev_found) - set(classes))
            if extra:
                raise ValueError(f"{str(ev_dir)!r} has classes not in the training split: {extra[:5]}")
        else:  # evaluating a trained model: exactly its classes
            match_classes(ev_found, classes, repr(str(ev_dir)))
    ev_paths, _, _ = scan_folder(root, ev_dir.name, classes, fixed=fixed and not train)
    if rec.get("kind"):
        kind = rec["kind"]
    elif "image_size" in rec:  # written before the pipeline was recorded: the old rule on its own size
        kind = "array" if int(rec["image_size"]) <= SMALL_MAX else "folder"
    else:
        kind = _choose_kind(cfg, tr_paths + ev_paths)
    if kind == "folder":
        out = _folder_bundle(cfg, root, classes, ev_dir.name, rank, world, per_rank, train, pin_memory)
        out.eval_dir = ev_dir.name
        return out
    expect: tuple[int, int] | None = None
    if not cfg.image_size and "image_size" in rec:  # the size the model was trained on
        wh = rec.get("image_wh") or (rec["image_size"], rec["image_size"])
        expect = (int(wh[0]), int(wh[1]))
    common = dict(cache_dir=cfg.cache_dir, bad_images=None, progress=progress, image_size=cfg.image_size)
    tr = (
        load_small_folder(
            root,
            "train",
            expect_size=expect,
            classes=classes,
            fixed_classes=fixed,
            select=_selector(cfg.train_subset, cfg.seed, 1),
            **common,  # type: ignore[arg-type]
        )
        if need_train
        else None
    )
    if tr is not None and expect is None and not cfg.image_size and len(tr.images):
        expect = (int(tr.images.shape[3]), int(tr.images.shape[2]))  # eval images: the training size
    ev = load_small_folder(
        root,
        ev_dir.name,
        expect_size=expect,
        classes=classes,
        fixed_classes=fixed and not train,
        select=_selector(cfg.eval_subset, cfg.seed, 2),
        **common,  # type: ignore[arg-type]
    )
    bad = (tr.bad if tr is not None else []) + ev.bad
    handle_bad_images(bad, cfg.bad_images, repr(str(root)))  # every bad file of both splits at once
    out = _array_bundle(cfg, tr, ev, rank, world, per_rank, train, stats, f"folder {root}", bad)
    out.eval_dir = ev_dir.name
    return out


def _array_bundle(
    cfg: TrainConfig,
    tr: Any,
    ev: Any,
    rank: int,
    world: int,
    per_rank: int,
    train: bool,
    stats: Any,
    source: str,
    bad: list[tuple[str, str]],
) -> DataBundle:
    """Loaders over decoded arrays ``tr`` / ``ev`` (``(images, labels, classes, ...)``, subsets applied)."""
    ev_images, ev_labels, classes = ev[:3]
    if stats is None:
        stats = _channel_stats(tr[0])  # of the training images this run reads
    mean, std = stats
    size = int(ev_images.shape[-1])
    image_wh = (int(ev_images.shape[-1]), int(ev_images.shape[-2]))
    pad = cfg.crop_padding if cfg.crop_padding is not None else size // 8
    evx, evy = torch.from_numpy(ev_images), torch.from_numpy(ev_labels)
    eval_loader = ArrayLoader(evx, evy, per_rank, train=False, mean=mean, std=std, rank=rank, world=world)
    train_loader = None
    n_train = 0
    if train:
        images, labels, tr_classes = tr[:3]
        if list(tr_classes) != list(classes):
            raise ValueError("training and evaluation splits have different classes")
        x, y = torch.from_numpy(images), torch.from_numpy(labels)
        train_loader = ArrayLoader(
            x,
            y,
            per_rank,
            train=True,
            mean=mean,
            std=std,
            augment=cfg.augment == "standard",
            padding=pad,
            seed=cfg.seed,
            rank=rank,
            world=world,
        )
        n_train = len(x)
    return DataBundle(
        train_loader,
        eval_loader,
        list(classes),
        size,
        tuple(mean),
        tuple(std),
        "array",
        source,
        n_train,
        len(evx),
        bad,
        image_wh=image_wh,
    )


def _samples(root: Path, split: str, classes: list[str], k: int | None, seed: int, stream: int) -> Any:
    """``(path, label)`` of the files a run reads, and its empty files (found here, before any epoch)."""
    paths, labels, _ = scan_folder(root, split, classes)
    sel = _subset(len(paths), k, seed, stream)
    idx = range(len(paths)) if sel is None else sel.tolist()
    samples = [(paths[i], labels[i]) for i in idx]
    empty = [(p, "empty file (0 bytes)") for p, _ in samples if os.stat(p).st_size == 0]
    drop = {p for p, _ in empty}
    return [s for s in samples if s[0] not in drop], empty


def _folder_bundle(
    cfg: TrainConfig,
    root: Path,
    classes: list[str],
    ev_split: str,
    rank: int,
    world: int,
    per_rank: int,
    train: bool,
    pin_memory: bool,
) -> DataBundle:
    from torchvision import transforms

    size = cfg.image_size or 224
    resize = int(round(size * 256 / 224))
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if cfg.augment == "standard":
        tr_tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                norm,
            ]
        )
    else:
        tr_tf = transforms.Compose(
            [transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor(), norm]
        )
    ev_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor(), norm])
    ev_samples, bad = _samples(root, ev_split, classes, cfg.eval_subset, cfg.seed, 2)
    tr_samples: list[tuple[str, int]] = []
    if train:
        tr_samples, tr_bad = _samples(root, "train", classes, cfg.train_subset, cfg.seed, 1)
        bad = tr_bad + bad
    handle_bad_images(bad, cfg.bad_images, repr(str(root)))  # the empty files of both splits at once

    def loader(ds: Any, train: bool) -> FolderLoader:
        return FolderLoader(
            ds,
            per_rank,
            train=train,
            seed=cfg.seed,
            rank=rank,
            world=world,
            workers=cfg.workers,
            pin_memory=pin_memory,
            bad_images=cfg.bad_images,
            bad=bad,
        )

    eval_loader = loader(ImageList(ev_samples, ev_tf), train=False)
    train_loader = None
    n_train = 0
    if train:
        train_loader = loader(ImageList(tr_samples, tr_tf), train=True)
        n_train = len(tr_samples)
    return DataBundle(
        train_loader,
        eval_loader,
        classes,
        size,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "folder",
        f"folder {root}",
        n_train,
        len(ev_samples),
        bad,
    )
