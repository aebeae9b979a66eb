"""Training configuration: one dataclass, presets, a YAML/JSON file and ``key=value`` overrides.

Resolution order (later wins): dataclass defaults -> ``--preset`` -> ``--config FILE`` -> dedicated
command-line flags (``--model``, ``--epochs``, ...) -> ``--set key=value``. The resolved config is written
to every run directory as ``config.yaml`` and stored in every checkpoint, so a run can be resumed or
evaluated from its directory alone.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = ["PRESETS", "TrainConfig", "apply_overrides", "load_config_file", "parse_set", "resolve_config"]

DATASETS = ("cifar10", "cifar100", "folder")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "multistep", "constant")
AUGMENTS = ("standard", "none")
AMP_MODES = ("auto", "bf16", "none")
BAD_IMAGES = ("error", "skip")


@dataclass
class TrainConfig:
    """Everything that determines a run. Epoch-based schedule; the LR is updated every iteration."""

    # model
    model: str = "cifar_resnet20"
    method: str | None = None  # None: vanilla; else a registered compact-conv method (compconv.list_methods())
    method_options: dict[str, Any] = field(default_factory=dict)  # passed to compconv.convert(**options)
    binarize: bool = False  # XNOR-Net binarization (compconv.binarize) after the model is built / converted
    weights: str | None = None  # trained weights for the built model: state_dict / checkpoint / compconv.save file
    init: str | None = None  # a compconv.save file (e.g. from compconv compress): architecture and weights
    model_object: str | None = None  # set by train(model=obj): the object's class (not rebuildable by name)
    # distillation (Hinton et al. 2015): loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE
    teacher: str | None = None  # run dir / checkpoint / compconv.save file / model name (+ teacher_weights)
    teacher_weights: str | None = None
    distill_alpha: float = 0.9
    distill_temperature: float = 4.0
    # feature distillation (compconv.train.features): + beta * mean relative squared error at these modules
    distill_features: str | list[str] | None = None  # "auto" (block outputs of equal shape) or module names
    distill_feature_weight: float | None = None  # beta; None: 1 (only with distill_features)
    freeze_bn_stats: bool = False  # BatchNorm normalises with its running statistics and keeps them (fine-tunes)
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 (torchvision or a folder) | folder (ImageNet-style)
    data_dir: str | None = None
    download: bool = True  # torchvision CIFAR download when data_dir has no copy
    image_size: int | None = None  # None: the images' own size (small) or 224 (large)
    augment: str = "standard"  # standard: pad-crop + flip (small), RandomResizedCrop + flip (large)
    crop_padding: int | None = None  # small images; None: image_size // 8 (4 for 32x32)
    train_subset: int | None = None  # use a seeded random subset of this many training images
    eval_subset: int | None = None  # ... and of evaluation images
    eval_split: str = "auto"  # auto: val if present, else test
    workers: int = 4  # DataLoader workers for large images (small images never use workers)
    cache_dir: str | None = None  # decoded-array cache; None: $COMPCONV_CACHE or ~/.cache/compconv
    bad_images: str = "error"  # error: refuse a run whose images do not decode, listing them; skip: leave them out
    # optimisation
    epochs: int = 30
    max_steps: int | None = None  # stop after this many optimizer steps in all (smoke runs, speed checks)
    batch_size: int = 128  # global batch (split across ranks under torchrun)
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_wd_bn_bias: bool = False  # exclude norm and bias parameters from weight decay
    scheduler: str = "cosine"
    milestones: list[int] = field(default_factory=list)  # multistep: epochs at which lr *= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # runtime
    seed: int = 0
    deterministic: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto: bf16 autocast on CUDA, none on CPU
    channels_last: bool | None = None  # None: on CUDA only
    compile: bool = False  # torch.compile the training forward/backward (evaluation stays eager)
    threads: int | None = None  # torch.set_num_threads (CPU); None: leave torch's default
    sync_bn: bool = False
    eval_every: int = 1
    save_every_s: float = 600.0  # also checkpoint inside an epoch this often (0: only at epoch ends)
    stop_after: int | None = None  # stop this invocation after N epochs (split a long run; resume later)
    out_dir: str = "runs"
    name: str | None = None  # run directory name under out_dir; None: derived from model/method/seed
    log_every_s: float = 30.0  # progress line interval when stderr is not a terminal
    progress: bool = True
    tensorboard: bool = True
    plots: bool = True
    preset: str | None = None  # recorded for provenance only

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the field and the allowed values for anything out of range."""

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, but got {v!r}")

        choice("dataset", DATASETS)
        choice("optimizer", OPTIMIZERS)
        choice("scheduler", SCHEDULERS)
        choice("augment", AUGMENTS)
        choice("amp", AMP_MODES)
        choice("bad_images", BAD_IMAGES)
        for name in ("epochs", "batch_size", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, but got {v!r}")
        for name in ("train_subset", "eval_subset", "stop_after", "threads", "image_size", "max_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive integer or null, but got {v!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an integer >= 0, but got {self.workers!r}")
        if self.crop_padding is not None and self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0 or null, but got {self.crop_padding!r}")
        for name in ("lr", "momentum", "weight_decay", "gamma", "warmup_epochs", "label_smoothing", "save_every_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, but got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, but got {self.lr!r}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                "weight_decay must be >= 0 and momentum in [0, 1), but got "
                f"weight_decay={self.weight_decay!r}, momentum={self.momentum!r}"
            )
        if self.save_every_s < 0:
            raise ValueError(f"save_every_s must be >= 0 (0: checkpoint only at epoch ends), got {self.save_every_s!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), but got {self.label_smoothing!r}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}), but got {self.warmup_epochs!r}")
        if self.scheduler == "multistep" and not self.milestones:
            raise ValueError("scheduler 'multistep' needs milestones (e.g. --set milestones=[60,120])")
        if any((not isinstance(m, int)) or m < 1 for m in self.milestones):
            raise ValueError(f"milestones must be positive epoch numbers, but got {self.milestones!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0")
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("dataset 'folder' needs data_dir (--data-dir ROOT with ROOT/train/<class>/*)")
        if not isinstance(self.method_options, dict):
            raise ValueError(f"method_options must be a mapping, but got {self.method_options!r}")
        for name in ("distill_alpha", "distill_temperature"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, but got {v!r}")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1] (the KL term's share), but got {self.distill_alpha!r}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, but got {self.distill_temperature!r}")
        beta = self.distill_feature_weight
        if beta is not None:
            if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta) or beta <= 0:
                raise ValueError(f"distill_feature_weight must be a finite number > 0, but got {beta!r}")
            if self.distill_features is None:
                raise ValueError("distill_feature_weight given without distill_features (--distill-features auto)")
        if self.distill_features is not None:
            f = self.distill_features
            if not (f == "auto" or (isinstance(f, list) and f and all(isinstance(n, str) and n for n in f))):
                raise ValueError(f"distill_features must be 'auto' or a non-empty list of module names, but got {f!r}")
            if self.teacher is None:
                raise ValueError("distill_features given without a teacher (--teacher RUN|PATH|NAME)")
            if self.compile:
                raise ValueError("distill_features reads module outputs through forward hooks, which are not "
                                 "supported here with compile=True: drop one of them")
        if self.teacher_weights is not None and self.teacher is None:
            raise ValueError("teacher_weights given without a teacher (--teacher MODEL_NAME)")
        if self.init is not None and (self.method is not None or self.weights is not None):
            raise ValueError(f"init {self.init!r} already holds the architecture and the weights: drop "
                             f"{'method' if self.method is not None else 'weights'}")
        if self.method_options and self.method is None:
            raise ValueError(f"method_options {self.method_options} given without a method (--method NAME)")
        if not isinstance(self.binarize, bool):
            raise ValueError(f"binarize must be true or false, but got {self.binarize!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name or self.name in (".", "..")
                                      or "/" in self.name or "\\" in self.name):
            # a path would put the run outside out_dir (--name ../../etc)
            raise ValueError(f"name must be a folder name under out_dir (no '/', '\\', '.' or '..'), but got "
                             f"{self.name!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        cfg = cls()
        apply_overrides(cfg, d)
        return cfg


# Presets: partial configs. The paper's recipes (CompConv, Sec. 4.1) and short ones sized for a 2-core CPU.
PRESETS: dict[str, dict[str, Any]] = {
    # Sec. 4.1: "learning rate of 0.1 with a total batch size of 128, divide it by 20 at 60, 120 epochs
    # (150 epochs in total)"; pad-4 crop + flip. The paper gives no weight decay or momentum for CIFAR; we
    # use momentum 0.9 (its ImageNet setting) and 1e-4, the CIFAR ResNet value of He et al. [11].
    "cifar_paper": dict(
        epochs=150,
        batch_size=128,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
        scheduler="multistep",
        milestones=[60, 120],
        gamma=1 / 20,
        warmup_epochs=0.0,
        augment="standard",
    ),
    # Sec. 4.1 ImageNet: batch 256, lr 0.1, /10 at 30/60/90 of 100 epochs, momentum 0.9, wd 1e-4 ([11]).
    "imagenet_paper": dict(
        epochs=100,
        batch_size=256,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
        scheduler="multistep",
        milestones=[30, 60, 90],
        gamma=0.1,
        warmup_epochs=0.0,
        augment="standard",
    ),
    # 30 epochs on 2 CPU cores (about an hour for ResNet-20): nesterov SGD + cosine, wd 5e-4.
    "cifar_cpu30": dict(
        epochs=30,
        batch_size=128,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        scheduler="cosine",
        milestones=[],
        warmup_epochs=0.0,
        augment="standard",
    ),
    # Imagenette-sized ImageNet recipe (short, cosine, warmup), for GPUs.
    "imagenette_short": dict(
        epochs=40,
        batch_size=128,
        optimizer="sgd",
        lr=0.2,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-5,
        scheduler="cosine",
        milestones=[],
        warmup_epochs=2.0,
        label_smoothing=0.1,
        augment="standard",
    ),
}
# A quick look (a few minutes on 2 cores): 5 epochs of the same recipe.
PRESETS["cifar_cpu5"] = {**PRESETS["cifar_cpu30"], "epochs": 5, "milestones": []}  # no shared list


def _field_types() -> dict[str, Any]:
    return {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Coerce a parsed value to the field's declared type (``"3"`` -> 3 for an int field, "none" -> None)."""
    t = str(_field_types()[name].type)  # a string under ``from __future__ import annotations``
    optional = "None" in t
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if not optional:
            raise ValueError(f"config key {name!r} expects {t}, but got {value!r}")
        return None
    try:
        if t.startswith("str | list[str]"):  # a name, or names: "auto", "a,b", "[a, b]" or a list
            if isinstance(value, str):
                text = value.strip()
                if not text.startswith("[") and "," not in text:
                    return text
                value = [v.strip().strip("'\"") for v in text.strip("[]").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
        if t.startswith("bool"):
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if t.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t.startswith("list"):
            if isinstance(value, str):
                value = [v for v in value.strip("[]").split(",") if v.strip()]
            return [int(v) for v in value]
        if t.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if t.startswith("str"):
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {name!r} expects {t}, but got {value!r}") from None
    return value


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Set fields from a mapping; unknown keys raise ValueError with close matches."""
    known = _field_types()
    for k, v in overrides.items():
        key = k.replace("-", "_")
        if key.startswith("method_options."):  # dotted form: method_options.c0=16
            cfg.method_options[key.split(".", 1)[1]] = v
            continue
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown config key {k!r}.{hint}")
        setattr(cfg, key, _coerce(key, v))
    return cfg


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["lr=0.05", "milestones=[60,120]", "method_options.c0=16"]`` -> dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, but got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else None
    return out


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON config file (a mapping of TrainConfig keys)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def resolve_config(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults -> preset -> file -> overrides, validated."""
    cfg = TrainConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, but got {preset!r}")
        apply_overrides(cfg, PRESETS[preset])
        cfg.preset = preset
    if config_file is not None:
        apply_overrides(cfg, load_config_file(config_file))
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg.validate()
