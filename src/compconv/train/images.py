"""Image folders on disk: which files are classes and images, decoding them, and the ones that do not decode.

* ``scan_folder`` lists ``ROOT/<split>/<class>/<image>``. Hidden entries (a name starting with ``.``, such
  as ``.ipynb_checkpoints`` or macOS ``._x.jpg``, and ``__MACOSX``) are never classes or images; a class
  folder without an image is an error (it would be a label no image can teach).
* ``load_small_folder`` decodes a small-image split into one ``uint8`` array, only the images a run reads
  unless the whole split is cached, with a progress bar on stderr. Every image must have the same size
  (the one a checkpoint records, or one size shared by the whole split): an odd-sized file is refused by
  name, never resized silently; an explicit ``image_size`` resizes every image.
* ``sample_sizes`` reads the headers of files spread over a split: which pipeline (in-memory small images
  or the DataLoader for large ones) a new run takes is decided by the images, never by the first file.
* Images that do not decode (truncated, zero bytes, not an image) are collected, all of them, and handled
  by ``bad_images``: ``"error"`` raises ``BadImageError`` listing every one; ``"skip"`` leaves them out
  and prints them.
* ``ImageList`` is the dataset of the large-image path, built from the same scan; a file that fails to
  decode inside a DataLoader worker comes back as a marker naming it, never as an anonymous traceback.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "IMG_EXTENSIONS",
    "BadImageError",
    "Decoded",
    "ImageSizeError",
    "ImageList",
    "handle_bad_images",
    "is_hidden",
    "load_small_folder",
    "sample_sizes",
    "scan_folder",
    "split_dir",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# 2: images are decoded at their own size and a split of mixed sizes is refused (version 1 resized every
# image to the first file's size, so its caches may hold silently resized images: not reused).
_CACHE_VERSION = 2
_SKIPPED_NAMES = ("__MACOSX",)


class BadImageError(ValueError):
    """Images that could not be decoded; ``bad`` holds ``(path, reason)`` for every one found."""

    def __init__(self, message: str, bad: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.bad = list(bad)


class ImageSizeError(ValueError):
    """Images whose size differs from the split's (or the checkpoint's); ``odd`` holds ``(path, (w, h))``."""

    def __init__(self, message: str, odd: Sequence[tuple[str, tuple[int, int]]] = ()) -> None:
        super().__init__(message)
        self.odd = list(odd)


def is_hidden(name: str) -> bool:
    """Hidden files and folders (``.x``, ``._x.jpg``, ``.ipynb_checkpoints``) and ``__MACOSX``."""
    return name.startswith(".") or name in _SKIPPED_NAMES


def handle_bad_images(bad: Sequence[tuple[str, str]], mode: str | None, where: str) -> None:
    """Apply the ``bad_images`` policy: raise listing every bad file (``error``) or print them (``skip``).

    ``None`` does nothing (the caller collects the bad files of several splits and applies the policy once,
    so the error lists every bad file of the run, not only the first split's).
    """
    if not bad or mode is None:
        return
    lines = "\n".join(f"  {p}: {why}" for p, why in bad)
    if mode == "error":
        raise BadImageError(
            f"{len(bad)} image(s) under {where} cannot be decoded (truncated, empty or not an image):\n{lines}\n"
            "Fix or remove them, or pass --bad-images skip to leave them out (they are listed, and counted in "
            "the output: results.json for compconv train, the printed result for compconv eval)",
            bad,
        )
    print(f"compconv: skipping {len(bad)} image(s) under {where} that cannot be decoded:\n{lines}", file=sys.stderr)


def split_dir(root: Path, split: str) -> Path:
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
    root: str | os.PathLike[str], split: str, classes: list[str] | None = None, *, fixed: bool = False
) -> tuple[list[str], list[int], list[str]]:
    """List ``ROOT/<split>/<class>/<image>`` files: (paths, labels, classes), sorted for determinism.

    ``classes`` (from the training split or a checkpoint) fixes the label of each class *by name*; a
    folder class not in it raises ValueError. Hidden entries are skipped; an empty class folder raises
    ValueError naming it. ``fixed``: the class set is a checkpoint's (every class must be there), so the
    message for an empty folder asks for its images rather than its removal.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data_dir {str(root)!r} does not exist; pass --data-dir ROOT with ROOT/train/<class>/* and "
            "ROOT/val/<class>/* (or ROOT/test/<class>/*)"
        )
    d = split_dir(root, split)
    if not d.is_dir():
        raise FileNotFoundError(
            f"data_dir {str(root)!r} has no {d.name!r} folder; expected the ImageNet-style layout "
            f"ROOT/train/<class>/* and ROOT/val|test/<class>/*"
        )
    found = sorted(e.name for e in os.scandir(d) if e.is_dir() and not is_hidden(e.name))
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
        names = sorted(
            e.name
            for e in os.scandir(d / c)
            if e.is_file() and not is_hidden(e.name) and e.name.lower().endswith(IMG_EXTENSIONS)
        )
        if not names:
            way = (
                "add its images (the checkpoint's model has this class, so the folder must hold it)"
                if fixed
                else "add its images or remove the folder"
            )
            raise ValueError(
                f"no images found under {str(d / c)!r}: an empty class folder would be a label without "
                f"images (expected files with one of the extensions {', '.join(IMG_EXTENSIONS)}); {way}"
            )
        paths += [str(d / c / n) for n in names]
        labels += [idx[c]] * len(names)
    if not paths:
        raise ValueError(
            f"no images found under {str(d)!r} (expected {d}/<class>/<image> with one of the extensions "
            f"{', '.join(IMG_EXTENSIONS)})"
        )
    return paths, labels, classes


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


def sample_sizes(paths: Sequence[str], k: int = 64) -> list[tuple[str, tuple[int, int]]]:
    """``(path, (W, H))`` of up to ``k`` files spread evenly over ``paths`` (headers only; unreadable skipped).

    Spread, not the first ``k``: one odd file at the start of the sort order cannot decide for the split.
    """
    from PIL import Image

    if not paths:
        return []
    idx = sorted(set(np.linspace(0, len(paths) - 1, num=min(k, len(paths))).round().astype(int).tolist()))
    out = []
    for i in idx:
        try:
            with Image.open(paths[i]) as im:
                out.append((paths[i], im.size))
        except Exception:  # noqa: BLE001 - PIL raises many types for bad files; the decode names them
            continue
    return out


def _size_error(
    odd: list[tuple[str, tuple[int, int]]], want: tuple[int, int], n: int, where: str, why: str
) -> ImageSizeError:
    lines = "\n".join(f"  {p}: {w}x{h}" for p, (w, h) in odd[:20])
    more = f"\n  ... and {len(odd) - 20} more" if len(odd) > 20 else ""
    return ImageSizeError(
        f"{len(odd)} of {n} image(s) under {where} are not {want[0]}x{want[1]} ({why}):\n{lines}{more}\n"
        "Resizing them silently would change what the model sees; fix or remove them, or start the run with "
        "--image-size N, which resizes every image to NxN (recorded in the run's config)",
        odd,
    )


def _decode(path: str, size: tuple[int, int] | None) -> np.ndarray:
    """``uint8 (H, W, 3)``: resized to ``size`` (W, H) when given, else at the file's own size."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != size:
            im = im.resize(size, Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _try_decode(path: str, size: tuple[int, int] | None) -> np.ndarray | str:
    try:
        return _decode(path, size)
    except Exception as e:  # noqa: BLE001 - truncated, empty, garbage: the reason is reported with the path
        return _why(e)


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


class Decoded(NamedTuple):
    """A decoded small-image split: ``uint8 (N, 3, H, W)``, ``int64 (N,)`` labels, class names, bad files."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    bad: list[tuple[str, str]]  # (path, reason) of the selected files that did not decode


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled, mininterval=0.5 if tty else 10.0
    )


def load_small_folder(
    root: str | os.PathLike[str],
    split: str,
    *,
    image_size: int | None = None,
    expect_size: tuple[int, int] | None = None,
    classes: list[str] | None = None,
    fixed_classes: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    select: Callable[[int], Sequence[int] | None] | None = None,
    bad_images: str | None = "error",
    progress: bool = False,
) -> Decoded:
    """Decode a small-image split: the images ``select(n_files)`` picks (sorted indices; None: all).

    Sizes: ``image_size`` resizes every image to ``image_size x image_size`` (an explicit choice, recorded
    in the run's config). Without it every image is kept at its own size, which must be ``expect_size``
    (``(W, H)``, the size a checkpoint's model was trained on) or, when that is None, one size shared by
    every image read; otherwise ``ImageSizeError`` names every odd file (nothing is resized silently).

    The whole split is cached under ``cache_dir`` keyed by the folder's path, file list, sizes and mtimes
    (a changed folder is decoded again; a cache that cannot be read is rebuilt). Without a cache, a
    selection decodes only its own files (``--train-subset 2560`` decodes 2,560 images, not 50,000).
    Files that do not decode are handled by ``bad_images`` (``handle_bad_images``; None: only returned).
    """
    from compconv.train.data import default_cache_dir

    paths, labels, classes = scan_folder(root, split, classes, fixed=fixed_classes)
    sel = select(len(paths)) if select is not None else None
    sel_arr = None if sel is None else np.asarray(sel, dtype=np.int64)
    size = (image_size, image_size) if image_size else None
    key = hashlib.sha1()
    mode = f"resize{size}" if size else "native"
    key.update(f"v{_CACHE_VERSION}|{Path(root).resolve()}|{split}|{mode}|{','.join(classes)}".encode())
    for p in paths:  # relative names: "../data/x" and "/abs/data/x" share one cache file
        st = os.stat(p)
        key.update(f"{os.path.relpath(p, root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    split_name = Path(paths[0]).parts[-3]  # "train", "val" or "test" ("auto" resolved)
    where = repr(str(Path(paths[0]).parent.parent))
    cache = (
        Path(cache_dir or default_cache_dir()) / f"{Path(root).resolve().name}-{split_name}-{key.hexdigest()[:16]}.npz"
    )
    lab_all = np.asarray(labels, dtype=np.int64)
    full: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # images, index into paths, bad index
    reasons: dict[int, str] = {}
    if use_cache and cache.is_file():
        try:
            with np.load(cache) as z:
                images = z["images"]
                index = z["index"]
                bad_idx = z["bad_index"]
                reasons = dict(zip(bad_idx.tolist(), z["bad_reason"].tolist(), strict=True))
            if len(images) + len(bad_idx) == len(paths):
                full = (images, index, bad_idx)
        except Exception:  # noqa: BLE001 - a bad cache is rebuilt, never trusted
            full = None
    if full is None:
        todo = np.arange(len(paths)) if sel_arr is None else sel_arr
        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as ex, _progress(
            len(todo), f"decoding {split_name} images", progress
        ) as bar:
            out = []
            for r in ex.map(lambda i: _try_decode(paths[i], size), todo.tolist()):
                out.append(r)
                bar.update(1)
        ok = [i for i, r in enumerate(out) if not isinstance(r, str)]
        reasons = {int(todo[i]): r for i, r in enumerate(out) if isinstance(r, str)}
        arrays = [out[i] for i in ok]
        if size is None and arrays:  # one size for every image read, or the odd files by name
            got = [(a.shape[1], a.shape[0]) for a in arrays]  # (W, H)
            want = expect_size or Counter(got).most_common(1)[0][0]
            odd = [(paths[int(todo[i])], wh) for i, wh in zip(ok, got, strict=True) if wh != want]
            if odd:
                why = "the size the model was trained on" if expect_size else "the size of the other images"
                raise _size_error(odd, want, len(arrays), where, why)
        h_w = (size[1], size[0]) if size else ((expect_size[1], expect_size[0]) if expect_size else (0, 0))
        images = (
            np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))  # NHWC -> NCHW
            if arrays
            else np.zeros((0, 3, *h_w), np.uint8)
        )
        index = todo[ok]
        bad_idx = np.asarray(sorted(reasons), dtype=np.int64)
        if use_cache and sel_arr is None:
            try:
                _atomic_save_npz(
                    cache,
                    images=images,
                    labels=lab_all[index],
                    index=index,
                    bad_index=bad_idx,
                    bad_reason=np.asarray([reasons[i] for i in bad_idx.tolist()], dtype=str),
                )
            except OSError:  # a read-only cache dir only costs the decode next time
                pass
    else:
        images, index, bad_idx = full
        if size is None and expect_size and len(images) and (images.shape[3], images.shape[2]) != expect_size:
            # a cached split is all one size: every image is odd
            shape = (int(images.shape[3]), int(images.shape[2]))
            raise _size_error([(paths[i], shape) for i in index.tolist()], expect_size, len(images), where,
                              "the size the model was trained on")
    if sel_arr is not None:
        rows = np.isin(index, sel_arr)
        images, index = images[rows], index[rows]
        bad_idx = bad_idx[np.isin(bad_idx, sel_arr)]
    bad = [(paths[i], reasons.get(i, "does not decode")) for i in bad_idx.tolist()]
    handle_bad_images(bad, bad_images, where)
    return Decoded(np.ascontiguousarray(images), lab_all[index], classes, bad)


class ImageList:
    """``(image, label)`` from a list of ``(path, label)``, for the DataLoader path (large images).

    A file that does not decode yields ``(None, path, reason)`` instead of raising inside a worker; the
    loader's ``collate`` takes it out of the batch and names it (see ``FolderLoader``).
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable[[Any], Any]) -> None:
        self.samples, self.transform = samples, transform
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
            return self.transform(img), label
        except Exception as e:  # noqa: BLE001 - reported with the file's name by the loader
            return None, path, _why(e)


def collate_named(batch: list[tuple[Any, ...]]) -> tuple[Any, Any, list[tuple[str, str]]]:
    """Default collation of the good samples; ``(x, y, [(path, reason) of the bad ones])``."""
    import torch
    from torch.utils.data import default_collate

    good = [b for b in batch if b[0] is not None]
    bad = [(b[1], b[2]) for b in batch if b[0] is None]
    if not good:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64), bad
    x, y = default_collate(good)
    return x, y, bad
