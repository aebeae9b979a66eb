"""``results.json`` and the loss/accuracy plots of a run.

results.json holds the final and best test top-1/top-5, params and MACs (``compconv.profile`` at the
training resolution, batch 1), mean training images/s, wall time (sum of the epochs' times, over every
resumed piece), hardware, library versions, the seed, the exact command(s) and the resolved config.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compconv.train.config import TrainConfig

__all__ = [
    "build_results",
    "hardware",
    "machine",
    "machines_by_epoch",
    "model_counts",
    "plot_history",
    "versions",
    "write_results",
]


def _median_images_per_s(history: list[dict[str, Any]]) -> float | None:
    """Median of the epochs' training images/s (None for an empty history)."""
    return statistics.median(h["train_images_per_s"] for h in history) if history else None


def model_counts(model: nn.Module, image_size: int) -> dict[str, Any]:
    """Params and MACs of one ``(1, 3, S, S)`` forward pass, counted by ``compconv.profile``.

    A binarized model (``compconv.binarize``) also gets ``bops``, ``binary_params``, ``storage_mb`` and
    ``combined_macs_bops64`` (= BOPs / 64 + MACs); its ``macs`` are the real ones only.
    """
    from compconv.profile import profile

    was_training = model.training
    model.eval()
    p = profile(model, (1, 3, image_size, image_size))
    model.train(was_training)
    out: dict[str, Any] = {
        "params": int(p.total_params),
        "macs": int(p.total_macs),
        "input_size": [1, 3, image_size, image_size],
    }
    if p.has_binary:
        out.update(bops=int(p.total_bops), binary_params=int(p.binary_params), storage_mb=p.storage_mb,
                   combined_macs_bops64=p.combined_macs())
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device, world: int) -> dict[str, Any]:
    hw: dict[str, Any] = {
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": world,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return hw


def machine(hw: dict[str, Any]) -> str:
    """One line naming what ran an epoch, from :func:`hardware`'s record: ``"AMD EPYC, 2 threads"``,
    ``"NVIDIA H200 x 4"``.

    Each epoch's history row records it, so a run resumed on another machine says which epochs ran where
    (its epoch times are not comparable across machines); ``hardware`` only names the last one.
    """
    world = hw["world_size"]
    if "gpu" in hw:
        return hw["gpu"] + (f" x {world}" if world > 1 else "")
    n = hw["torch_threads"]
    return f"{hw['cpu']}, {n} thread{'s' if n > 1 else ''}" + (f", world {world}" if world > 1 else "")


def machines_by_epoch(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history's runs of consecutive epochs on one machine: ``[{"epochs": [first, last], "machine": str}]``.

    Epochs recorded before machines were recorded per epoch read ``"not recorded"``.
    """
    out: list[dict[str, Any]] = []
    for r in history:
        m = r.get("machine") or "not recorded"
        if out and out[-1]["machine"] == m:
            out[-1]["epochs"][1] = r["epoch"]
        else:
            out.append({"epochs": [r["epoch"], r["epoch"]], "machine": m})
    return out


def versions() -> dict[str, str]:
    import numpy
    import torchvision

    import compconv

    return {
        "compconv": compconv.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
    }


def build_results(
    cfg: TrainConfig,
    history: list[dict[str, Any]],
    prof: dict[str, Any],
    data: Any,
    device: torch.device,
    info: Any,
    command: str,
    finished: bool,
    run_dir: Path,
) -> dict[str, Any]:
    evals = [r for r in history if r.get("test_top1") is not None]
    final = evals[-1] if evals else {}
    best = max(evals, key=lambda r: r["test_top1"]) if evals else {}
    commands_file = Path(run_dir) / "commands.txt"
    commands = commands_file.read_text().splitlines() if commands_file.is_file() else [command]
    train_time = sum(r["train_time_s"] for r in history)
    n_img = sum(r["train_images_per_s"] * r["train_time_s"] for r in history)
    return {
        # A model object replaces cfg.model (train(model=...)), so its class names the model, never the default.
        "model": cfg.model_object or cfg.model,
        "method": cfg.method,
        "method_options": dict(cfg.method_options),
        **({"binarize": True} if cfg.binarize else {}),  # XNOR-Net (compconv.binarize); absent: full precision
        "dataset": cfg.dataset,
        "data_source": data.source,
        "num_classes": data.num_classes,
        "n_train": data.n_train,
        "n_eval": data.n_eval,
        "image_size": data.image_size,
        "finished": finished,
        "diverged": None,  # {"epoch", "step", "what", "message"} when a non-finite loss/weight stopped the run
        "bad_images_skipped": len(getattr(data, "bad", [])),  # --bad-images skip: images left out
        "bad_images": [p for p, _ in getattr(data, "bad", [])][:100],
        "epochs_done": len(history),
        "epochs": cfg.epochs,
        "top1": final.get("test_top1"),
        "top5": final.get("test_top5"),
        "test_loss": final.get("test_loss"),
        "best_top1": best.get("test_top1"),
        "best_epoch": best.get("epoch"),
        "params": prof["params"],
        "macs": prof["macs"],
        **{k: prof[k] for k in ("bops", "binary_params", "storage_mb", "combined_macs_bops64") if k in prof},
        "profile_input_size": prof.get("input_size"),
        "train_images_per_s": n_img / train_time if train_time else None,
        # robust to a machine whose load changes between epochs (the mean above is not)
        "median_epoch_images_per_s": _median_images_per_s(history),
        "wall_time_s": sum(r["epoch_time_s"] for r in history),
        "train_time_s": train_time,
        "mean_epoch_time_s": sum(r["epoch_time_s"] for r in history) / len(history) if history else None,
        "hardware": hardware(device, info.world),  # this (the last) start's machine
        "machines_by_epoch": machines_by_epoch(history),  # a resumed run may have moved machines
        "versions": versions(),
        "seed": cfg.seed,
        "command": commands[0] if commands else command,
        "commands": commands,
        "preset": cfg.preset,
        "config": cfg.to_dict(),
        "history": history,
    }


def write_results(run_dir: str | os.PathLike[str], res: dict[str, Any]) -> Path:
    path = Path(run_dir) / "results.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def plot_history(
    history: list[dict[str, Any]], path: str | os.PathLike[str], title: str | None = None
) -> Path | None:
    """Loss (train/test) and accuracy (train/test top-1) against epochs, as one PNG titled ``title``.

    ``title`` defaults to the name of the run directory holding ``path``.
    """
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    ev = [r for r in history if r.get("test_top1") is not None]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [r["train_loss"] for r in history], label="train")
    a1.plot([r["epoch"] for r in ev], [r["test_loss"] for r in ev], label="test")
    a1.set_xlabel("epoch")
    a1.set_ylabel("cross-entropy")
    a1.legend()
    a2.plot(ep, [r["train_acc"] for r in history], label="train")
    a2.plot([r["epoch"] for r in ev], [r["test_top1"] for r in ev], label="test top-1")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy (%)")
    a2.legend()
    path = Path(path)
    fig.suptitle(title if title is not None else path.parent.name)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def markdown_table(run_dirs: list[str | os.PathLike[str]]) -> str:
    """The README table (top-1, params, MACs, train images/s, wall time, epochs) of runs' results.json.

    Images/s: the mean over the run and the median epoch's (the latter is robust to epochs that shared the
    machine with other jobs).
    """
    lines = [
        "| run | test top-1 (%) | best top-1 (%) | params | MACs | train img/s (mean / median epoch) | wall time "
        "| epochs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in run_dirs:
        r = json.loads((Path(d) / "results.json").read_text())
        top1 = f"{r['top1']:.2f}" if r.get("top1") is not None else "-"
        best = f"{r['best_top1']:.2f} (ep {r['best_epoch']})" if r.get("best_top1") is not None else "-"
        med = r.get("median_epoch_images_per_s")  # written by build_results
        if med is None and r.get("history"):  # results.json written before that field existed
            med = _median_images_per_s(r["history"])
        ips = f"{r['train_images_per_s']:.0f} / {med:.0f}" if r.get("train_images_per_s") and med else "-"
        wall = r.get("wall_time_s") or 0.0
        state = " (diverged)" if r.get("diverged") else "" if r.get("finished") else " (running)"
        lines.append(
            f"| {Path(d).name} | {top1} | {best} | {r['params']:,} | {r['macs']:,} | {ips} | "
            f"{wall / 3600:.2f} h | {r['epochs_done']}/{r['epochs']}{state} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m compconv.train.results RUN_DIR [RUN_DIR ...]``: print the runs' markdown table."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m compconv.train.results",
                                     description="Print the README's training table from run directories.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run directory holding results.json")
    args = parser.parse_args(argv)
    missing = [d for d in args.run_dirs if not (Path(d) / "results.json").is_file()]
    if missing:
        parser.error(f"no results.json in run_dirs: {missing}")
    print(markdown_table(args.run_dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
