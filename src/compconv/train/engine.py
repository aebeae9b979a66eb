"""The training / evaluation loop behind ``compconv train`` and ``compconv eval``.

``train(cfg)`` builds data, model (``compconv.models.get_model`` then ``compconv.convert`` when
``cfg.method`` is set), optimizer and a per-iteration LR schedule, then runs epochs: train, evaluate,
log (CSV, TensorBoard, progress), checkpoint (``last.pt`` every epoch, ``best.pt`` on a new best top-1).
``train(cfg, resume=RUN_DIR)`` continues a killed run to the same result: every epoch's batches are a
pure function of (seed, epoch) and the checkpoint holds model, optimizer, scheduler and RNG states.
At the end ``results.json`` and the plots are written. Under torchrun the model is wrapped in DDP, metrics
are summed over ranks and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from compconv.train import checkpoint as ckpt_mod
from compconv.train.config import TrainConfig, apply_overrides
from compconv.train.data import DataBundle, build_data
from compconv.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
    sync_buffers,
)

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


def check_names(cfg: TrainConfig) -> None:
    """Fail fast (before any data is read) on an unknown model or method name."""
    from compconv import list_methods
    from compconv.models import get_model_builder

    get_model_builder(cfg.model)  # ValueError listing close matches
    if cfg.method is not None and cfg.method not in list_methods():
        raise ValueError(f"method must be one of {', '.join(list_methods())}, but got {cfg.method!r}")


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``get_model(cfg.model, num_classes=...)``, converted with ``cfg.method`` when set (seeded init)."""
    from compconv.models import get_model

    check_names(cfg)
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights, whatever came before
    model = get_model(cfg.model, num_classes=num_classes)
    if cfg.method is not None:
        from compconv.convert import convert

        model = convert(model, cfg.method, **dict(cfg.method_options))
    return model


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


def _accuracy_counts(logits: Tensor, y: Tensor, k: int) -> tuple[Tensor, Tensor]:
    topk = logits.topk(k, dim=1).indices
    hit = topk == y.view(-1, 1)
    return hit[:, 0].sum(), hit.any(dim=1).sum()


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Progress:
    """tqdm on a terminal; otherwise a plain line every ``every_s`` seconds (readable in nohup logs)."""

    def __init__(self, total: int, desc: str, enabled: bool, every_s: float, batch_images: int) -> None:
        self.total, self.desc, self.every_s, self.batch_images = total, desc, every_s, batch_images
        self.bar = None
        self.enabled = enabled
        self.t0 = self.last = time.perf_counter()
        self.n = self.n0 = 0  # n0: steps already done before this process (a mid-epoch resume)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, leave=False)

    def update(self, info: Callable[[], dict[str, str]]) -> None:
        self.n += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (self.n - self.n0) * self.batch_images / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            if self.n % 10 == 0 or self.n == self.total:
                self.bar.set_postfix(info() | {"img/s": f"{rate:.0f}"}, refresh=False)
        elif now - self.last >= self.every_s:
            self.last = now
            eta = (self.total - self.n) * (now - self.t0) / max(self.n - self.n0, 1)
            extra = " ".join(f"{k} {v}" for k, v in info().items())
            print(
                f"{self.desc} [{self.n}/{self.total}] {extra} {rate:.0f} img/s eta {_fmt_time(eta)}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------- loops


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to_device(x: Tensor, y: Tensor, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    *,
    info: DistInfo | None = None,
    amp: str = "auto",
    channels_last: bool = False,
    progress: bool = False,
    log_every_s: float = 30.0,
) -> dict[str, Any]:
    """Top-1 / top-5 (%) and mean cross-entropy over the loader, summed over ranks (exact counts).

    Also ``per_class_top1``: top-1 (%) of each label's images (``nan`` for a label with no image), and
    ``per_class_n``: how many images each label has.
    """
    info = info or DistInfo()
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    c1 = torch.zeros((), dtype=torch.int64, device=device)
    c5 = torch.zeros((), dtype=torch.int64, device=device)
    hits: Tensor | None = None  # per-class correct / seen counts, sized on the first batch's logits
    seen: Tensor | None = None
    n = 0
    bar = _Progress(len(loader), "eval", progress and info.is_main, log_every_s, loader.batch_size * info.world)
    for x, y in loader:
        x, y = _to_device(x, y, device, channels_last)
        with _autocast(device, amp):
            out = model(x)
        out = out.float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").double()
        a, b = _accuracy_counts(out, y, min(5, out.shape[1]))
        c1 += a
        c5 += b
        if hits is None or seen is None:
            hits = torch.zeros(out.shape[1], dtype=torch.int64, device=device)
            seen = torch.zeros(out.shape[1], dtype=torch.int64, device=device)
        seen += torch.bincount(y, minlength=out.shape[1])
        hits += torch.bincount(y[out.argmax(1) == y], minlength=out.shape[1])
        n += len(y)
        bar.update(dict)
    bar.close()
    k = 0 if seen is None else len(seen)
    per = [] if seen is None or hits is None else [float(v) for v in torch.cat([hits, seen]).tolist()]
    loss_s, c1_s, c5_s, n_s, *per_s = all_reduce_sum(
        [loss_sum.item(), float(c1.item()), float(c5.item()), float(n), *per], device, info
    )
    n_s = max(n_s, 1.0)
    per_class = [100.0 * h / s if s else float("nan") for h, s in zip(per_s[:k], per_s[k:], strict=True)]
    return {
        "loss": loss_s / n_s,
        "top1": 100.0 * c1_s / n_s,
        "top5": 100.0 * c5_s / n_s,
        "n": int(n_s),
        "per_class_top1": per_class,
        "per_class_n": [int(v) for v in per_s[k:]],
    }


def _train_epoch(
    model: nn.Module,
    loader: Any,
    opt: torch.optim.Optimizer,
    sched: Any,
    device: torch.device,
    cfg: TrainConfig,
    info: DistInfo,
    epoch: int,
    channels_last: bool,
    partial: dict[str, Any] | None = None,
    save_partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, float]:
    """One epoch; ``partial`` continues it from a mid-epoch checkpoint, ``save_partial`` writes one.

    Mid-epoch checkpoints (every ``cfg.save_every_s`` seconds) hold the step reached and the running sums,
    so a run killed inside a long epoch loses only the steps since the last save.
    """
    model.train()
    start = int(partial["step"]) if partial else 0
    loss_sum = torch.tensor(float(partial["loss_sum"]) if partial else 0.0, dtype=torch.float64, device=device)
    correct = torch.tensor(int(partial["correct"]) if partial else 0, dtype=torch.int64, device=device)
    n = int(partial["n"]) if partial else 0
    prior_time = float(partial["time"]) if partial else 0.0
    bar = _Progress(
        len(loader),
        f"epoch {epoch + 1}/{cfg.epochs}",
        cfg.progress and info.is_main,
        cfg.log_every_s,
        loader.batch_size * info.world,
    )

    def running() -> dict[str, str]:  # only evaluated when a progress line is shown (.item() syncs)
        return {
            "loss": f"{loss_sum.item() / max(n, 1):.3f}",
            "acc": f"{100.0 * correct.item() / max(n, 1):.1f}%",
            "lr": f"{opt.param_groups[0]['lr']:.4f}",
        }

    t0 = last_save = time.perf_counter()
    bar.n = bar.n0 = start
    for step, (x, y) in enumerate(loader.iter_from(start), start=start):
        x, y = _to_device(x, y, device, channels_last)
        with _autocast(device, cfg.amp):
            out = model(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.detach().double() * len(y)
        correct += (out.detach().argmax(1) == y).sum()
        n += len(y)
        bar.update(running)
        if save_partial is not None and cfg.save_every_s > 0 and step + 1 < len(loader):
            due = time.perf_counter() - last_save >= cfg.save_every_s
            if info.enabled:  # every rank must agree on the step: vote every 20 steps
                due = (step + 1) % 20 == 0 and all_reduce_sum([float(due)], device, info)[0] > 0
            if due:
                save_partial(
                    {
                        "step": step + 1,
                        "loss_sum": loss_sum.item(),
                        "correct": int(correct.item()),
                        "n": n,
                        "time": prior_time + time.perf_counter() - t0,
                    }
                )
                last_save = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = prior_time + time.perf_counter() - t0
    bar.close()
    loss_s, c_s, n_s = all_reduce_sum([loss_sum.item(), float(correct.item()), float(n)], device, info)
    return {
        "loss": loss_s / max(n_s, 1),
        "acc": 100.0 * c_s / max(n_s, 1),
        "time": dt,
        "images_per_s": n_s / max(dt, 1e-9),
    }


# ----------------------------------------------------------------------------------------------- train


def default_run_name(cfg: TrainConfig) -> str:
    if cfg.method is None:
        tag = "vanilla"
    else:
        opts = "".join(f"-{k}{v}" for k, v in sorted(cfg.method_options.items()))
        tag = f"{cfg.method}{opts}"
    return f"{cfg.model}-{tag}-{cfg.dataset}-s{cfg.seed}"


def _write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    keys = list(history[0])
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


def _resolve_resume(resume: str, overrides: dict[str, Any] | None) -> tuple[TrainConfig, dict[str, Any], Path, Path]:
    path = ckpt_mod.find_checkpoint(resume)
    state = ckpt_mod.load_checkpoint(path)
    cfg = TrainConfig.from_dict(state["config"])
    cfg.stop_after = None  # a piece's stop_after belongs to that invocation only
    for k, v in (overrides or {}).items():
        key = k.replace("-", "_")
        if key not in RUNTIME_KEYS:
            if getattr(cfg, key, object()) != v:
                raise ValueError(
                    f"cannot change {key!r} when resuming (the run was started with "
                    f"{getattr(cfg, key, None)!r}); "
                    f"only {', '.join(RUNTIME_KEYS)} may change"
                )
            continue
        apply_overrides(cfg, {key: v})
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return cfg.validate(), state, path, run_dir


def train(
    cfg: TrainConfig | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    resume_overrides: dict[str, Any] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run; returns the results dict (also written to ``results.json`` by rank 0).

    Args:
        cfg: the resolved config (ignored when ``resume`` is given: the run's own config is used).
        resume: a run directory or a checkpoint file to continue from.
        resume_overrides: runtime-only keys to change on resume (``RUNTIME_KEYS``).
        command: the command line recorded in ``results.json`` (default: ``sys.argv``).
    """
    state: dict[str, Any] | None = None
    if resume is not None:
        cfg, state, _, run_dir_r = _resolve_resume(str(resume), resume_overrides)
    elif cfg is None:
        raise ValueError("train() needs a config or resume=RUN_DIR")
    else:
        cfg.validate()
    assert cfg is not None
    command = command or " ".join(shlex.quote(a) for a in ["compconv", *sys.argv[1:]])
    check_names(cfg)

    info, device = init_distributed(cfg.device)
    try:
        return _train(cfg, info, device, state, run_dir_r if state is not None else None, command)
    finally:
        cleanup(info)


def _train(
    cfg: TrainConfig,
    info: DistInfo,
    device: torch.device,
    state: dict[str, Any] | None,
    run_dir: Path | None,
    command: str,
) -> dict[str, Any]:
    from compconv.train import results as results_mod

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)
    if cfg.deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"

    data = build_data(cfg, rank=info.rank, world=info.world, pin_memory=device.type == "cuda")
    assert data.train is not None
    model = build_model(cfg, data.num_classes)
    prof = results_mod.model_counts(model, data.image_size)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if info.enabled and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
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
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = list(state["history"])
        best = float(state.get("best_top1", -1.0))
        start_epoch = int(state["epoch"])
        ckpt_mod.restore_rng(state["rng"])
        partial = state.get("partial")
    else:
        name = cfg.name or default_run_name(cfg)
        run_dir = Path(cfg.out_dir) / name
        if (run_dir / "checkpoints" / "last.pt").exists():  # every rank checks: none may wait at a barrier
            raise ValueError(
                f"run directory {str(run_dir)!r} already holds a checkpoint; continue it with "
                f"`compconv train --resume {run_dir}` or choose another --name / --out-dir"
            )
    assert run_dir is not None
    ckpt_dir = run_dir / "checkpoints"
    tb = None
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        with open(run_dir / "commands.txt", "a") as f:
            f.write(command + "\n")
        tb = _open_tensorboard(run_dir, start_epoch, cfg.tensorboard)
        print(
            f"compconv train: run {run_dir} | {cfg.model} {cfg.method or 'vanilla'} "
            f"{dict(cfg.method_options)} | "
            f"{prof['params']:,} params, {prof['macs']:,} MACs | {data.source}: {data.n_train} train / "
            f"{data.n_eval} eval images | {device}, world {info.world}, {torch.get_num_threads()} threads | "
            f"epochs {start_epoch + 1}..{cfg.epochs}",
            file=sys.stderr,
            flush=True,
        )
    barrier(info)

    stop_at = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)
    epoch = start_epoch

    def make_state(epochs_done: int, metrics: dict[str, float], pos: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
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
            "data": {
                "mean": data.mean,
                "std": data.std,
                "classes": data.classes,
                "image_size": data.image_size,
                "n_eval": data.n_eval,
            },
        }

    for epoch in range(start_epoch, stop_at):
        t_epoch = time.perf_counter()
        prior = float(partial["time"]) if partial else 0.0
        data.train.set_epoch(epoch)

        def save_partial(pos: dict[str, Any], _epoch: int = epoch) -> None:
            if info.is_main:
                ckpt_mod.save_checkpoint(make_state(_epoch, {}, pos), ckpt_dir / "last.pt")

        tr = _train_epoch(net, data.train, opt, sched, device, cfg, info, epoch, channels_last, partial, save_partial)
        partial = None
        sync_buffers(model, info)
        last = epoch + 1 == cfg.epochs
        ev: dict[str, Any] = {}
        if (epoch + 1) % cfg.eval_every == 0 or last:
            # the unwrapped model: ranks may get different batch counts, and DDP forward is a collective
            ev = evaluate(model, data.eval, device, info=info, amp=cfg.amp, channels_last=channels_last)
        row = {
            "epoch": epoch + 1,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
            "test_loss": ev.get("loss"),
            "test_top1": ev.get("top1"),
            "test_top5": ev.get("top5"),
            "train_time_s": tr["time"],
            "epoch_time_s": prior + time.perf_counter() - t_epoch,
            "train_images_per_s": tr["images_per_s"],
        }
        history.append(row)
        is_best = bool(ev) and ev["top1"] > best
        if is_best:
            best = ev["top1"]
        if info.is_main:
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
            state_out = make_state(epoch + 1, ev)
            ckpt_mod.save_checkpoint(state_out, ckpt_dir / "last.pt")
            if is_best:
                ckpt_mod.save_checkpoint(state_out, ckpt_dir / "best.pt")
            _write_csv(run_dir / "metrics.csv", history)
            # results.json and the plots after every epoch: a killed run still shows where it got to.
            so_far = results_mod.build_results(
                cfg, history, prof, data, device, info, command, len(history) == cfg.epochs, run_dir
            )
            results_mod.write_results(run_dir, so_far)
            if cfg.plots:
                results_mod.plot_history(history, run_dir / "curves.png")
            if tb is not None:
                for k, v in row.items():
                    if k != "epoch" and v is not None:
                        tb.add_scalar(k, v, epoch + 1)
                tb.flush()
        barrier(info)

    finished = len(history) == cfg.epochs
    res = results_mod.build_results(cfg, history, prof, data, device, info, command, finished, run_dir)
    if info.is_main:
        results_mod.write_results(run_dir, res)
        if cfg.plots:
            results_mod.plot_history(history, run_dir / "curves.png")
        if tb is not None:
            tb.close()
        status = "finished" if finished else f"stopped after epoch {len(history)} (resume with --resume {run_dir})"
        print(f"compconv train: {status}; results in {run_dir / 'results.json'}", file=sys.stderr, flush=True)
    barrier(info)
    res["run_dir"] = str(run_dir)
    return res


# ----------------------------------------------------------------------------------------------- eval


def evaluate_checkpoint(
    path: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    eval_subset: int | None = -1,
    split: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Rebuild the model from a checkpoint's config, load its weights and evaluate on its eval split.

    ``split`` evaluates another split instead (``"train"``: the training images without augmentation, which
    measures how well the model fits them; a folder name such as ``"val"``/``"test"``). Returns ``{"top1",
    "top5", "loss", "n", "per_class_top1", "per_class_n", "classes", "split", "recorded": the metrics stored
    in the checkpoint (they are for the run's own eval split)}``.
    """
    p = ckpt_mod.find_checkpoint(path)
    state = ckpt_mod.load_checkpoint(p)
    cfg = TrainConfig.from_dict(state["config"])
    if split is not None:
        cfg.eval_split = split
    if data_dir is not None:
        cfg.data_dir = data_dir
    if batch_size is not None:
        cfg.batch_size = batch_size
    if eval_subset != -1:
        cfg.eval_subset = eval_subset
    cfg.device = device
    info, dev = init_distributed(device)
    if info.enabled:
        raise ValueError("compconv eval runs in one process; launch it without torchrun")
    d = state.get("data", {})
    stats = (tuple(d["mean"]), tuple(d["std"])) if "mean" in d else None
    data: DataBundle = build_data(cfg, train=False, stats=stats)
    model = build_model(cfg, data.num_classes)
    model.load_state_dict(state["model"])
    model.to(dev)
    channels_last = cfg.channels_last if cfg.channels_last is not None else dev.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    res = evaluate(model, data.eval, dev, amp=cfg.amp, channels_last=channels_last, progress=progress)
    res["classes"] = data.classes
    res["split"] = cfg.eval_split
    res["recorded"] = state.get("metrics", {})
    res["epoch"] = state["epoch"]
    res["checkpoint"] = str(p)
    return res
