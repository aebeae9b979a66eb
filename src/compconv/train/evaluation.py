"""``compconv eval``: a checkpoint evaluated on exactly the data its run was evaluated on.

The checkpoint records its class names, normalisation, pipeline, image size, eval folder and number of
eval images. The data is read with those (never a new guess from the files), a relative ``data_dir``
recorded by an older version is found from the run directory (never the current directory), and an eval
set whose size differs from the recorded one is refused unless ``--data-dir`` / ``--eval-subset`` /
``--bad-images skip`` asked for other images explicitly (the result then says how many it used).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from compconv.train import checkpoint as ckpt_mod
from compconv.train.config import TrainConfig
from compconv.train.data import build_data, data_root
from compconv.train.distributed import init_distributed
from compconv.train.loops import evaluate
from compconv.train.resume import recorded_data_dir, run_dir_of

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(
    path: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    eval_subset: int | None = -1,
    split: str | None = None,
    bad_images: str | None = None,
    progress: bool = True,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Rebuild the model from a checkpoint's config, load its weights and evaluate on its eval split.

    ``split`` evaluates another split instead (``"train"``: the training images without augmentation, which
    measures how well the model fits them; a folder name such as ``"val"``/``"test"``). Returns ``{"top1",
    "top5", "loss", "n", "per_class_top1", "per_class_n", "classes", "split": the folder read, "recorded":
    the metrics stored in the checkpoint (for the run's own eval split), "recorded_n", "bad_images", "binarize":
    whether the model is binarized}``.

    Raises CheckpointError for a damaged checkpoint (or one that does not fit its model), ValueError when
    the data's class names differ from the checkpoint's (the same names in another order are mapped by
    name) or when the number of eval images differs from the recorded one without an explicit
    ``data_dir`` / ``eval_subset`` / ``bad_images="skip"``, ImageSizeError for images of another size than
    the model was trained on, FileNotFoundError for a data directory that does not exist (or a relative
    recorded one that cannot be found from the run directory).

    ``path`` may also be a ``compconv.save`` file written by ``compconv compress`` (it records its data's
    normalisation and classes); ``model``: the architecture of a run trained on a model object.
    ``batch_size``: images per forward (None: the run's). ``eval_subset``: a seeded random subset of that many
    images (an int >= 1; a subset larger than the split is the whole split), None for the whole split, -1
    (default) for the run's own setting. A value out of range is a ValueError naming it.
    """
    p = ckpt_mod.find_checkpoint(path)
    try:
        state = ckpt_mod.load_checkpoint(p)
    except ckpt_mod.CheckpointError:  # not a training checkpoint: maybe a compconv.save file
        ckpt_mod._verify_archive(p)  # changed bytes are refused whatever the file is (CheckpointError)
        saved = _saved_model(p)
        if saved is None:
            raise
        return _evaluate_saved(p, saved, data_dir, device, batch_size, eval_subset, split, bad_images, progress)
    cfg = TrainConfig.from_dict(state["config"])
    if split is not None:
        cfg.eval_split = split
    if data_dir is not None:
        cfg.data_dir = data_dir
    else:  # an older checkpoint's relative path: from the run directory, never the current directory
        cfg.data_dir = recorded_data_dir(cfg.data_dir, run_dir_of(p) or p.parent, cfg.out_dir)
    if cfg.data_dir:
        cfg.data_dir = str(data_root(cfg.data_dir))
    if batch_size is not None:
        cfg.batch_size = batch_size
    if eval_subset != -1:
        cfg.eval_subset = eval_subset
    if bad_images is not None:
        cfg.bad_images = bad_images
    cfg.device = device
    cfg.validate()  # the overrides above: a batch_size / eval_subset below 1 names the argument
    info, dev = init_distributed(device)
    if info.enabled:
        raise ValueError("compconv eval runs in one process; launch it without torchrun")
    d = state.get("data", {})
    # the checkpoint's class names fix each label by name; its pipeline and image size are used as recorded
    data = build_data(cfg, train=False, recorded=d, progress=progress)
    explicit = data_dir is not None or eval_subset != -1 or cfg.bad_images == "skip"
    if split is None and "n_eval" in d and data.n_eval != d["n_eval"] and not explicit:
        raise ValueError(
            f"{p} was evaluated on {d['n_eval']} images, but {data.source} gives {data.n_eval} in "
            f"{data.eval_dir!r}: the data changed or is another copy, so the recorded metrics would not be "
            "comparable. Pass --data-dir with the run's data, or pass --data-dir / --eval-subset explicitly to "
            "evaluate these images anyway"
        )
    from compconv.train.engine import build_model

    model = build_model(cfg, data.num_classes, model=model, arch=state.get("arch"), load_init=False)
    ckpt_mod.load_model_state(model, state, p)
    model.to(dev)
    channels_last = cfg.channels_last if cfg.channels_last is not None else dev.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    res = evaluate(model, data.eval, dev, amp=cfg.amp, channels_last=channels_last, progress=progress)
    res["classes"] = data.classes
    res["split"] = data.eval_dir
    res["data_dir"] = data.source
    res["recorded"] = state.get("metrics", {})
    res["recorded_n"] = d.get("n_eval")
    res["bad_images"] = [b for b, _ in data.bad]
    res["epoch"] = state["epoch"]
    res["checkpoint"] = str(Path(p))
    res["binarize"] = bool(cfg.binarize or (state.get("arch") or {}).get("binary"))
    return res


def _saved_model(p: Path) -> dict[str, Any] | None:
    """The payload of a ``compconv.save`` file, None for anything else (a training checkpoint)."""
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a training checkpoint (pickled RNG states) or a damaged file
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == "compconv-model" else None


def _evaluate_saved(p: Path, payload: dict[str, Any], data_dir: str | None, device: str, batch_size: int | None,
                    eval_subset: int | None, split: str | None, bad_images: str | None,
                    progress: bool) -> dict[str, Any]:
    """Evaluate a ``compconv.save`` file on the data recorded in it (``extra["data"]``, ``extra["dataset"]``)."""
    from compconv.serialization import load

    extra = payload.get("extra") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"{p}: its extra record is a {type(extra).__name__}, not a dict; it cannot say what data "
                         "the model takes")
    rec, dataset = extra.get("data"), extra.get("dataset")
    for key, want in (("data", dict), ("dataset", str), ("data_dir", str)):
        if extra.get(key) is not None and not isinstance(extra[key], want):
            raise ValueError(f"{p}: extra[{key!r}] is {extra[key]!r}, not a {want.__name__}: the recorded data is "
                             "malformed (evaluate with an intact run checkpoint, or re-save the model with a data "
                             "record from one)")
    if not rec or not dataset:
        raise ValueError(f"{p} records no data (dataset, normalisation, image size: it was not written by "
                         "compconv compress), and --data-dir alone cannot say how its inputs were normalised: "
                         "evaluate it with compconv.train.evaluate(compconv.load(path), loader, device) on your "
                         "own loader")
    cfg = TrainConfig(dataset=dataset, data_dir=data_dir or extra.get("data_dir"), download=False,
                      progress=progress, device=device)
    if split is not None:
        cfg.eval_split = split
    if batch_size is not None:
        cfg.batch_size = batch_size
    if eval_subset not in (-1, None):
        cfg.eval_subset = eval_subset
    if bad_images is not None:
        cfg.bad_images = bad_images
    if cfg.data_dir:
        cfg.data_dir = str(data_root(cfg.data_dir))
    cfg.validate()
    rec = {k: v for k, v in rec.items() if k != "n_eval"}  # the file was not evaluated on a fixed set
    _, dev = init_distributed(device)
    data = build_data(cfg, train=False, recorded=rec, progress=progress)
    model = load(p).to(dev)
    res = evaluate(model, data.eval, dev, amp=cfg.amp, progress=progress)
    res.update(classes=data.classes, split=data.eval_dir, data_dir=data.source, recorded={}, recorded_n=None,
               bad_images=[b for b, _ in data.bad], epoch=None, checkpoint=str(p), binarize=bool(payload.get("binary")))
    return res
