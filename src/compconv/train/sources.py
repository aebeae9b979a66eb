"""Where a run's model (and its teacher) come from: a name, a weights file, a compconv save file, an object.

* ``weights``: a file of trained weights loaded into the model the config builds: a plain state_dict,
  a compconv training checkpoint (its ``model``) or a ``compconv.save`` file (its ``state_dict``); a
  mismatch names the missing / unexpected / misshapen keys.
* ``init``: a ``compconv.save`` file (e.g. written by ``compconv compress``): its architecture (base model,
  conversion) *and* weights are the run's starting point. The architecture is stored in every checkpoint
  (``arch``), so resume and eval do not need the file again.
* a model object (``train(cfg, model=...)``): its class is recorded; it cannot be rebuilt from a name, so
  resume and eval need the same architecture passed again (``model=``), else they refuse.
* ``teacher``: a run directory / training checkpoint, a ``compconv.save`` file, or a model name with
  ``teacher_weights``; always in eval mode, without gradients.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["arch_of_save", "binarized_source", "build_from_arch", "build_teacher", "check_same_classes",
           "load_weights", "model_class", "read_weights", "recorded_binary", "recorded_classes", "state_fingerprint"]


def model_class(model: nn.Module) -> str:
    """``module.QualName`` of a model object (what a run trained on an object records)."""
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _read(path: str | os.PathLike[str], what: str = "weights file") -> Any:
    """The file through the one integrity-checked loader (CRC of every entry, finite tensors)."""
    from compconv.train.checkpoint import read_verified

    return read_verified(path, what)


def read_weights(path: str | os.PathLike[str], what: str = "weights file") -> dict[str, torch.Tensor]:
    """The state_dict in ``path``: a plain state_dict, a training checkpoint or a ``compconv.save`` file."""
    obj = _read(path, what)
    if isinstance(obj, dict) and obj.get("format") == "compconv-model":
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "format_version" in obj and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a compconv training checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {str(path)!r} holds no state_dict (a dict of tensors), a compconv "
                         "training checkpoint or a compconv.save file")
    # a DDP-saved state_dict: "module." prefixes are not part of the model's names
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def binarized_source(path: str | os.PathLike[str]) -> str:
    """Why ``path`` (a file or run directory) holds a binarized model: "is the checkpoint of a binarized run
    (compconv train --binarize)", "is a binarized model file (compconv.binarize)"; '' when it does not."""
    from compconv.train.checkpoint import find_checkpoint

    p = Path(path)
    obj = _read(find_checkpoint(p) if p.is_dir() else p)
    if not isinstance(obj, dict):
        return ""
    if "format_version" in obj and isinstance(obj.get("config"), dict):
        if obj["config"].get("binarize") or (obj.get("arch") or {}).get("binary"):
            return "is the checkpoint of a binarized run (compconv train --binarize)"
    elif obj.get("format") == "compconv-model" and obj.get("binary"):
        return "is a binarized model file (compconv.binarize)"
    return ""


def recorded_binary(path: str | os.PathLike[str], what: str = "weights file") -> dict[str, Any] | None:
    """The binarized layers and their options a file records: a ``compconv.save`` file's ``binary``, a training
    checkpoint's ``arch["binary"]`` (a run started from a binarized ``--init`` file); None when it records none
    (a plain state_dict; a ``--binarize`` run of a named model, binarized with ``binarize``'s defaults)."""
    obj = _read(path, what)
    if isinstance(obj, dict) and obj.get("format") == "compconv-model":
        return obj.get("binary") or None
    if isinstance(obj, dict) and isinstance(obj.get("arch"), dict):
        return obj["arch"].get("binary") or None
    return None


def load_weights(model: nn.Module, path: str | os.PathLike[str], what: str = "weights") -> None:
    """Load ``path``'s state_dict strictly; a mismatch raises ValueError naming the keys (at most 5 each)."""
    sd = read_weights(path, what)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")

        parts = [f"{len(missing)} missing keys: {few(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"{len(shapes)} keys of another shape (file vs model): {few(shapes)}" if shapes else ""]
        raise ValueError(f"{what} {str(path)!r} do not fit the model: " + "; ".join(p for p in parts if p)
                         + ". Check --model / --method (and num_classes) against the model that wrote the file")
    model.load_state_dict(sd, strict=True)


def arch_of_save(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{base, base_kwargs, method, layers, binary, extra}`` of a ``compconv.save`` file (its architecture and what
    its maker recorded, e.g. the data folder; no weights)."""
    obj = _read(path, "init")
    if not isinstance(obj, dict) or obj.get("format") != "compconv-model":
        raise ValueError(f"init {str(path)!r} is not a compconv model file (written by compconv.save / "
                         "compconv compress); for plain weights use --weights")
    if obj.get("base") is None:
        raise ValueError(f"init {str(path)!r} records no base model, so the trainer cannot rebuild it; "
                         "save it with compconv.save(..., base=NAME)")
    return {**{k: obj[k] for k in ("base", "base_kwargs", "method", "layers")}, "binary": obj.get("binary") or {},
            "extra": obj.get("extra") or {}}


def build_from_arch(arch: dict[str, Any]) -> nn.Module:
    """Build (random weights) the model an ``arch`` record describes, as ``compconv.load`` does."""
    from compconv.serialization import build_base

    model = build_base(arch["base"], **dict(arch.get("base_kwargs") or {}))
    layers: dict[str, dict[str, Any]] = arch.get("layers") or {}
    if layers:
        from compconv.compress.candidates import exact_pattern
        from compconv.convert import convert

        convert(model, arch["method"], include=[exact_pattern(n) for n in layers], keep_stem=False,
                overrides={exact_pattern(n): dict(o) for n, o in layers.items()})
    if arch.get("binary"):  # a binarized save file (compconv.binarize)
        from compconv.binary.transform import apply_binarization

        apply_binarization(model, arch["binary"])
    return model


def recorded_classes(path: str | os.PathLike[str], what: str) -> list[str] | None:
    """The class names a training checkpoint / run directory or a ``compconv compress`` file records (None if none).

    A plain state_dict records none: its logits' order cannot be checked.
    """
    from compconv.train.checkpoint import find_checkpoint

    p = Path(path)
    obj = _read(find_checkpoint(p) if p.is_dir() else p, what)
    if not isinstance(obj, dict):
        return None
    rec = obj.get("data") if "format_version" in obj else (obj.get("extra") or {}).get("data")
    classes = (rec or {}).get("classes") if isinstance(rec, dict) else None
    return list(classes) if classes is not None else None


def check_same_classes(sources_: dict[str, str | None], classes: list[str]) -> None:
    """Refuse a teacher / init / weights file whose recorded classes differ from the data's.

    Logit j of such a model means another class than label j: distilling from it or fine-tuning it would
    silently mislabel (e.g. a teacher trained where ``automobile`` was renamed). Raises ValueError naming both.
    """
    for what, src in sources_.items():
        if src is None or not Path(src).exists():
            continue
        rec = recorded_classes(src, what)
        if rec is not None and rec != list(classes):
            diff = sorted(set(rec) ^ set(classes))
            detail = f"differing names: {diff}" if diff else "the same names in another order"
            raise ValueError(
                f"{what} {str(src)!r} was trained on the classes {rec}, but the data has {list(classes)} "
                f"({detail}): its logits would mean other classes than the labels. Use the data it was trained "
                "on, or a model trained on these classes"
            )


def state_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a model's state_dict: names, shapes and bytes."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def build_teacher(teacher: str, weights: str | None, num_classes: int) -> nn.Module:
    """The teacher model, in eval mode with ``requires_grad=False`` on every parameter.

    ``teacher``: a run directory or training checkpoint (its config builds the model, its weights are
    loaded), a ``compconv.save`` file, or a model name (zoo / ``torchvision:`` / ``timm:``) with
    ``weights``. Raises ValueError / FileNotFoundError naming the argument.
    """
    p = Path(teacher)
    if p.exists():
        if weights is not None:
            raise ValueError(f"teacher_weights={weights!r} is only for a teacher given by model name; teacher "
                             f"{teacher!r} is a file or run directory that holds its own weights")
        from compconv.train.checkpoint import find_checkpoint

        f = find_checkpoint(p)
        obj = _read(f, "teacher")
        if isinstance(obj, dict) and obj.get("format") == "compconv-model":
            from compconv.serialization import load

            model = load(f)
        elif isinstance(obj, dict) and "format_version" in obj and "config" in obj:
            from compconv.train.config import TrainConfig
            from compconv.train.engine import build_model

            tcfg = TrainConfig.from_dict(obj["config"])
            model = build_model(tcfg, num_classes, arch=obj.get("arch"), load_init=False)
            load_weights(model, f, "teacher weights")
        else:
            raise ValueError(f"teacher {teacher!r} is neither a run directory, a compconv training checkpoint "
                             "nor a compconv.save file; for a plain state_dict pass teacher=MODEL_NAME and "
                             "teacher_weights=PATH")
    else:
        if weights is None:
            raise ValueError(f"teacher {teacher!r} is not an existing file or run directory; as a model name it "
                             "needs teacher_weights=PATH (a teacher with random weights teaches nothing)")
        from compconv.models import get_model

        model = get_model(teacher, num_classes=num_classes)
        load_weights(model, weights, "teacher weights")
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model
