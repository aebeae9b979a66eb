"""``compconv train`` and ``compconv eval``.

    compconv train --preset cifar_cpu30 --model cifar_resnet20 --data-dir ../shared/data/cifar10
    compconv train --preset cifar_cpu30 --model cifar_resnet20 --method compconv --c0 128 ...
    compconv train --preset cifar_cpu30 --model cifar_resnet20 --method compconv --binarize ...   # XNOR-Net
    compconv train --resume runs/cifar_resnet20-vanilla-cifar10-s0          # continue a killed run
    compconv train --resume runs/NAME/checkpoints/best.pt --name NAME-from-best   # a new run from a checkpoint
    compconv eval runs/cifar_resnet20-vanilla-cifar10-s0/checkpoints/best.pt

Config resolution: defaults -> --preset -> --config FILE (YAML/JSON) -> flags -> --set key=value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import yaml

__all__ = ["add_parser", "main_eval", "main_train"]

# flag dest -> config key (flags default to None so only the given ones override).
_FLAG_KEYS = {
    "model": "model",
    "method": "method",
    "dataset": "dataset",
    "data_dir": "data_dir",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "seed": "seed",
    "device": "device",
    "threads": "threads",
    "workers": "workers",
    "out_dir": "out_dir",
    "name": "name",
    "stop_after": "stop_after",
    "train_subset": "train_subset",
    "eval_subset": "eval_subset",
    "cache_dir": "cache_dir",
    "max_steps": "max_steps",
    "bad_images": "bad_images",
    "weights": "weights",
    "init": "init",
    "teacher": "teacher",
    "teacher_weights": "teacher_weights",
    "distill_alpha": "distill_alpha",
    "distill_temperature": "distill_temperature",
    "distill_feature_weight": "distill_feature_weight",
}


def parse_feature_names(text: str) -> str | list[str]:
    """``--distill-features``: ``auto`` or comma-separated module names."""
    if text.strip() == "auto":
        return "auto"
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--distill-features must be 'auto' or comma-separated module names, but got {text!r}")
    return names


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from compconv.train.config import parse_set

    ov: dict[str, Any] = {
        key: getattr(args, dest) for dest, key in _FLAG_KEYS.items() if getattr(args, dest) is not None
    }
    if args.no_progress:
        ov["progress"] = False
    if args.compile:
        ov["compile"] = True
    if args.freeze_bn_stats:
        ov["freeze_bn_stats"] = True
    if args.distill_features is not None:
        ov["distill_features"] = parse_feature_names(args.distill_features)
    if args.binarize:
        ov["binarize"] = True
    opts: dict[str, Any] = {}
    if args.c0 is not None:
        opts["c0"] = args.c0
    if args.depth is not None:
        opts["depth"] = args.depth
    for k, v in parse_set(args.method_opt or []).items():
        opts[k] = v
    sets = parse_set(args.set or [])
    if opts:
        ov["method_options"] = {**sets.pop("method_options", {}), **opts}
    ov.update(sets)
    return ov


def main_train(args: argparse.Namespace) -> int:
    """``compconv train``: 0 on success; 1 when the run diverged or a file could not be written (one
    line naming the cause; the last finite checkpoint is kept) or the run directory is in use by another
    process; 2 for bad input (via ``run_parser``)."""
    from compconv.train.checkpoint import RunWriteError
    from compconv.train.guards import RunLockedError, TrainingDiverged

    try:
        return _main_train(args)
    except TrainingDiverged as e:
        print(f"compconv train: {e}", file=sys.stderr)
        return 1
    except (RunWriteError, RunLockedError) as e:
        print(f"compconv train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # one line, not a traceback: checkpoints are written atomically, none is lost
        where = args.resume or "RUN_DIR"
        print(f"compconv train: interrupted; the last checkpoint written is intact: resume with "
              f"`compconv train --resume {where}`", file=sys.stderr)
        return 130


def _main_train(args: argparse.Namespace) -> int:
    from compconv.train.config import resolve_config
    from compconv.train.engine import train

    ov = _overrides(args)
    if args.resume:
        if args.preset or args.config:
            # The original command plus --resume: everything it sets must match the run's config.
            from compconv.train.engine import RUNTIME_KEYS

            full = resolve_config(args.preset, args.config, ov).to_dict()
            ov = {k: v for k, v in full.items() if k not in RUNTIME_KEYS} | {
                k: v for k, v in ov.items() if k in RUNTIME_KEYS
            }
        res = train(resume=args.resume, resume_overrides=ov)
    else:
        cfg = resolve_config(args.preset, args.config, ov)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        res = train(cfg)
    if res.get("top1") is not None and os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(
            f"top1 {res['top1']:.2f}%  top5 {res['top5']:.2f}%  params {res['params']:,}  "
            + (f"MACs {res['macs']:,} real + {res['bops']:,} BOPs (binarized)  " if res.get("binarize")
               else f"MACs {res['macs']:,}  ")
            + f"epochs {res['epochs_done']}/{res['epochs']}  run {res['run_dir']}"
        )
    return 0


def main_eval(args: argparse.Namespace) -> int:
    from compconv.train.engine import evaluate_checkpoint

    if args.check and args.split is not None:
        print("compconv eval: --check compares with the run's own eval split; drop --split", file=sys.stderr)
        return 2
    sizes = (("--batch-size", args.batch_size), ("--threads", args.threads), ("--eval-subset", args.eval_subset))
    for flag, v in sizes:
        if v is not None and v < 1:  # before any data is read; -1 is not a "whole split" spelling here
            raise ValueError(f"argument {flag}: must be an integer >= 1, but got {v}")
    if args.check_tol is not None and not args.check:
        raise ValueError("argument --check-tol: the tolerance of --check, given without --check; add --check")
    args.check_tol = 0.0 if args.check_tol is None else args.check_tol
    if not (math.isfinite(args.check_tol) and args.check_tol >= 0):
        raise ValueError(f"argument --check-tol: must be a finite number >= 0 (points of top-1), but got "
                         f"{args.check_tol}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = evaluate_checkpoint(
        args.checkpoint,
        data_dir=args.data_dir,
        device=args.device,
        batch_size=args.batch_size,
        eval_subset=-1 if args.eval_subset is None else args.eval_subset,
        split=args.split,
        bad_images=args.bad_images,
        progress=not args.no_progress,
    )
    # the recorded metrics are for the run's own eval split: only comparable when no other split was asked for
    rec = res["recorded"] if args.split is None else {}
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        what = "a saved model" if res["epoch"] is None else f"epoch {res['epoch']}"  # compconv.save files: no epoch
        what += ", binarized" if res.get("binarize") else ""
        line = (
            f"{res['checkpoint']} ({what}, split {res['split']}): top1 {res['top1']:.2f}%  "
            f"top5 {res['top5']:.2f}%  loss {res['loss']:.4f}  on {res['n']} images"
        )
        if rec:
            line += f"  | recorded top1 {rec['top1']:.2f}%  top5 {rec['top5']:.2f}%"
            if res.get("recorded_n") is not None and res["recorded_n"] != res["n"]:
                line += f" on {res['recorded_n']} images (not comparable: other images)"
        print(line)
        if res["bad_images"]:
            print(f"  skipped {len(res['bad_images'])} image(s) that cannot be decoded (listed above)")
        if args.per_class:
            for name, acc in zip(res["classes"], res["per_class_top1"], strict=True):
                print(f"  {name:>24s}  {acc:6.2f}%")
    if args.check and (not rec or rec.get("top1") is None):
        print(
            f"compconv eval: --check: nothing to check: {res['checkpoint']} records no top1 (a compconv.save "
            "file or a run without an evaluation); drop --check",
            file=sys.stderr,
        )
        return 1
    if args.check and rec and res.get("recorded_n") not in (None, res["n"]):
        print(
            f"compconv eval: --check: evaluated {res['n']} images, the recorded top1 is on {res['recorded_n']}",
            file=sys.stderr,
        )
        return 1
    if args.check and rec and abs(res["top1"] - rec["top1"]) > args.check_tol:
        print(
            f"compconv eval: top1 {res['top1']:.4f}% differs from the recorded {rec['top1']:.4f}%",
            file=sys.stderr,
        )
        return 1
    return 0


def add_parser(subparsers: Any) -> None:
    from compconv.train.config import PRESETS

    p = subparsers.add_parser(
        "train",
        help="train (or resume) a zoo model, vanilla or converted, on CIFAR or an image folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe (see docs/training.md)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of config keys")
    p.add_argument("--model", help="zoo model name (compconv.models.list_models()), torchvision:NAME or timm:NAME "
                   "(random weights; nothing is downloaded)")
    p.add_argument("--weights", metavar="PATH", help="start from these weights: a state_dict file, a compconv "
                   "checkpoint or a compconv.save file (must fit --model / --method exactly)")
    p.add_argument("--init", metavar="PATH", help="start from a compconv.save file (e.g. from compconv compress): "
                   "its architecture and weights; replaces --model / --method")
    p.add_argument("--teacher", metavar="RUN|PATH|NAME", help="distil from this model: a run directory, a "
                   "checkpoint, a compconv.save file, or a model name with --teacher-weights")
    p.add_argument("--teacher-weights", metavar="PATH", help="weights of a --teacher given by name")
    p.add_argument("--distill-alpha", type=float, help="share of the KL term in the loss (default 0.9)")
    p.add_argument("--distill-temperature", type=float, help="softmax temperature T of the KL term (default 4)")
    p.add_argument("--distill-features", metavar="auto|NAME[,NAME...]", help="also pull these modules' outputs "
                   "towards the teacher's (relative squared error; auto: the block outputs of equal shape)")
    p.add_argument("--distill-feature-weight", type=float, help="weight beta of the feature term (default 1)")
    p.add_argument("--freeze-bn-stats", action="store_true", help="BatchNorm normalises with (and keeps) its "
                   "running statistics while training: for fine-tuning a warm-started compressed model")
    p.add_argument("--method", help="convert with this compact-conv method (compconv.list_methods())")
    p.add_argument("--c0", type=int, help="CompConv C0 (method option c0)")
    p.add_argument("--depth", type=int, help="fixed recursion depth (method option depth)")
    p.add_argument("--method-opt", action="append", metavar="KEY=VALUE", help="any method option (repeatable)")
    p.add_argument("--binarize", action="store_true", help="binarize the (converted) model with XNOR-Net before "
                   "training: binary weights and activations, stem and classifier real (docs/binarize.md)")
    p.add_argument("--dataset", help="cifar10 | cifar100 | folder")
    p.add_argument("--data-dir", help="torchvision data root or ImageNet-style folder (ROOT/train/<class>/*)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float)
    p.add_argument("--wd", dest="weight_decay", type=float, help="weight decay")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    p.add_argument("--workers", type=int, help="DataLoader workers (large images only)")
    p.add_argument("--out-dir", help="parent of the run directory (default runs/)")
    p.add_argument("--name", help="run directory name (default: model-method-dataset-seed)")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop after N epochs of this invocation")
    p.add_argument("--train-subset", type=int, metavar="N", help="train on a seeded random subset of N images")
    p.add_argument("--eval-subset", type=int, metavar="N", help="evaluate on a seeded random subset of N images")
    p.add_argument("--cache-dir", help="where decoded small-image arrays are cached")
    p.add_argument(
        "--max-steps",
        type=int,
        metavar="N",
        help="stop after N optimizer steps in all (smoke runs, speed checks; the LR schedule stays that of --epochs)",
    )
    p.add_argument(
        "--bad-images",
        choices=("error", "skip"),
        help="images that do not decode: error (default: refuse, listing every one) or skip (leave them out, "
        "counted in results.json)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (see docs/training.md)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key (repeatable), YAML values")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR|CKPT",
        help="continue a run (its directory or checkpoints/last.pt); another checkpoint (best.pt, a copy) "
        "starts a new run from it and needs --name (and optionally --out-dir)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=main_train)

    e = subparsers.add_parser("eval", help="evaluate a saved checkpoint on its run's evaluation split")
    e.add_argument("checkpoint", help="a checkpoint file or a run directory (uses checkpoints/last.pt)")
    e.add_argument("--data-dir", help="override the data directory recorded in the checkpoint")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--check", action="store_true", help="exit 1 if top1 differs from the recorded value")
    e.add_argument("--check-tol", type=float, help="tolerance for --check, in points (default 0)")
    e.add_argument(
        "--split",
        help="evaluate this split instead of the run's eval split: train (no augmentation: how well the model "
        "fits its training images), or a folder split such as val / test",
    )
    e.add_argument("--per-class", action="store_true", help="also print each class's top-1")
    e.add_argument(
        "--eval-subset",
        type=int,
        metavar="N",
        help="evaluate on a seeded random subset of N images (the recorded metrics are then not comparable)",
    )
    e.add_argument(
        "--bad-images",
        choices=("error", "skip"),
        help="images that do not decode: error (default) or skip (left out, listed and counted in the output)",
    )
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=main_eval)
