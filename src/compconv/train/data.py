"""Data for training and evaluation: CIFAR through torchvision and ImageNet-style folders.

Two paths, chosen by image size:

* **small images** (<= 64 px, CIFAR-sized): decoded once into a ``uint8`` array ``(N, 3, H, W)`` held in
  memory and cached on disk (``<cache_dir>/<name>-<split>-<key>.npz``, written atomically); batches are
  cut and augmented with batched tensor ops (pad-``p`` random crop + horizontal flip) in the training
  process, so JPEG decoding never starves a 2-core epoch and no worker processes are needed;
* **large images** (ImageNet-sized): ``torchvision.datasets.ImageFolder`` through DataLoader workers with
  the usual transforms (RandomResizedCrop + flip for training, resize 256/224 centre crop for evaluation).

Shuffling and augmentation draw from a generator seeded by ``(seed, epoch)``, so an epoch's batches
depend only on the seed and the epoch number: a resumed run sees exactly the batches an uninterrupted
one would, and (for the array path) the same images whatever the number of ranks.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from compconv.train.config import TrainConfig

__all__ = [
    "ArrayLoader",
    "DataBundle",
    "build_data",
    "default_cache_dir",
    "epoch_generator",
    "load_small_folder",
    "scan_folder",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SMALL_MAX = 64  # images at most this many pixels on a side take the in-memory array path
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("COMPCONV_CACHE") or Path.home() / ".cache" / "compconv")


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one epoch's shuffling/augmentation: a pure function of (seed, epoch, stream)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2**63))
    return g


# ----------------------------------------------------------------------------------------------- folders


def _split_dir(root: Path, split: str) -> Path:
    if split == "train":
        return root / "train"
    if split == "auto":
        for s in ("val", "test"):
            if (root / s).is_dir():
                return root / s
        raise FileNotFoundError(
            f"data_dir {str(root)!r} has no 'val' or 'test' folder for evaluation "
            "(expected ROOT/val/<class>/* or ROOT/test/<class>/*)"
        )
    return root / split


def scan_folder(
    root: str | os.PathLike[str], split: str, classes: list[str] | None = None
) -> tuple[list[str], list[int], list[str]]:
    """List ``ROOT/<split>/<class>/<image>`` files: (paths, labels, classes), sorted for determinism.

    ``classes`` (from the training split) fixes the label order of an evaluation split.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data_dir {str(root)!r} does not exist; pass --data-dir ROOT with ROOT/train/<class>/* and "
            "ROOT/val/<class>/* (or ROOT/test/<class>/*)"
        )
    d = _split_dir(root, split)
    if not d.is_dir():
        raise FileNotFoundError(
            f"data_dir {str(root)!r} has no {d.name!r} folder; expected the ImageNet-style layout "
            f"ROOT/train/<class>/* and ROOT/val|test/<class>/*"
        )
    found = sorted(e.name for e in os.scandir(d) if e.is_dir())
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise ValueError(f"{str(d)!r} has classes not in the training split: {extra[:5]}")
    idx = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for c in found:
        names = sorted(e.name for e in os.scandir(d / c) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        paths += [str(d / c / n) for n in names]
        labels += [idx[c]] * len(names)
    if not paths:
        raise ValueError(
            f"no images found under {str(d)!r} (expected {d}/<class>/<image> with one of the extensions "
            f"{', '.join(IMG_EXTENSIONS)})"
        )
    return paths, labels, classes


def _peek_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size  # (W, H)


def _decode(path: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != size:
            im = im.resize(size, Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_small_folder(
    root: str | os.PathLike[str],
    split: str,
    *,
    image_size: int | None = None,
    classes: list[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every image of a small-image split once: ``(uint8 (N, 3, H, W), int64 labels (N,), classes)``.

    The array is cached under ``cache_dir`` keyed by the folder's path, file list, sizes and mtimes (a
    changed folder is decoded again); a cache file that cannot be read is ignored and rewritten.
    """
    paths, labels, classes = scan_folder(root, split, classes)
    w, h = _peek_size(paths[0])
    size = (image_size, image_size) if image_size else (w, h)
    key = hashlib.sha1()
    key.update(f"v{_CACHE_VERSION}|{Path(root).resolve()}|{split}|{size}|{','.join(classes)}".encode())
    for p in paths:  # relative names: "../data/x" and "/abs/data/x" share one cache file
        st = os.stat(p)
        key.update(f"{os.path.relpath(p, root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    split_name = Path(paths[0]).parts[-3]  # "train", "val" or "test" ("auto" resolved)
    cache = (
        Path(cache_dir or default_cache_dir()) / f"{Path(root).resolve().name}-{split_name}-{key.hexdigest()[:16]}.npz"
    )
    if use_cache and cache.is_file():
        try:
            with np.load(cache) as z:
                images, labs = z["images"], z["labels"]
            if images.shape[0] == len(paths):
                return images, labs, classes
        except Exception:  # noqa: BLE001 - a bad cache is rebuilt, never trusted
            pass
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as ex:
        decoded = list(ex.map(lambda p: _decode(p, size), paths, chunksize=256))
    images = np.ascontiguousarray(np.stack(decoded).transpose(0, 3, 1, 2))  # NHWC -> NCHW
    labs = np.asarray(labels, dtype=np.int64)
    if use_cache:
        try:
            _atomic_save_npz(cache, images=images, labels=labs)
        except OSError:  # a read-only cache dir only costs the decode next time
            pass
    return images, labs, classes


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
    """DataLoader over an ImageFolder with ``EpochSampler``; worker RNG seeded from (seed, epoch)."""

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
    ) -> None:
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
        )
        return iter(loader)


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _subset(n: int, k: int | None, seed: int, stream: int) -> Tensor | None:
    if k is None or k >= n:
        return None
    return torch.randperm(n, generator=epoch_generator(seed, -1, stream))[:k].sort().values


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


def _is_folder_layout(root: Path) -> bool:
    return (root / "train").is_dir()


def build_data(
    cfg: TrainConfig,
    *,
    rank: int = 0,
    world: int = 1,
    train: bool = True,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    pin_memory: bool = False,
) -> DataBundle:
    """Build the loaders for ``cfg``; batch size per rank is ``cfg.batch_size // world``.

    ``train=False`` builds only the evaluation loader (``compconv eval``); ``stats`` (mean, std) then
    comes from the checkpoint so evaluation normalises exactly as training did.
    """
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    per_rank = cfg.batch_size // world
    name = cfg.dataset
    root = Path(cfg.data_dir).expanduser() if cfg.data_dir else None
    if name in ("cifar10", "cifar100") and not (root is not None and _is_folder_layout(root)):
        root = root or default_cache_dir() / "datasets"
        tr = _torchvision_cifar(name, root, cfg.download, True) if train or stats is None else None
        if cfg.eval_split not in ("auto", "test", "train"):
            raise ValueError(f"eval_split {cfg.eval_split!r}: torchvision {name} has only 'test' (auto) and 'train'")
        ev = _torchvision_cifar(name, root, cfg.download, cfg.eval_split == "train")
        source = f"torchvision {name} ({root})"
        return _array_bundle(cfg, tr, ev, rank, world, per_rank, train, stats, source)
    if root is None:
        raise ValueError(f"dataset {name!r} needs data_dir (--data-dir ROOT with ROOT/train/<class>/*)")
    paths, _, classes = scan_folder(root, "train")
    if name == "cifar10" and len(classes) != 10 or name == "cifar100" and len(classes) != 100:
        raise ValueError(
            f"dataset {name!r} expects {10 if name == 'cifar10' else 100} classes, but "
            f"{str(root / 'train')!r} has {len(classes)}"
        )
    w, h = _peek_size(paths[0])
    if max(w, h) <= SMALL_MAX:
        tr = (
            load_small_folder(root, "train", image_size=cfg.image_size, cache_dir=cfg.cache_dir)
            if train or stats is None
            else None
        )
        ev = load_small_folder(
            root, cfg.eval_split, image_size=cfg.image_size or w, classes=classes, cache_dir=cfg.cache_dir
        )
        return _array_bundle(cfg, tr, ev, rank, world, per_rank, train, stats, f"folder {root}")
    return _folder_bundle(cfg, root, classes, rank, world, per_rank, train, pin_memory)


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
) -> DataBundle:
    ev_images, ev_labels, classes = ev
    if stats is None:
        stats = _channel_stats(tr[0])  # from the full training split, before any subset
    mean, std = stats
    size = int(ev_images.shape[-1])
    pad = cfg.crop_padding if cfg.crop_padding is not None else size // 8
    sel = _subset(len(ev_images), cfg.eval_subset, cfg.seed, 2)
    evx, evy = torch.from_numpy(ev_images), torch.from_numpy(ev_labels)
    if sel is not None:
        evx, evy = evx[sel], evy[sel]
    eval_loader = ArrayLoader(evx, evy, per_rank, train=False, mean=mean, std=std, rank=rank, world=world)
    train_loader = None
    n_train = 0
    if train:
        images, labels, tr_classes = tr
        if tr_classes != classes:
            raise ValueError("training and evaluation splits have different classes")
        x, y = torch.from_numpy(images), torch.from_numpy(labels)
        sel = _subset(len(x), cfg.train_subset, cfg.seed, 1)
        if sel is not None:
            x, y = x[sel], y[sel]
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
    )


def _folder_bundle(
    cfg: TrainConfig,
    root: Path,
    classes: list[str],
    rank: int,
    world: int,
    per_rank: int,
    train: bool,
    pin_memory: bool,
) -> DataBundle:
    from torchvision import datasets, transforms

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
    ev_dir = _split_dir(root, cfg.eval_split)
    scan_folder(root, ev_dir.name, classes)  # clear errors for an empty or mismatched split
    ev_ds: Any = datasets.ImageFolder(str(ev_dir), transform=ev_tf, allow_empty=True)
    if ev_ds.classes != classes:  # an eval split missing a class: re-map to the training labels
        idx = {c: i for i, c in enumerate(classes)}
        ev_ds.samples = [(p, idx[ev_ds.classes[t]]) for p, t in ev_ds.samples]
        ev_ds.targets = [t for _, t in ev_ds.samples]
    sel = _subset(len(ev_ds), cfg.eval_subset, cfg.seed, 2)
    if sel is not None:
        ev_ds = torch.utils.data.Subset(ev_ds, sel.tolist())
    def loader(ds: Any, train: bool) -> FolderLoader:
        return FolderLoader(
            ds, per_rank, train=train, seed=cfg.seed, rank=rank, world=world, workers=cfg.workers, pin_memory=pin_memory
        )

    eval_loader = loader(ev_ds, train=False)
    train_loader = None
    n_train = 0
    if train:
        tr_ds: Any = datasets.ImageFolder(str(root / "train"), transform=tr_tf)
        sel = _subset(len(tr_ds), cfg.train_subset, cfg.seed, 1)
        if sel is not None:
            tr_ds = torch.utils.data.Subset(tr_ds, sel.tolist())
        train_loader = loader(tr_ds, train=True)
        n_train = len(tr_ds)
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
        len(ev_ds),
    )
