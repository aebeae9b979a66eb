"""``compconv compress``: compress a trained model to a budget, save it, optionally fine-tune it by distillation.

    compconv compress --model cifar_resnet20 --weights runs/r20/checkpoints/last.pt --method compconv \\
        --budget 0.5 --data-dir ../shared/data/cifar10 --calib-images 512 --out r20_half.pt
    compconv train --init r20_half.pt --teacher runs/r20 --epochs 10 --lr 0.01   # data: recorded in the file
    compconv eval r20_half.pt                      # on the data recorded in the file

Fine-tunes of an epoch or more: BN in training mode, lr 0.01 (docs/compress.md); a few hundred steps or
less: ``--freeze-bn-stats`` and lr 5e-4, or the first steps undo the warm start's fitted scale.

Calibration images are the first ``--calib-images`` of a seeded random subset of the training split, read
without augmentation and normalised as the trained model's run was (its checkpoint records the
normalisation and class names; a plain state_dict gets the calibration images' own statistics). The output
is a ``compconv.save`` file: the conversion (method, per-layer options), the weights, the report and the
data record, so ``compconv.load(path)``, ``compconv eval path`` and ``compconv train --init path`` need
nothing else. ``--finetune-epochs N`` then runs the trainer with the original model as the teacher.
``--budget-type latency`` makes the budget a share of the model's latency measured on this machine at batch
``--latency-batch`` (default 1) with ``--threads`` threads, every module in its deployed form
(``--latency-form converted``: as ``convert`` builds it): run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["FINETUNE_LR", "FREEZE_BN_LR", "add_parser", "calibration_data", "main_compress"]

FINETUNE_LR = 0.01  # the distillation recipe of docs/compress.md's evidence rows (batch statistics on)
FREEZE_BN_LR = 5e-4  # with --freeze-bn-stats: short fine-tunes that keep the warm start's BN statistics


def _teacher_record(weights: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(data record, training config)`` of a compconv training checkpoint; ``(None, None)`` otherwise."""
    from compconv.train.sources import _read

    obj = _read(weights)
    if isinstance(obj, dict) and "format_version" in obj and isinstance(obj.get("config"), dict):
        return obj.get("data"), obj["config"]
    if isinstance(obj, dict) and obj.get("format") == "compconv-model":
        extra = obj.get("extra") or {}
        return extra.get("data"), None
    return None, None


def calibration_data(weights: str, *, dataset: str | None = None, data_dir: str | None = None, images: int = 512,
                     batch_size: int = 64, seed: int = 0) -> tuple[Any, dict[str, Any] | None,
                                                                   dict[str, Any] | None, Any]:
    """The calibration images for a trained model: a seeded random subset of ``images`` training images, read
    without augmentation and normalised as the model's own run recorded (a compconv checkpoint or save file).

    Returns ``(data bundle, data record of the weights or None, their training config or None, TrainConfig)``;
    ``bundle.eval`` is the calibration loader. ``dataset`` / ``data_dir`` default to the run's own.
    """
    from compconv.train.config import TrainConfig
    from compconv.train.data import build_data, data_root

    rec, tcfg = _teacher_record(weights)
    dataset = dataset or (tcfg or {}).get("dataset") or "cifar10"
    data_dir = data_dir or (tcfg or {}).get("data_dir")
    cfg = TrainConfig(dataset=dataset, data_dir=str(data_root(data_dir)) if data_dir else None, download=False,
                      eval_split="train", eval_subset=images, train_subset=images,
                      batch_size=batch_size, seed=seed, progress=False)
    recorded = {k: v for k, v in (rec or {}).items() if k not in ("eval_dir", "n_eval", "n_train")}
    data = build_data(cfg.validate(), train=False, recorded=recorded or None)
    return data, rec, tcfg, cfg


def main_compress(args: argparse.Namespace) -> int:
    """Compress, save, print the report; with ``--finetune-epochs`` also train. 0 on success."""
    import torch

    import compconv
    from compconv.compress import compress
    from compconv.models import get_model
    from compconv.train.sources import load_weights

    if args.calib_images < 2:
        raise ValueError(f"--calib-images must be >= 2 (some are held out to measure the fits), "
                         f"got {args.calib_images}")
    if args.budget_type != "latency":
        for opt, val in (("--latency-batch", args.latency_batch), ("--latency-form", args.latency_form)):
            if val is not None:
                raise ValueError(f"{opt} is used with --budget-type latency, but got --budget-type {args.budget_type}")
    if args.latency_batch is not None and args.latency_batch < 1:
        raise ValueError(f"--latency-batch must be >= 1, got {args.latency_batch}")
    if Path(args.weights).is_dir():  # a run directory, as --teacher and compconv eval take: its last checkpoint
        from compconv.train.checkpoint import find_checkpoint

        args.weights = str(find_checkpoint(args.weights))
    if args.out.endswith(("/", os.sep)) or Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a directory; pass the file to write, e.g. "
                         f"{str(Path(args.out) / 'compressed.pt')!r}")
    if Path(args.out).resolve() == Path(args.weights).resolve():
        raise ValueError(f"--out {args.out!r} is the --weights file: writing it would destroy the trained weights; "
                         "choose another --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    from compconv.train.sources import binarized_source

    binarized = binarized_source(args.weights)
    if binarized:
        raise ValueError(f"--weights {args.weights!r} {binarized}: compress the full-precision model first, then "
                         "binarize (train the compressed model with --binarize, or compconv.binarize it)")
    data, rec, tcfg, cfg = calibration_data(args.weights, dataset=args.dataset, data_dir=args.data_dir,
                                            images=args.calib_images, batch_size=args.batch_size, seed=args.seed)
    dataset = cfg.dataset
    if data.n_eval < args.calib_images:  # the subset is clamped to the split: say so rather than use fewer
        raise ValueError(f"--calib-images {args.calib_images} is more than the {data.n_eval} images of the training "
                         f"split; pass at most {data.n_eval} (a few hundred are enough; default 512)")
    _check_finetune_args(args, Path(args.out), tcfg, dataset, cfg.data_dir)
    torch.manual_seed(args.seed)
    model = get_model(args.model, num_classes=data.num_classes)
    load_weights(model, args.weights)
    model.eval()
    if args.finetune_epochs is not None and getattr(args, "distill_features", None) is not None:
        _check_feature_names(args.distill_features, model, next(iter(data.eval)))
    # MACs are counted per image; a latency budget is timed at the deployment batch
    size = (args.latency_batch or 1, 3, data.image_size, data.image_size)
    comp, report = compress(model, args.method, args.budget, data.eval, budget_type=args.budget_type,
                            input_size=size, rule=args.rule, warm_start=not args.no_warm_start, seed=args.seed,
                            latency_form=args.latency_form, reparametrize_bn_stats=args.reparametrize_bn)
    rec_out = dict(data.record())
    rec_out["eval_dir"] = (rec or {}).get("eval_dir")  # the teacher's evaluation folder, not the calibration one
    rec_out.pop("n_eval", None)
    rec_out.pop("n_train", None)
    extra = {"report": report.to_dict(), "data": rec_out, "dataset": dataset, "data_dir": cfg.data_dir,
             "source_weights": str(Path(args.weights).resolve()), "calib_images": args.calib_images}
    out = compconv.save(comp, args.out, base=args.model, base_kwargs={"num_classes": data.num_classes},
                        conversion=report, extra=extra)
    print(report)
    print(f"compconv compress: wrote {out}")
    if args.finetune_epochs:
        _finetune(args, out, tcfg, dataset, cfg.data_dir)
    return 0


# the fine-tune's flags (besides --finetune-epochs), each a no-op without it
_FINETUNE_FLAGS = {"preset": "--preset", "finetune_lr": "--finetune-lr", "freeze_bn_stats": "--freeze-bn-stats",
                   "distill_features": "--distill-features", "distill_feature_weight": "--distill-feature-weight",
                   "max_steps": "--max-steps", "train_subset": "--train-subset", "eval_subset": "--eval-subset",
                   "name": "--name", "out_dir": "--out-dir", "no_progress": "--no-progress"}
# TrainConfig fields -> the flags that set them here, so a config error names what the user typed
_FIELD_FLAGS = {"lr": "--finetune-lr", "epochs": "--finetune-epochs", "max_steps": "--max-steps",
                "train_subset": "--train-subset", "eval_subset": "--eval-subset", "batch_size": "--batch-size",
                "threads": "--threads", "distill_feature_weight": "--distill-feature-weight",
                "distill_features": "--distill-features", "seed": "--seed", "name": "--name"}


def _check_finetune_args(args: argparse.Namespace, out: Path, tcfg: dict[str, Any] | None, dataset: str,
                         data_dir: str | None) -> None:
    """Refuse fine-tune flags without ``--finetune-epochs``, and a fine-tune config that would fail, before
    anything is compressed or written."""
    if args.finetune_epochs is None:
        given = [flag for key, flag in _FINETUNE_FLAGS.items() if getattr(args, key, None) not in (None, False)]
        if given:
            raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} used with --finetune-epochs "
                             "N (the fine-tune after compressing), which was not given")
        return
    try:
        _finetune_config(args, out, tcfg, dataset, data_dir)
    except ValueError as e:
        msg = str(e)
        field = next((f for f in sorted(_FIELD_FLAGS, key=len, reverse=True) if msg.startswith(f + " ")), None)
        if field is not None:
            msg = _FIELD_FLAGS[field] + msg[len(field):]
        raise ValueError(f"fine-tune options: {msg} (nothing was compressed or written)") from None


def _check_feature_names(text: str, model: Any, batch: Any) -> None:
    """``--distill-features`` on the original model (the teacher) before compressing: a typo must not cost a
    compression. The student's side is checked by the trainer."""
    from compconv.train.cli import parse_feature_names
    from compconv.train.features import resolve_feature_layers

    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    try:
        resolve_feature_layers(model, model, parse_feature_names(text), x[:2])
    except ValueError as e:
        raise ValueError(f"fine-tune options: --distill-features {text!r}: {e} (nothing was compressed or "
                         "written)") from None


def _finetune(args: argparse.Namespace, out: Path, tcfg: dict[str, Any] | None, dataset: str,
              data_dir: str | None) -> None:
    """Train the saved file (``init``) by distillation from the original model, as ``compconv train``."""
    from compconv.train.engine import train

    cfg = _finetune_config(args, out, tcfg, dataset, data_dir)
    res = train(cfg)
    if res.get("top1") is not None:
        print(f"fine-tuned: top1 {res['top1']:.2f}%  run {res['run_dir']}")


def _finetune_config(args: argparse.Namespace, out: Path, tcfg: dict[str, Any] | None, dataset: str,
                     data_dir: str | None) -> Any:
    """The fine-tune's validated ``TrainConfig``: ``init`` the saved file, the original model the teacher."""
    from compconv.train.cli import parse_feature_names
    from compconv.train.config import resolve_config

    teacher = {"teacher": args.weights} if tcfg is not None else {"teacher": args.model,
                                                                   "teacher_weights": args.weights}
    ov: dict[str, Any] = {"init": str(out), "dataset": dataset, "data_dir": data_dir, "seed": args.seed,
                          "epochs": args.finetune_epochs, "out_dir": args.out_dir or "runs",
                          "name": args.name or f"{Path(out).stem}-distill", **teacher}
    # a preset's lr is a from-scratch one (0.1): one such step undoes the warm start, so a fine-tune has its own
    lr = args.finetune_lr
    ov["lr"] = lr if lr is not None else FREEZE_BN_LR if getattr(args, "freeze_bn_stats", False) else FINETUNE_LR
    for key in ("max_steps", "train_subset", "eval_subset", "threads", "batch_size"):
        v = getattr(args, key)
        if v is not None:
            ov[key] = v
    if getattr(args, "freeze_bn_stats", False):
        ov["freeze_bn_stats"] = True
    if getattr(args, "distill_features", None) is not None:
        ov["distill_features"] = parse_feature_names(args.distill_features)
    if getattr(args, "distill_feature_weight", None) is not None:
        ov["distill_feature_weight"] = args.distill_feature_weight
    cfg = resolve_config(args.preset, None, ov)
    cfg.progress = not args.no_progress
    return cfg


def add_parser(subparsers: Any) -> None:
    from compconv.compress import BUDGET_TYPES, LATENCY_FORMS
    from compconv.compress.search import RULES
    from compconv.layers.base import list_methods
    from compconv.train.config import PRESETS

    p = subparsers.add_parser(
        "compress",
        help="compress a trained model to a MACs/params/latency budget (search + warm start), save it, optionally "
             "distil",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="zoo name, torchvision:NAME or timm:NAME (the trained model's)")
    p.add_argument("--weights", required=True, metavar="PATH",
                   help="its trained weights: a compconv run directory or checkpoint (preferred: it records the "
                        "normalisation), a compconv.save file or a state_dict file")
    p.add_argument("--method", default="compconv", help="compact-conv method, one of: "
                   f"{', '.join(list_methods())} (default: compconv)")
    p.add_argument("--budget", type=float, required=True, help="target share of the model's cost, in (0, 1]")
    p.add_argument("--budget-type", default="macs", choices=BUDGET_TYPES,
                   help="what the budget is a share of: MACs, params, or the latency measured on this machine "
                        "(at --latency-batch, with --threads; run on a quiet machine)")
    p.add_argument("--latency-batch", type=int, metavar="N",
                   help="with --budget-type latency: the deployment batch the model is timed at (default 1)")
    p.add_argument("--latency-form", choices=LATENCY_FORMS,
                   help="with --budget-type latency: time every module deployed (default; a whole model with HetConv "
                        "layers also as deploy(collapse_hetconv=True), the faster counting) or as converted")
    p.add_argument("--rule", default="search", choices=RULES,
                   help="search: per-layer options from measured sensitivity; eq6; uniform (default: search)")
    p.add_argument("--no-warm-start", action="store_true", help="random init of the compact layers (+ BN "
                   "re-estimation), for comparison (not with --reparametrize-bn)")
    p.add_argument("--reparametrize-bn", action="store_true",
                   help="give every BN its input's statistics in the compressed model and fold the change into its "
                   "gamma/beta: the same outputs, and training mode computes what eval mode does (docs/compress.md: "
                   "it did not help a 16-step fine-tune)")
    p.add_argument("--dataset", help="cifar10 | cifar100 | folder (default: the checkpoint's, else cifar10)")
    p.add_argument("--data-dir", help="data root (default: the checkpoint's)")
    p.add_argument("--calib-images", type=int, default=512, help="calibration images from the training split "
                   "(default: 512)")
    p.add_argument("--batch-size", type=int, default=64, help="calibration batch size (and the "
                   "fine-tune's; default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seeds the calibration subset, the search, the fits "
                   "and the fine-tune (default: 0)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    p.add_argument("--out", required=True, metavar="PATH.pt", help="the compconv.save file to write")
    g = p.add_argument_group("fine-tune by distillation from the original model (compconv train --init OUT "
                             "--teacher WEIGHTS)")
    g.add_argument("--finetune-epochs", type=int, metavar="N", help="train N epochs after compressing")
    g.add_argument("--preset", choices=sorted(PRESETS), help="the fine-tune's recipe")
    g.add_argument("--finetune-lr", type=float, help=f"the fine-tune's learning rate (default {FINETUNE_LR}, "
                   f"{FREEZE_BN_LR:g} with --freeze-bn-stats; not the preset's from-scratch lr, which undoes the "
                   "warm start)")
    g.add_argument("--freeze-bn-stats", action="store_true", help="keep BN's running statistics while "
                   "fine-tuning (the warm start's scale; --finetune-lr then defaults to 5e-4)")
    g.add_argument("--distill-features", metavar="auto|NAME[,NAME...]", help="also distil these modules' outputs "
                   "(auto: every block output; see compconv train --distill-features)")
    g.add_argument("--distill-feature-weight", type=float, metavar="BETA", help="weight of the feature term "
                   "(default 1)")
    g.add_argument("--max-steps", type=int, metavar="N", help="stop the fine-tune after N optimizer steps")
    g.add_argument("--train-subset", type=int, metavar="N", help="fine-tune on N training images (a seeded "
                   "subset)")
    g.add_argument("--eval-subset", type=int, metavar="N", help="evaluate the fine-tune on N test images")
    g.add_argument("--out-dir", help="parent of the fine-tune's run directory (default: runs)")
    g.add_argument("--name", help="the fine-tune's run directory name (default: OUT's stem + -distill)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars in the fine-tune")
    p.set_defaults(func=main_compress)


if __name__ == "__main__":  # pragma: no cover
    from compconv.cli import main

    sys.exit(main(["compress", *sys.argv[1:]]))
