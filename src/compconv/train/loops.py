"""The inner loops: one training epoch (with the divergence check) and evaluation, plus progress output.

``_train_epoch`` checks after every optimizer step that the loss, every weight and every floating buffer
(BatchNorm running statistics) are finite (one sync; under DDP one all-reduce, so every rank stops at the
same step) and raises ``TrainingDiverged`` before
anything of that state can be saved. ``evaluate`` sums exact counts over ranks.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compconv.train.config import TrainConfig
from compconv.train.distributed import DistInfo, all_reduce_sum
from compconv.train.features import FeatureDistill
from compconv.train.guards import TrainingDiverged

__all__ = ["distill_loss", "evaluate"]


def distill_loss(
    student: Tensor, teacher: Tensor, y: Tensor, alpha: float, temperature: float, label_smoothing: float = 0.0
) -> Tensor:
    """Hinton et al. (2015): ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    ``student``, ``teacher``: ``(N, classes)`` logits; ``y``: ``(N,)`` labels. The KL is the batch mean of
    the per-image sums over classes; ``T^2`` keeps its gradients' scale independent of ``T``. Computed in
    float32 whatever the autocast dtype. Returns a scalar.
    """
    s, t = student.float(), teacher.float()
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                  reduction="batchmean", log_target=True)
    ce = F.cross_entropy(s, y, label_smoothing=label_smoothing)
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce


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
        if len(y) == 0:  # every image of the batch was skipped (--bad-images skip)
            continue
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
    stop_step: int | None = None,
    teacher: nn.Module | None = None,
    features: FeatureDistill | None = None,
) -> dict[str, float]:
    """One epoch; ``partial`` continues it from a mid-epoch checkpoint, ``save_partial`` writes one.

    Mid-epoch checkpoints (every ``cfg.save_every_s`` seconds) hold the step reached and the running sums,
    so a run killed inside a long epoch loses only the steps since the last save. ``stop_step`` ends the
    epoch before that step (the ``max_steps`` budget). After every step the loss and the weights are
    checked (one sync; under DDP one all-reduce, so every rank stops at the same step): a non-finite value
    raises ``TrainingDiverged`` before anything is saved. With ``teacher`` (in eval mode, no gradients; one
    copy per rank) the loss is ``distill_loss`` with ``cfg.distill_alpha`` / ``cfg.distill_temperature``,
    plus ``features.weight * features.loss()`` with ``features`` (feature distillation).
    """
    model.train()
    if cfg.freeze_bn_stats:  # a warm-started model: batch statistics would undo its fitted scale (compress.md)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
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
    # weights and floating buffers: an inf BatchNorm running_var with a finite loss is divergence too
    # (the checkpoint loader would refuse the state, and evaluation would score garbage)
    tensors = [p for g in opt.param_groups for p in g["params"]]
    tensors += [b for b in model.buffers() if b.is_floating_point()]
    for step, (x, y) in enumerate(loader.iter_from(start), start=start):
        if stop_step is not None and step >= stop_step:
            break
        if len(y) == 0:  # every image of the batch was skipped (--bad-images skip): keep the schedule
            sched.step()
            bar.update(running)
            continue
        x, y = _to_device(x, y, device, channels_last)
        with _autocast(device, cfg.amp), features if features is not None else contextlib.nullcontext():
            out = model(x)
            if teacher is None:
                loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
            else:
                with torch.no_grad():
                    t_out = teacher(x)
                loss = distill_loss(out, t_out, y, cfg.distill_alpha, cfg.distill_temperature, cfg.label_smoothing)
                if features is not None:
                    loss = loss + features.weight * features.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if features is not None:
            features.release()
        opt.step()
        sched.step()
        _check_finite_step(loss, tensors, device, info, opt, epoch, step, len(loader))
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


def _check_finite_step(
    loss: Tensor,
    tensors: list[Tensor],
    device: torch.device,
    info: DistInfo,
    opt: torch.optim.Optimizer,
    epoch: int,
    step: int,
    steps: int,
) -> None:
    """Raise ``TrainingDiverged`` if the loss or any weight/buffer is non-finite, on any rank (all ranks raise)."""
    # inf-norm per tensor: max |w|, NaN if any NaN, never overflows (a 2-norm of finite weights could)
    norms = torch._foreach_norm([t.detach() for t in tensors], float("inf"))
    w_ok = torch.stack([n.float() for n in norms]).isfinite().all()
    flags = torch.stack([~torch.isfinite(loss.detach()), ~w_ok]).double()
    if info.enabled:
        vals = all_reduce_sum(flags.tolist(), device, info)
    else:
        vals = flags.tolist()
    if not any(vals):
        return
    if vals[0]:
        what = f"the loss is {loss.item()}" if not torch.isfinite(loss) else "the loss is non-finite on another rank"
    else:
        what = "the weights or buffers (e.g. BatchNorm running statistics) are non-finite after the optimizer step"
    lr = opt.param_groups[0]["lr"]
    raise TrainingDiverged(
        f"training diverged at epoch {epoch + 1}, step {step + 1}/{steps}: {what} (lr {lr:.4g})",
        epoch + 1,
        step + 1,
        what,
    )
