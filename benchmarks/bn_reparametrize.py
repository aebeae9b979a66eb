"""BatchNorm after compress's warm start: does training mode compute what eval mode does?

For each compressed start file (``compconv compress`` output, e.g. ``docs/results/compress/r20-b050/start``)
and its teacher, measure on a seeded, class-mixed subset of the test split:

* ``eval``: top-1 in eval mode (running statistics);
* ``train_mode``: top-1 with BN in training mode (batch statistics of 128 mixed images, as a fine-tune sees);
* ``after_8_updates``: eval top-1 after 8 training-mode forwards on calibration batches (running statistics
  moved by momentum, weights unchanged: a fine-tune at lr 0),

as saved, and after :func:`compconv.compress.reparametrize_bn` on calibration images from the *training*
split (as ``compress(..., reparametrize_bn_stats=True)`` does). Writes ``--out`` (JSON, atomically) and
prints a table.

    python benchmarks/bn_reparametrize.py docs/results/compress/r20-b050/start/*_search.pt \\
        --teacher docs/results/train_runs/r20-vanilla-cpu60-s0 --data-dir ../shared/data/cifar10 \\
        --out docs/results/compress/r20-b050/bn_reparametrize.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

import compconv
from compconv.compress import reparametrize_bn
from compconv.train.config import TrainConfig
from compconv.train.data import build_data


def _load(path: str) -> tuple[nn.Module, dict]:
    """A compress file or a run directory / training checkpoint (its model and data record)."""
    from compconv.train.checkpoint import find_checkpoint, load_checkpoint
    from compconv.train.modelbuild import build_model

    p = Path(path)
    if p.is_dir() or p.name in ("last.pt", "best.pt"):
        state = load_checkpoint(find_checkpoint(p))
        cfg = TrainConfig.from_dict(state["config"])
        model = build_model(cfg, len(state["data"]["classes"]), arch=state.get("arch"), load_init=False)
        model.load_state_dict(state["model"])
        return model.eval(), state["data"]
    payload = torch.load(p, map_location="cpu", weights_only=True)
    return compconv.load(p), payload["extra"]["data"]


def _batches(data_dir: str, record: dict, split: str, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = TrainConfig(dataset="cifar10", data_dir=data_dir, eval_split=split, eval_subset=n, batch_size=256,
                      progress=False, seed=seed)
    rec = {k: v for k, v in record.items() if k not in ("n_eval", "n_train", "eval_dir")}
    data = build_data(cfg, train=False, recorded=rec, progress=False)
    x = torch.cat([b[0] for b in data.eval])
    y = torch.cat([b[1] for b in data.eval])
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))  # folders are class-sorted
    x, y = x[perm], y[perm]
    return [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(y), 128)]


def _top1(model: nn.Module, test: list, train_mode: bool) -> float:
    m = copy.deepcopy(model).train(train_mode)  # training mode updates running statistics: work on a copy
    hit = n = 0
    with torch.no_grad():
        for x, y in test:
            hit += (m(x).argmax(1) == y).sum().item()
            n += len(y)
    return 100.0 * hit / n


def _after_updates(model: nn.Module, calib: list, test: list, steps: int = 8) -> float:
    m = copy.deepcopy(model).train()
    with torch.no_grad():
        for i in range(steps):
            m(calib[i % len(calib)][0])
    return _top1(m.eval(), test, False)


def _row(model: nn.Module, calib: list, test: list) -> dict[str, float]:
    return {"eval": _top1(model, test, False), "train_mode": _top1(model, test, True),
            "after_8_updates": _after_updates(model, calib, test)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="compress files (compconv compress --out)")
    ap.add_argument("--teacher", help="the teacher's run directory (measured too, for reference)")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--calib-images", type=int, default=512, help="training images for reparametrize_bn")
    ap.add_argument("--test-images", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for path in ([args.teacher] if args.teacher else []) + args.files:
        model, record = _load(path)
        test = _batches(args.data_dir, record, "test", args.test_images, args.seed)
        calib = _batches(args.data_dir, record, "train", args.calib_images, args.seed)
        before = _row(model, calib, test)
        n = reparametrize_bn(model, [x for x, _ in calib])
        after = _row(model, calib, test)
        rows.append({"file": path, "bns": n, "saved": before, "reparametrized": after})
        print(f"{Path(path).name:24s} saved: eval {before['eval']:5.2f}  train-mode {before['train_mode']:5.2f}  "
              f"after 8 updates {before['after_8_updates']:5.2f} | reparametrized: eval {after['eval']:5.2f}  "
              f"train-mode {after['train_mode']:5.2f}  after 8 updates {after['after_8_updates']:5.2f}", flush=True)
    out = Path(args.out)
    payload = {"test_images": args.test_images, "calib_images": args.calib_images, "seed": args.seed,
               "threads": args.threads, "torch": torch.__version__, "rows": rows}
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
