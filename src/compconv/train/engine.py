"""The training / evaluation loop behind ``compconv train`` and ``compconv eval``.

``train(cfg)`` builds data, model (``compconv.models.get_model`` then ``compconv.convert`` when
``cfg.method`` is set), optimizer and a per-iteration LR schedule, then runs epochs: train, evaluate,
log (CSV, TensorBoard, progress), checkpoint (``last.pt`` every epoch, ``best.pt`` on a new best top-1).
``train(resume=RUN_DIR)`` continues a killed run to the same result: every epoch's batches are a
pure function of (seed, epoch) and the checkpoint holds model, optimizer, scheduler and RNG states; it
reads the data exactly as the run did (recorded classes, pipeline, image size, eval folder, image counts)
and refuses data that changed. ``resume=OTHER.pt`` with ``--name`` branches a new run (``resume.py``).
At the end ``results.json`` and the plots are written. Under torchrun the model is wrapped in DDP, metrics
are summed over ranks and only rank 0 writes files (holding the run directory's lock).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from compconv.train import checkpoint as ckpt_mod
from compconv.train.config import TrainConfig, apply_overrides
from compconv.train.data import build_data, data_root
from compconv.train.distributed import (
    DistInfo,
    barrier,
    cleanup,
    init_distributed,
    sync_buffers,
)
from compconv.train.evaluation import evaluate_checkpoint
from compconv.train.features import FeatureDistill, resolve_feature_layers
from compconv.train.guards import TrainingDiverged, check_new_run_dir, clean_stale_temporaries, run_lock
from compconv.train.loops import _fmt_time, _train_epoch, evaluate
from compconv.train.modelbuild import build_model, check_names
from compconv.train.resume import check_best, recorded_data_dir, resume_target, run_dir_of

__all__ = ["build_model", "evaluate", "evaluate_checkpoint", "train"]

# Config keys that may change when resuming (they do not change the result; ``compile`` only in the last
# bits of float rounding, so an exact-resume comparison keeps it unchanged).
RUNTIME_KEYS = (
    "stop_after",
    "workers",
    "log_every_s",
    "progress",
    "tensorboard",
    "plots",
    "threads",
    "cache_dir",
    "compile",
    "data_dir",
    "download",
    "save_every_s",
    "device",
)


# ----------------------------------------------------------------------------------------------- helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    if not cfg.no_wd_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


FROM_SCRATCH_LR = 0.05  # at or above: a from-scratch rate (the presets' 0.1), which undoes a warm start
FROZEN_BN_MAX_LR = 1e-3  # above, with --freeze-bn-stats: twice the measured 5e-4 (0.01 diverged, compress.md)
SHORT_FINE_TUNE_STEPS = 300  # below: BN's running statistics, moved by training batches, undo the warm start


def fine_tune_notes(cfg: TrainConfig, steps_per_epoch: int, has_bn: bool) -> list[str]:
    """Warnings for a run that fine-tunes a ``compconv compress`` file: measured ways to lose its warm start.

    docs/compress.md: at lr 0.1 three steps took the ResNet-20 at 0.5x MACs to chance (9.4%); with BN in
    training mode, a few steps move its running statistics away from the warm start's (also after
    ``--reparametrize-bn``: docs/compress.md, 16 steps at lr 0.01 gave 22% with it, 18% without).
    """
    notes = []
    if cfg.freeze_bn_stats and cfg.lr > FROZEN_BN_MAX_LR:
        notes.append(f"lr {cfg.lr:g} with frozen BN statistics: the compressed ResNet-20 diverged (NaN loss) this "
                     "way at 0.01 (docs/compress.md; 5e-4 is the measured recipe); pass --lr 5e-4")
    elif not cfg.freeze_bn_stats and cfg.lr >= FROM_SCRATCH_LR:
        notes.append(f"lr {cfg.lr:g} is a from-scratch rate; {cfg.init} was warm-started by compconv compress, "
                     "which fine-tunes at 0.01 (docs/compress.md: lr 0.1 undoes the warm start in a few steps); "
                     "pass --lr 0.01")
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps,
                                                                            cfg.epochs * steps_per_epoch)
    if has_bn and not cfg.freeze_bn_stats and total < SHORT_FINE_TUNE_STEPS:
        notes.append(f"{total} step{'s' if total != 1 else ''} with BatchNorm in training mode: its running "
                     "statistics move towards the training batches' and can undo the warm start before the weights "
                     "adapt; for a few hundred steps or less pass --freeze-bn-stats (with --lr 5e-4)")
    return notes


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The LR multiplier at iteration ``step`` (linear warmup, then cosine / multistep / constant)."""
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        if cfg.scheduler == "multistep":
            epoch = step // steps_per_epoch
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        return 1.0

    return f



@contextlib.contextmanager
def _writes(where: Path) -> Iterator[None]:
    """Turn a failed write (disk full, read-only folder) into one ``RunWriteError`` naming path and cause."""
    try:
        yield
    except ckpt_mod.RunWriteError:
        raise
    except OSError as e:
        raise ckpt_mod.write_error(e.filename or where, e) from e


# ----------------------------------------------------------------------------------------------- train


def default_run_name(cfg: TrainConfig) -> str:
    if cfg.method is None:
        tag = "vanilla"
    else:
        opts = "".join(f"-{k}{v}" for k, v in sorted(cfg.method_options.items()))
        tag = f"{cfg.method}{opts}"
    model = cfg.model
    if cfg.init is not None:  # the file's architecture, not the default model name
        model, tag = Path(cfg.init).stem, "init"
    elif cfg.model_object is not None:
        model = cfg.model_object.rsplit(".", 1)[-1]
    if cfg.teacher is not None:
        tag += "-distill"
    if cfg.binarize:
        tag += "-bin"
    return f"{model.replace(':', '_')}-{tag}-{cfg.dataset}-s{cfg.seed}"  # torchvision:NAME: no ':' in paths


def _model_label(cfg: TrainConfig) -> str:
    """What the start line names: the init file, the model object's class or the name, method and options."""
    if cfg.init is not None:
        label = f"init {cfg.init}"
    elif cfg.model_object is not None:
        label = f"model object {cfg.model_object} {cfg.method or 'vanilla'} {dict(cfg.method_options)}"
    else:
        label = f"{cfg.model} {cfg.method or 'vanilla'} {dict(cfg.method_options)}"
    label += ", binarized (XNOR-Net)" if cfg.binarize else ""
    if cfg.teacher is not None:
        label += f", distilled from {cfg.teacher}"
        if cfg.distill_features is not None:
            label += " + features"
    return label


def _write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))  # a key added later gets its column
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for row in history:
        w.writerow({k: row.get(k) for k in keys})
    _atomic_write_text(path, buf.getvalue())


def _open_tensorboard(run_dir: Path, start_epoch: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        print("compconv train: tensorboard is not installed; TensorBoard logs are skipped", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_epoch + 1 if start_epoch else None)


def _resolve_resume(
    resume: str, overrides: dict[str, Any] | None
) -> tuple[TrainConfig, dict[str, Any], Path, Path, bool]:
    """``(config, state, checkpoint, run directory, branch)``; see ``resume.resume_target``."""
    overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    path, run_dir, branch = resume_target(resume, overrides.get("name"), overrides.get("out_dir"))
    state = ckpt_mod.load_checkpoint(path)
    cfg = TrainConfig.from_dict(state["config"])
    source_run = run_dir_of(path) or path.parent
    if branch:  # a new run directory: its name (and parent) are the branch's
        run_dir = Path(overrides.get("out_dir") or cfg.out_dir) / str(overrides["name"])
    cfg.stop_after = None  # a piece's stop_after belongs to that invocation only
    allowed = (*RUNTIME_KEYS, "name", "out_dir") if branch else RUNTIME_KEYS
    for key, v in overrides.items():
        if key not in allowed:
            if getattr(cfg, key, object()) != v:
                raise ValueError(
                    f"cannot change {key!r} when resuming (the run was started with "
                    f"{getattr(cfg, key, None)!r}); "
                    f"only {', '.join(RUNTIME_KEYS)} may change"
                )
            continue
        apply_overrides(cfg, {key: v})
    if "data_dir" not in overrides:  # a relative path of an older version: found from the run, not the cwd
        cfg.data_dir = recorded_data_dir(cfg.data_dir, source_run, state["config"].get("out_dir"))
    return cfg.validate(), state, path, run_dir, branch


def invocation(argv: list[str]) -> str:
    """The command line that started this process, as a user would retype it: ``compconv ...`` through the
    CLI (its console script, or ``python -m compconv`` / ``compconv.train``), else ``python SCRIPT ...``
    (a script calling ``train()``), so a run's ``commands.txt`` never names a command that does not exist."""
    prog = Path(argv[0]) if argv else Path()
    if prog.name == "compconv" or (prog.name == "__main__.py" and "compconv" in prog.parts):
        return shlex.join(["compconv", *argv[1:]])
    return shlex.join(["python", *argv])


def train(
    cfg: TrainConfig | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    resume_overrides: dict[str, Any] | None = None,
    command: str | None = None,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run; returns the results dict (also written to ``results.json`` by rank 0).

    Args:
        cfg: the resolved config (ignored when ``resume`` is given: the run's own config is used).
        resume: a run directory (or its ``checkpoints/last.pt``) to continue in place; another checkpoint
            file starts a new run from it and needs ``resume_overrides["name"]`` (``resume.py``).
        resume_overrides: runtime-only keys to change on resume (``RUNTIME_KEYS``; ``name``/``out_dir``
            for a new run from a checkpoint file).
        command: the command line recorded in ``results.json`` (default: this process's, ``invocation``).
        model: train this model object instead of ``cfg.model`` (trained in place; converted with
            ``cfg.method`` when set). Its class is recorded (``model_object``); resuming such a run needs the
            same architecture passed again as ``model``.

    Raises:
        TrainingDiverged: a non-finite loss, weight or buffer (the last finite checkpoint is kept).
        RunExistsError / RunLockedError: the run directory holds another run's work / is in use.
        CheckpointError, ValueError, FileNotFoundError: a damaged checkpoint, changed data, bad input.
    """
    state: dict[str, Any] | None = None
    run_dir: Path | None = None
    branch = False
    if resume is not None:
        cfg, state, _, run_dir, branch = _resolve_resume(str(resume), resume_overrides)
    elif cfg is None:
        raise ValueError("train() needs a config or resume=RUN_DIR")
    else:
        cfg.validate()
    assert cfg is not None
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}")
        if cfg.init is not None:
            raise ValueError(f"model and init {cfg.init!r} both give the architecture; pass one")
        from compconv.train.sources import model_class

        if state is None:
            cfg = dataclasses.replace(cfg, model_object=model_class(model))
    if cfg.init is not None and state is None and Path(cfg.init).is_file():
        # The init file holds the architecture: record its base as the model (never a --model it ignores).
        from compconv.train.sources import arch_of_save

        init_arch = arch_of_save(cfg.init)
        base = init_arch["base"]
        if cfg.model not in (base, TrainConfig.model):
            raise ValueError(f"init {cfg.init!r} holds a {base!r} model, but model={cfg.model!r}: drop --model "
                             "(the init file gives the architecture)")
        cfg = dataclasses.replace(cfg, model=base)
        if init_arch["binary"]:  # a binarized file: the run trains a binarized model, so it is labelled one
            cfg = dataclasses.replace(cfg, binarize=True)
        if cfg.data_dir is None:  # a compconv compress file records the data its model was made from
            extra = init_arch["extra"]
            if extra.get("data_dir") and Path(extra["data_dir"]).is_dir():
                cfg = dataclasses.replace(cfg, data_dir=str(extra["data_dir"]),
                                          dataset=str(extra.get("dataset") or cfg.dataset))
    if cfg.data_dir:  # recorded as an absolute path; a directory that does not exist is refused here
        cfg = dataclasses.replace(cfg, data_dir=str(data_root(cfg.data_dir)))
    command = command or invocation(sys.argv)
    check_names(cfg, files=state is None)

    info, device = init_distributed(cfg.device)
    try:
        return _train(cfg, info, device, state, run_dir, branch, command, model)
    finally:
        cleanup(info)


def _finished(cfg: TrainConfig, state: dict[str, Any]) -> bool:
    """A checkpoint at the end of its run (every epoch done, or the step budget spent)."""
    if state.get("partial") is not None:
        return False
    steps_done = int((state.get("scheduler") or {}).get("last_epoch", 0))
    return int(state["epoch"]) >= cfg.epochs or (cfg.max_steps is not None and steps_done >= cfg.max_steps)


def _check_same_data(d: dict[str, Any], data: Any, cfg: TrainConfig) -> None:
    """Resume refuses data that differs from the run's: other images would mix into one run's metrics."""
    now = {"n_train": data.n_train, "n_eval": data.n_eval, "eval_dir": data.eval_dir}
    diff = [f"{k} was {d[k]!r}, now {now[k]!r}" for k in now if d.get(k) is not None and d[k] != now[k]]
    if diff:
        raise ValueError(
            f"the data under {cfg.data_dir or data.source!r} changed since the run started ({'; '.join(diff)}): "
            "resuming would mix two data sets in one run's metrics and best checkpoint. Restore the data, pass "
            "--data-dir with the run's data, or start a new run"
        )


def _train(
    cfg: TrainConfig,
    info: DistInfo,
    device: torch.device,
    state: dict[str, Any] | None,
    run_dir: Path | None,
    branch: bool,
    command: str,
    model_obj: nn.Module | None = None,
) -> dict[str, Any]:
    if state is None:
        run_dir = Path(cfg.out_dir) / (cfg.name or default_run_name(cfg))
    assert run_dir is not None
    if state is None or branch:
        check_new_run_dir(run_dir)  # every rank, before rank 0 writes anything
    # Every rank has checked before rank 0 takes the lock: else a later rank sees rank 0's live lock.
    barrier(info)
    with contextlib.ExitStack() as stack:
        if info.is_main:
            with _writes(run_dir):
                stack.enter_context(run_lock(run_dir))  # a second process on this run is refused
                if state is not None and not branch:
                    clean_stale_temporaries(run_dir)  # a killed write's leftovers; a live process's are kept
        barrier(info)
        return _train_locked(cfg, info, device, state, run_dir, branch, command, model_obj)
    raise AssertionError("unreachable")


def _train_locked(
    cfg: TrainConfig,
    info: DistInfo,
    device: torch.device,
    state: dict[str, Any] | None,
    run_dir: Path,
    branch: bool,
    command: str,
    model_obj: nn.Module | None = None,
) -> dict[str, Any]:
    from compconv.train import results as results_mod
    from compconv.train import sources

    ckpt_dir = run_dir / "checkpoints"
    best_ckpt_epoch: int | None = None  # the epoch best.pt holds (results.json names it)
    if state is not None:
        if info.is_main:
            with _writes(ckpt_dir):
                if branch:
                    ckpt_dir.mkdir(parents=True, exist_ok=True)
                best_ckpt_epoch = check_best(ckpt_dir, state)  # rebuilt from last.pt after a kill in between
        if _finished(cfg, state):
            res_path = run_dir / "results.json"
            if info.is_main:
                print(
                    f"compconv train: run {run_dir} is finished ({state['epoch']}/{cfg.epochs} epochs"
                    + (f", step budget max_steps={cfg.max_steps} spent" if state["epoch"] < cfg.epochs else "")
                    + f"); nothing to do. Results in {res_path}",
                    file=sys.stderr,
                    flush=True,
                )
            res: dict[str, Any] = json.loads(res_path.read_text()) if res_path.is_file() else {}
            res["run_dir"] = str(run_dir)
            return res
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)
    if cfg.deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"

    # On resume the run's own normalisation, class names, pipeline, image size and eval folder.
    d = (state or {}).get("data") or {}
    data = build_data(
        cfg,
        rank=info.rank,
        world=info.world,
        pin_memory=device.type == "cuda",
        recorded=d if state is not None else None,
        progress=cfg.progress and info.is_main,
    )
    assert data.train is not None
    if state is not None:
        _check_same_data(d, data, cfg)
    teacher_files = {"teacher": cfg.teacher, "teacher_weights": cfg.teacher_weights}
    sources.check_same_classes(teacher_files if state is not None else
                               {**teacher_files, "init": cfg.init, "weights": cfg.weights}, data.classes)
    arch = (state or {}).get("arch")
    init_extra: dict[str, Any] = {}  # what the init file's maker recorded (compconv compress: its report)
    if arch is None and cfg.init is not None:  # recorded in the checkpoints: the architecture, not "extra"
        arch = sources.arch_of_save(cfg.init)
        init_extra = arch.pop("extra")
    model = build_model(cfg, data.num_classes, model=model_obj, arch=arch, load_init=state is None)
    prof = results_mod.model_counts(model, data.image_size)
    teacher, teacher_fp = None, None
    if cfg.teacher is not None:
        teacher = sources.build_teacher(cfg.teacher, cfg.teacher_weights, data.num_classes)
        teacher_fp = sources.state_fingerprint(teacher)
        recorded_fp = (state or {}).get("teacher_fingerprint")
        if recorded_fp is not None and recorded_fp != teacher_fp:
            raise ValueError(
                f"teacher {cfg.teacher!r} has other weights than when the run started (fingerprint "
                f"{teacher_fp}, recorded {recorded_fp}): resuming would distil from another model. Restore it "
                "or start a new run"
            )
        teacher.to(device)
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if info.enabled and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    features: FeatureDistill | None = None
    if teacher is not None and cfg.distill_features is not None:
        # a fixed probe from its own generator: resolving the modules must not move the run's RNG streams
        probe = torch.randn(2, 3, data.image_size, data.image_size, generator=torch.Generator().manual_seed(0))
        probe = probe.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        names = resolve_feature_layers(model, teacher, cfg.distill_features, probe)
        beta = 1.0 if cfg.distill_feature_weight is None else cfg.distill_feature_weight
        features = FeatureDistill(model, teacher, names, beta)
        if info.is_main:
            print(f"compconv train: feature distillation (weight {beta:g}) at {len(names)} modules: {', '.join(names)}")
    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # Compile the (DDP-wrapped) training module only: checkpoints keep the plain model's state_dict
        # and evaluation runs eager. dynamic=False: the short last batch costs one extra compile.
        net = torch.compile(net, dynamic=False)  # type: ignore[assignment]
    opt = build_optimizer(model, cfg)
    steps = len(data.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps))

    history: list[dict[str, Any]] = []
    best = -1.0
    start_epoch = 0
    partial: dict[str, Any] | None = None  # a mid-epoch checkpoint's position
    if state is not None:
        ckpt_mod.load_model_state(model, state, run_dir)
        try:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ckpt_mod.CheckpointError(
                f"the checkpoint of {str(run_dir)!r} has an optimizer/scheduler state that does not fit its "
                f"model: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None
        history = list(state["history"])
        best = float(state.get("best_top1", -1.0))
        start_epoch = int(state["epoch"])
        ckpt_mod.restore_rng(state["rng"])
        partial = state.get("partial")
    tb = None
    if info.is_main:
        with _writes(run_dir):
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            with open(run_dir / "commands.txt", "a") as f:
                f.write(command + "\n")
            tb = _open_tensorboard(run_dir, start_epoch, cfg.tensorboard)
        print(
            f"compconv train: run {run_dir} | {_model_label(cfg)} | "
            f"{prof['params']:,} params, {prof['macs']:,} MACs"
            + (f" + {prof['bops']:,} BOPs" if "bops" in prof else "")
            + f" | {data.source}: {data.n_train} train / "
            f"{data.n_eval} eval images ({data.eval_dir}/) | {device}, world {info.world}, "
            f"{torch.get_num_threads()} threads | epochs {start_epoch + 1}..{cfg.epochs}"
            + (f" | max_steps {cfg.max_steps}" if cfg.max_steps else ""),
            file=sys.stderr,
            flush=True,
        )
        if state is None and "report" in init_extra:  # warm-started by compconv compress
            for note in fine_tune_notes(cfg, steps, any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                        for m in model.modules())):
                print(f"compconv train: note: {note}", file=sys.stderr, flush=True)
    barrier(info)

    stop_at = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)
    epoch = start_epoch

    def budget_spent(epochs_done: int) -> bool:
        return cfg.max_steps is not None and epochs_done * steps >= cfg.max_steps

    def make_state(epochs_done: int, metrics: dict[str, float], pos: dict[str, Any] | None = None) -> dict[str, Any]:
        out = {
            "format_version": ckpt_mod.FORMAT_VERSION,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epochs_done,
            "partial": pos,  # None, or the position inside epoch epochs_done + 1
            "config": cfg.to_dict(),
            "history": history,
            "best_top1": best,
            "metrics": metrics,
            "rng": ckpt_mod.capture_rng(),
            "profile": prof,
            "data": data.record(),
            "arch": arch,
            "teacher_fingerprint": teacher_fp,
        }
        bad = ckpt_mod.check_finite(out)  # never write a checkpoint the loader would refuse
        if bad is not None:
            where = f"step {pos['step']}/{steps}" if pos else "its end"
            raise TrainingDiverged(
                f"training diverged in epoch {epochs_done + 1 if pos else epochs_done}: the state to save at {where} "
                f"holds non-finite values in {bad!r}",
                epochs_done + 1 if pos else epochs_done,
                int(pos["step"]) if pos else steps,
                f"non-finite {bad}",
            )
        return out

    def write_summary(finished: bool, diverged: dict[str, Any] | None = None) -> dict[str, Any]:
        res = results_mod.build_results(cfg, history, prof, data, device, info, command, finished, run_dir)
        res["best_checkpoint"] = (
            {"path": "checkpoints/best.pt", "epoch": best_ckpt_epoch} if best_ckpt_epoch is not None else None
        )
        if teacher is not None:
            res["distill"] = {"teacher": cfg.teacher, "teacher_weights": cfg.teacher_weights,
                              "alpha": cfg.distill_alpha, "temperature": cfg.distill_temperature,
                              "teacher_fingerprint": teacher_fp}
            if features is not None:
                res["distill"] |= {"features": features.names, "feature_weight": features.weight}
        if diverged is not None:
            res["diverged"] = diverged
        if info.is_main:
            with _writes(run_dir):
                _write_csv(run_dir / "metrics.csv", history)
                results_mod.write_results(run_dir, res)
                if cfg.plots:
                    results_mod.plot_history(history, run_dir / "curves.png", title=run_dir.name)
        return res

    this_machine = results_mod.machine(results_mod.hardware(device, info.world))  # each epoch's row records it
    for epoch in range(start_epoch, stop_at):
        if budget_spent(epoch):
            break
        t_epoch = time.perf_counter()
        prior = float(partial["time"]) if partial else 0.0
        data.train.set_epoch(epoch)

        def save_partial(pos: dict[str, Any], _epoch: int = epoch) -> None:
            if info.is_main:
                ckpt_mod.save_checkpoint(make_state(_epoch, {}, pos), ckpt_dir / "last.pt")

        stop_step = None if cfg.max_steps is None else cfg.max_steps - epoch * steps
        try:
            tr = _train_epoch(
                net, data.train, opt, sched, device, cfg, info, epoch, channels_last, partial, save_partial, stop_step,
                teacher, features,
            )
            partial = None
            sync_buffers(model, info)
            last = epoch + 1 == cfg.epochs or budget_spent(epoch + 1)
            ev: dict[str, Any] = {}
            if (epoch + 1) % cfg.eval_every == 0 or last:
                # the unwrapped model: ranks may get different batch counts, and DDP forward is a collective
                ev = evaluate(model, data.eval, device, info=info, amp=cfg.amp, channels_last=channels_last)
                if not math.isfinite(ev["loss"]):  # finite weights, non-finite logits: never a "best"
                    raise TrainingDiverged(
                        f"training diverged at epoch {epoch + 1}: the evaluation loss is {ev['loss']}",
                        epoch + 1,
                        steps,
                        "the evaluation loss is non-finite",
                    )
            row = {
                "epoch": epoch + 1,
                "lr": opt.param_groups[0]["lr"],  # at the end of the epoch (the schedule moves every step)
                "train_loss": tr["loss"],
                "train_acc": tr["acc"],
                "test_loss": ev.get("loss"),
                "test_top1": ev.get("top1"),
                "test_top5": ev.get("top5"),
                "train_time_s": tr["time"],
                "epoch_time_s": prior + time.perf_counter() - t_epoch,
                "train_images_per_s": tr["images_per_s"],
                "machine": this_machine,  # a resumed run may continue elsewhere
            }
            if stop_step is not None and stop_step < steps:  # the step budget ended this epoch early
                row["partial_steps"] = f"{stop_step}/{steps}"
            is_best = bool(ev) and ev["top1"] > best
            state_out = make_state(epoch + 1, ev) if info.is_main else None
        except TrainingDiverged as e:
            # Nothing of the diverged state is saved: last.pt / best.pt stay the last finite ones.
            kept = ckpt_dir / "last.pt"
            where = f"the last finite checkpoint {kept} was kept" if kept.exists() else "no checkpoint was written"
            e.args = (f"{e.args[0]}. Stopped; {where}, results.json is marked diverged (try a lower --lr)",)
            if info.is_main:
                write_summary(False, {"epoch": e.epoch, "step": e.step, "what": e.what, "message": e.args[0]})
                if tb is not None:
                    tb.close()
            raise
        history.append(row)
        if is_best:
            best = ev["top1"]
        if info.is_main:
            assert state_out is not None
            state_out["history"], state_out["best_top1"] = history, best
            done = epoch + 1 - start_epoch
            elapsed = sum(r["epoch_time_s"] for r in history[start_epoch:])
            eta = (cfg.epochs - epoch - 1) * elapsed / done
            top1 = f"{ev['top1']:.2f}%" if ev else "-"
            print(
                f"epoch {epoch + 1}/{cfg.epochs} train loss {tr['loss']:.4f} acc {tr['acc']:.2f}% | "
                f"test top1 {top1} | {row['epoch_time_s']:.1f}s ({tr['images_per_s']:.0f} img/s) | "
                f"eta {_fmt_time(eta)}",
                file=sys.stderr,
                flush=True,
            )
            # last.pt first: after a kill or a failed write before best.pt is written, last.pt is itself the
            # best epoch and the next start rebuilds best.pt from it (resume.check_best): nothing is lost.
            ckpt_mod.save_checkpoint(state_out, ckpt_dir / "last.pt")
            if is_best:
                ckpt_mod.save_checkpoint(state_out, ckpt_dir / "best.pt")
                best_ckpt_epoch = epoch + 1
            # results.json and the plots after every epoch: a killed run still shows where it got to.
            write_summary(len(history) == cfg.epochs or budget_spent(len(history)))
            if tb is not None:
                for k, v in row.items():
                    if k != "epoch" and isinstance(v, (int, float)):  # not partial_steps / machine (text)
                        tb.add_scalar(k, v, epoch + 1)
                tb.flush()
        barrier(info)

    finished = len(history) == cfg.epochs or budget_spent(len(history))
    res = write_summary(finished)
    if info.is_main:
        if tb is not None:
            tb.close()
        status = "finished" if finished else f"stopped after epoch {len(history)} (resume with --resume {run_dir})"
        if finished and cfg.max_steps is not None and len(history) < cfg.epochs:
            status = f"finished: the step budget max_steps={cfg.max_steps} is spent"
        print(f"compconv train: {status}; results in {run_dir / 'results.json'}", file=sys.stderr, flush=True)
    barrier(info)
    res["run_dir"] = str(run_dir)
    return res
