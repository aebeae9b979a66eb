"""Data for training and evaluation: CIFAR through torchvision and ImageNet-style folders.

Two paths, chosen by image size:

* **small images** (<= 64 px, CIFAR-sized): decoded once into a ``uint8`` array ``(N, 3, H, W)`` held in
  memory and cached on disk (``<cache_dir>/<name>-<split>-<key>.npz``, written atomically); batches are
  cut and augmented with batched tensor ops (pad-``p`` random crop + horizontal flip) in the training
  process, so JPEG decoding never starves a 2-core epoch and no worker processes are needed;
* **large images** (ImageNet-sized): ``torchvision.datasets.ImageFolder`` through DataLoader workers with
  the usual transforms (RandomResizedCrop + flip for training, resize 256/224 centre crop for evaluation).

Which files are classes and images, the decoding and the images that do not decode: ``images.py``.

Shuffling and augmentation draw from a generator seeded by ``(seed, epoch)``, so an epoch's batches
depend only on the seed and the epoch number: a resumed run sees exactly the batches an uninterrupted
one would, and (for the array path) the same images whatever the number of ranks.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from compconv.train.config import TrainConfig
from compconv.train.images import (
    IMG_EXTENSIONS,
    BadImageError,
    ImageList,
    collate_named,
    handle_bad_images,
    is_hidden,
    load_small_folder,
    peek_size,
    scan_folder,
    split_dir,
)

__all__ = [
    "IMG_EXTENSIONS",
    "ArrayLoader",
    "BadImageError",
    "DataBundle",
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


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one epoch's shuffling/augmentation: a pure function of (seed, epoch, stream)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2**63))
    return g


# --------------------------------------------------------------------------------------- the array loader


def _shard(n: int, rank: int, world: int, pad: bool) -> tuple[int, int]:
    """(samples per rank, padded total) for ``n`` items over ``world`` ranks."""
    if pad:
        per = math.ceil(n / world)
        return per, per * world
    return len(range(rank, n, world)), n


class ArrayLoader:
    """Batches from an in-memory ``uint8 (N, C, H, W)`` tensor, augmented on the fly with tensor ops.

    Yields ``(float32 (B, C, H, W) normalised images, int64 (B,) labels)``. ``batch_size`` is per rank.
    Training: the epoch's permutation, crop offsets and flips are drawn for all ``N`` images from
    ``epoch_generator(seed, epoch)``; the permutation is padded (wrapping, like ``DistributedSampler``) to a
    multiple of ``world`` and rank ``r`` takes ``perm[r::world]``. Evaluation: rank ``r`` takes images
    ``r, r+world, ...`` in order, no padding, so summed metrics are exact.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        train: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = True,
        padding: int = 4,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels = images, labels
        self.batch_size, self.train, self.augment, self.padding = batch_size, train, augment, padding
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch = 0
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * s), m / s  # x/255 - m) / s = x * scale - shift
        self.num_samples, _ = _shard(len(images), rank, world, pad=train)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def _plan(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        n = len(self.images)
        if not self.train:
            return torch.arange(self.rank, n, self.world), None, None
        g = epoch_generator(self.seed, self.epoch)
        perm = torch.randperm(n, generator=g)
        offsets = flips = None
        if self.augment:
            offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g)
            flips = torch.rand(n, generator=g) < 0.5
        per, total = _shard(n, self.rank, self.world, pad=True)
        if total > n:
            perm = torch.cat([perm, perm[: total - n]])
        return perm[self.rank :: self.world], offsets, flips

    def _augment(self, x: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.padding
        if p > 0:
            xp = F.pad(x, (p, p, p, p))  # zero padding, as torchvision's RandomCrop(padding=4)
            rows = (offsets[:, 0:1] + torch.arange(h)).view(b, 1, h, 1)
            cols = (offsets[:, 1:2] + torch.arange(w)).view(b, 1, 1, w)
            x = xp[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
        return torch.where(flips.view(b, 1, 1, 1), x.flip(3), x)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The epoch's batches from batch ``start`` on (exactly those an uninterrupted pass yields)."""
        idx, offsets, flips = self._plan()
        for i in range(start * self.batch_size, len(idx), self.batch_size):
            bi = idx[i : i + self.batch_size]
            x = self.images[bi]
            if offsets is not None and flips is not None:
                x = self._augment(x, offsets[bi], flips[bi])
            yield x.float().mul_(self._scale).sub_(self._shift), self.labels[bi]


class EpochSampler(torch.utils.data.Sampler[int]):
    """Index sampler for the DataLoader path with the same (seed, epoch) contract as ``ArrayLoader``."""

    def __init__(self, n: int, *, train: bool, seed: int, rank: int, world: int) -> None:
        self.n, self.train, self.seed, self.rank, self.world = n, train, seed, rank, world
        self.epoch = 0
        self.skip = 0  # leading indices to leave out (resuming inside an epoch)
        self.num_samples, _ = _shard(n, rank, world, pad=train)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples - self.skip

    def __iter__(self) -> Iterator[int]:
        if not self.train:
            return iter(list(range(self.rank, self.n, self.world))[self.skip :])
        perm = torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch)).tolist()
        per, total = _shard(self.n, self.rank, self.world, pad=True)
        perm += perm[: total - self.n]
        return iter(perm[self.rank :: self.world][self.skip :])


class FolderLoader:
    """DataLoader over an ``ImageList`` with ``EpochSampler``; worker RNG seeded from (seed, epoch).

    A file that fails to decode in a worker is named: ``bad_images="error"`` raises ``BadImageError``
    listing the batch's bad files; ``"skip"`` leaves them out of the batch, prints them and adds them to
    ``bad`` (shared with the ``DataBundle``, so ``results.json`` counts them).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        train: bool,
        seed: int,
        rank: int,
        world: int,
        workers: int,
        pin_memory: bool,
        bad_images: str = "error",
        bad: list[tuple[str, str]] | None = None,
    ) -> None:
        self.bad_images = bad_images
        self.bad = bad if bad is not None else []
        self.sampler = EpochSampler(len(dataset), train=train, seed=seed, rank=rank, world=world)
        self.dataset, self.batch_size, self.train, self.seed = dataset, batch_size, train, seed
        self.workers, self.pin_memory = workers, pin_memory
        self.num_samples = self.sampler.num_samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches from batch ``start`` on: the same images; the random crops of a resumed partial epoch
        differ (each worker's RNG stream depends on which samples it gets)."""
        self.sampler.skip = start * self.batch_size
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            drop_last=False,
            generator=epoch_generator(self.seed, self.epoch, stream=1),  # seeds the workers' transforms
            collate_fn=collate_named,
        )
        return self._named(iter(loader))

    def _named(self, it: Iterator[Any]) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y, bad in it:
            if bad:
                new = [b for b in bad if b not in self.bad]
                handle_bad_images(bad, self.bad_images, "the data folder")
                self.bad += new
            yield x, y


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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


def build_data(
    cfg: TrainConfig,
    *,
    rank: int = 0,
    world: int = 1,
    train: bool = True,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    pin_memory: bool = False,
    classes: list[str] | None = None,
    progress: bool = False,
) -> DataBundle:
    """Build the loaders for ``cfg``; batch size per rank is ``cfg.batch_size // world``.

    ``train=False`` builds only the evaluation loader (``compconv eval``); ``stats`` (mean, std) then
    comes from the checkpoint so evaluation normalises exactly as training did, and ``classes`` (the
    checkpoint's class names) fixes the labels by name: data with other class names raises ValueError.
    Only the images the run reads are decoded (``train_subset`` / ``eval_subset``), unless the whole
    split is already cached. Raises FileNotFoundError for a ``data_dir`` that does not exist,
    ``BadImageError`` for images that do not decode (``bad_images="error"``).
    """
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    per_rank = cfg.batch_size // world
    name = cfg.dataset
    root = data_root(cfg.data_dir)
    need_train = train or stats is None
    if name in ("cifar10", "cifar100") and not (root is not None and _is_folder_layout(root, need_train)):
        # download only into the default cache or an existing --data-dir, never a new folder
        root = root or default_cache_dir() / "datasets"
        if cfg.eval_split not in ("auto", "test", "train"):
            raise ValueError(f"eval_split {cfg.eval_split!r}: torchvision {name} has only 'test' (auto) and 'train'")
        tr = _torchvision_cifar(name, root, cfg.download, True) if need_train else None
        if tr is not None:
            tr = _pick(tr, cfg.train_subset, cfg.seed, 1)
        ev = _torchvision_cifar(name, root, cfg.download, cfg.eval_split == "train")
        ev = _pick(ev, cfg.eval_subset, cfg.seed, 2)
        ev = _remap(ev, classes, f"torchvision {name} under {str(root)!r}")
        source = f"torchvision {name} ({root})"
        return _array_bundle(cfg, tr, ev, rank, world, per_rank, train, stats, source, [])
    if root is None:
        raise ValueError(f"dataset {name!r} needs data_dir (--data-dir ROOT with ROOT/train/<class>/*)")
    if classes is None or need_train:
        paths, _, found = scan_folder(root, "train")
        if name == "cifar10" and len(found) != 10 or name == "cifar100" and len(found) != 100:
            raise ValueError(
                f"dataset {name!r} expects {10 if name == 'cifar10' else 100} classes, but "
                f"{str(root / 'train')!r} has {len(found)}"
            )
        if classes is not None:
            match_classes(found, classes, repr(str(root / "train")))
        classes = classes or found
    ev_dir = split_dir(root, cfg.eval_split)
    if ev_dir.is_dir():
        ev_found = sorted(e.name for e in os.scandir(ev_dir) if e.is_dir() and not is_hidden(e.name))
        if train:  # a training run's eval split may lack a class, never add one
            extra = sorted(set(ev_found) - set(classes))
            if extra:
                raise ValueError(f"{str(ev_dir)!r} has classes not in the training split: {extra[:5]}")
        else:  # evaluating a trained model: exactly its classes
            match_classes(ev_found, classes, repr(str(ev_dir)))
    ev_paths, _, _ = scan_folder(root, ev_dir.name, classes)
    w, h = peek_size(ev_paths)
    if max(w, h) <= SMALL_MAX:
        common = dict(cache_dir=cfg.cache_dir, bad_images=cfg.bad_images, progress=progress)
        tr = (
            load_small_folder(
                root,
                "train",
                image_size=cfg.image_size,
                classes=classes,
                select=_selector(cfg.train_subset, cfg.seed, 1),
                **common,  # type: ignore[arg-type]
            )
            if need_train
            else None
        )
        ev = load_small_folder(
            root,
            ev_dir.name,
            image_size=cfg.image_size or (tr.images.shape[-1] if tr is not None else w),
            classes=classes,
            select=_selector(cfg.eval_subset, cfg.seed, 2),
            **common,  # type: ignore[arg-type]
        )
        bad = (tr.bad if tr is not None else []) + ev.bad
        return _array_bundle(cfg, tr, ev, rank, world, per_rank, train, stats, f"folder {root}", bad)
    return _folder_bundle(cfg, root, classes, ev_dir.name, rank, world, per_rank, train, pin_memory)


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
    )


def _samples(root: Path, split: str, classes: list[str], k: int | None, seed: int, stream: int, mode: str) -> Any:
    """``(path, label)`` of the files a run reads; empty files are found here, before any epoch."""
    paths, labels, _ = scan_folder(root, split, classes)
    sel = _subset(len(paths), k, seed, stream)
    idx = range(len(paths)) if sel is None else sel.tolist()
    samples = [(paths[i], labels[i]) for i in idx]
    empty = [(p, "empty file (0 bytes)") for p, _ in samples if os.stat(p).st_size == 0]
    handle_bad_images(empty, mode, repr(str(root / split)))
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
    ev_samples, bad = _samples(root, ev_split, classes, cfg.eval_subset, cfg.seed, 2, cfg.bad_images)

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
        tr_samples, tr_bad = _samples(root, "train", classes, cfg.train_subset, cfg.seed, 1, cfg.bad_images)
        bad += tr_bad
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
