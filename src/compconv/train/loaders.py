"""Loaders: in-memory small-image batches (``ArrayLoader``) and the DataLoader path (``FolderLoader``).

Shuffling and augmentation draw from a generator seeded by ``(seed, epoch)``, so an epoch's batches
depend only on the seed and the epoch number: a resumed run sees exactly the batches an uninterrupted
one would, and (for the array path) the same images whatever the number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from compconv.train.images import collate_named, handle_bad_images

__all__ = ["ArrayLoader", "EpochSampler", "FolderLoader", "epoch_generator"]


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
