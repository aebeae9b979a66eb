"""Issue 16's evidence: a trained model compressed to a MACs budget, against what users would pick instead.

Every row starts from the same trained teacher (a compconv run directory) and gets the same training budget
(``--epochs``, the same schedule and seed); each row is an ordinary ``compconv train`` run directory under
``--out`` (checkpoints every epoch, exact resume, ``results.json``), so an interrupted invocation picks up
where it stopped when run again with the same arguments.

Rows (``--rows``; default: all, in this order):

* ``compress_<method>``: ``compconv.compress`` (search checked against Eq. 6 / the uniform rule, warm start)
  + distillation from the teacher; methods compconv, ghost, hetconv, slimconv;
* ``eq6_warm``: CompConv with Eq. 6's rule + warm start + distillation (what the search buys);
* ``random_distill``: the ``compress_compconv`` architecture, compact layers re-initialised and BN
  re-estimated (what ``compress(warm_start=False)`` does) + distillation (what the warm start buys);
* ``scratch``, ``scratch_long``: the ``compress_compconv`` architecture, every parameter re-initialised,
  trained without teacher with the from-scratch recipe for ``--epochs`` and ``--long-epochs``;
* ``tp_magnitude``, ``tp_group_norm``: the teacher pruned by Torch-Pruning (``BasePruner``, one call, L1
  magnitude / group L2 norm importance) to the ``compress_compconv`` row's MACs (within ``--match-tolerance``,
  3%) + distillation;
* ``thin``, ``thin_long``: the vanilla network uniformly width-scaled to those MACs, from scratch;
* ``compress_compconv_feat``, ``tp_group_norm_feat``: ``compress_compconv`` / ``tp_group_norm`` distilled on
  features too (``distill_features="auto"``: every block output, relative squared error, weight 1).

Distillation rows use ``--lr`` (SGD, cosine, the preset's other settings, KL on logits with alpha 0.9, T 4);
from-scratch rows use the preset's own lr (0.1). ``--table`` prints the summary and writes
``OUT/summary.json`` from the finished rows without training.

    python benchmarks/compress_evidence.py --teacher docs/results/train_runs/r20-vanilla-cpu60-s0 \\
        --data-dir ../shared/data/cifar10 --budget 0.5 --epochs 10 --out docs/results/compress/r20-b050 \\
        --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

COMPRESS_METHODS = ("compconv", "ghost", "hetconv", "slimconv")
ROWS = (
    "compress_compconv",
    "tp_magnitude",
    "thin",
    "eq6_warm",
    "random_distill",
    "scratch",
    "tp_group_norm",
    "compress_ghost",
    "compress_hetconv",
    "compress_slimconv",
    "scratch_long",
    "thin_long",
    "compress_compconv_feat",
    "tp_group_norm_feat",
)
FEATURE_ROWS = {"compress_compconv_feat": "compress_compconv", "tp_group_norm_feat": "tp_group_norm"}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _finished(run: Path) -> dict[str, Any] | None:
    f = run / "results.json"
    if f.exists():
        res = json.loads(f.read_text())
        if res.get("finished"):
            return res
    return None


def _script() -> str:
    """This script's path as a user in the current folder would type it."""
    here = Path(__file__).resolve()
    return str(here.relative_to(Path.cwd())) if here.is_relative_to(Path.cwd()) else str(here)


class Evidence:
    def __init__(self, args: argparse.Namespace) -> None:
        from compconv.train.sources import build_teacher

        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.weights = str(Path(args.teacher) / "checkpoints" / "last.pt") if Path(args.teacher).is_dir() \
            else args.teacher
        self.teacher = build_teacher(args.teacher, None, args.num_classes)
        self._calib: Any = None

    # -- starting points ------------------------------------------------------------------------------
    def calib(self) -> Any:
        if self._calib is None:
            from compconv.compress.cli import calibration_data

            data, _, _, _ = calibration_data(self.weights, data_dir=self.args.data_dir,
                                             images=self.args.calib_images, seed=self.args.seed)
            self._calib = data
        return self._calib

    def _trained(self) -> nn.Module:
        m = copy.deepcopy(self.teacher)
        for q in m.parameters():
            q.requires_grad_(True)
        return m.eval()

    def _save(self, model: nn.Module, name: str, report: Any, note: str) -> Path:
        import compconv

        data = self.calib()
        rec = dict(data.record())
        rec.pop("n_eval", None)
        rec.pop("n_train", None)
        rec["eval_dir"] = None
        return compconv.save(model, self.out / "start" / f"{name}.pt", base=self.args.model,
                             base_kwargs={"num_classes": self.args.num_classes}, conversion=report,
                             extra={"report": report.to_dict() if hasattr(report, "to_dict") else report,
                                    "data": rec, "note": note, "source_weights": self.weights})

    def compressed(self, method: str, rule: str = "search") -> Path:
        """``compress(teacher, method, budget, calib)``, saved as a start file (cached)."""
        name = f"{method}_{rule}"
        path = self.out / "start" / f"{name}.pt"
        if path.exists():
            return path
        from compconv.compress import compress

        data = self.calib()
        size = (1, 3, data.image_size, data.image_size)
        torch.manual_seed(self.args.seed)
        _log(f"compress {method} rule={rule} budget={self.args.budget}")
        model, report = compress(self._trained(), method, self.args.budget, data.eval, input_size=size, rule=rule,
                                 seed=self.args.seed)
        print(report, flush=True)
        return self._save(model, name, report, f"compress({method}, {self.args.budget}, rule={rule})")

    def reinitialised(self, whole: bool) -> Path:
        """The ``compress_compconv`` architecture re-initialised: compact layers only (+ BN re-estimated), or
        every parameter (from scratch)."""
        import compconv
        from compconv.compress.bn import reestimate_bn
        from compconv.layers.base import CompactConv2d

        name = "compconv_scratch" if whole else "compconv_random"
        path = self.out / "start" / f"{name}.pt"
        if path.exists():
            return path
        src = self.compressed("compconv")
        model = compconv.load(src)
        torch.manual_seed(self.args.seed)
        for m in model.modules():
            if (whole or isinstance(m, CompactConv2d)) and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if whole:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
        else:
            reestimate_bn(model, [x for x, *_ in self.calib().eval])
        meta = torch.load(src, weights_only=True)
        report = {"method": meta["method"], "layers": meta["layers"]}
        return self._save(model.eval(), name, report, f"{src.name} re-initialised ({'all' if whole else 'compact'})")

    def target_macs(self) -> int:
        import compconv

        size = (1, 3, self.calib().image_size, self.calib().image_size)
        return int(compconv.profile(compconv.load(self.compressed("compconv")).eval(), size).total_macs)

    def pruned(self, importance: str) -> tuple[nn.Module, dict[str, Any]]:
        from compconv.bench.baselines import magnitude_pruned

        size = (1, 3, self.calib().image_size, self.calib().image_size)
        model, rec = magnitude_pruned(self._trained(), self.target_macs(), size, importance=importance,
                                      tolerance=self.args.match_tolerance)
        return model.eval(), rec.as_dict()

    def thinned(self) -> tuple[nn.Module, dict[str, Any]]:
        from compconv.bench.baselines import width_scaled

        size = (1, 3, self.calib().image_size, self.calib().image_size)
        torch.manual_seed(self.args.seed)
        model, rec = width_scaled(self.args.model, self.target_macs(), size, tolerance=self.args.match_tolerance,
                                  host_kwargs={"num_classes": self.args.num_classes})
        return model, rec.as_dict()

    # -- the rows -------------------------------------------------------------------------------------
    def row(self, name: str) -> tuple[dict[str, Any], nn.Module | None, dict[str, Any]]:
        """``(config overrides, model object or None, provenance)`` of one row."""
        a = self.args
        distill = {"teacher": a.teacher, "lr": a.lr}
        if name in FEATURE_ROWS:  # the same start, + feature distillation at every block output
            ov, model, prov = self.row(FEATURE_ROWS[name])
            return {**ov, "distill_features": "auto"}, model, {**prov, "distill_features": "auto"}
        if name.startswith("compress_"):
            method = name[len("compress_"):]
            return {"init": str(self.compressed(method)), **distill}, None, {"start": f"compress {method}"}
        if name == "eq6_warm":
            return {"init": str(self.compressed("compconv", "eq6")), **distill}, None, {"start": "compress eq6"}
        if name == "random_distill":
            return {"init": str(self.reinitialised(False)), **distill}, None, {"start": "random init"}
        if name in ("scratch", "scratch_long"):
            ep = a.epochs if name == "scratch" else a.long_epochs
            return {"init": str(self.reinitialised(True)), "epochs": ep}, None, {"start": "scratch"}
        if name in ("tp_magnitude", "tp_group_norm"):
            model, rec = self.pruned(name[len("tp_"):])
            return dict(distill), model, {"start": "torch_pruning", "dense": rec}
        if name in ("thin", "thin_long"):
            model, rec = self.thinned()
            ep = a.epochs if name == "thin" else a.long_epochs
            return {"epochs": ep}, model, {"start": "width-scaled, scratch", "dense": rec}
        raise ValueError(f"--rows: unknown row {name!r}; known: {', '.join(ROWS)}")

    def run(self, name: str) -> dict[str, Any] | None:
        from compconv.train.config import resolve_config
        from compconv.train.engine import train

        a = self.args
        run_dir = self.out / name
        done = _finished(run_dir)
        if done:
            _log(f"{name}: finished (top-1 {done['top1']:.2f}%)")
            return done
        ov, model, prov = self.row(name)
        command = f"{a.command}  # row {name}"
        if (run_dir / "checkpoints" / "last.pt").exists():
            _log(f"{name}: resuming {run_dir}")
            # Runtime settings given now win over the run's recorded ones (threads: share the CPU).
            runtime = {k: v for k, v in (("stop_after", a.stop_after), ("threads", a.threads)) if v}
            res = train(resume=str(run_dir), model=model, resume_overrides=runtime or None, command=command)
        else:
            base = {"dataset": "cifar10", "data_dir": a.data_dir, "seed": a.seed, "epochs": a.epochs,
                    "out_dir": str(self.out), "name": name, "threads": a.threads, "stop_after": a.stop_after,
                    "progress": False, "plots": False, "tensorboard": False}
            for key in ("train_subset", "eval_subset", "max_steps"):
                if getattr(a, key) is not None:
                    base[key] = getattr(a, key)
            base["model"] = a.model  # a model object (pruned, thinned) is derived from it; its class is recorded too
            cfg = resolve_config(a.preset, None, {**base, **ov})
            _log(f"{name}: training {cfg.epochs} epochs, lr {cfg.lr}, teacher {cfg.teacher}")
            res = train(cfg, model=model, command=command)
        tmp = run_dir / "provenance.json.tmp"
        tmp.write_text(json.dumps(prov, indent=1, default=str))
        os.replace(tmp, run_dir / "provenance.json")
        if res.get("finished"):
            _log(f"{name}: top-1 {res['top1']:.2f}%")
        return res


LATENCY_TREATMENTS = ("deploy", "deploy_cl", "deploy_auto1x1_cl", "deploy_cl_compile")
# Models holding HetConv layers are also tried with them as the dense convs they equal (all, or per layer
# the faster form): on CPUs the grouped exact form can lose to the dense conv despite its fewer MACs.
HETCONV_TREATMENTS = ("deploy_densehet_cl", "deploy_autohet_cl", "deploy_densehet_cl_compile")


def treatments_for(model: nn.Module) -> tuple[str, ...]:
    """The deployed configurations a model is timed in (its best is reported)."""
    from compconv.layers.hetconv import HetConv2d

    het = any(isinstance(m, HetConv2d) for m in model.modules())
    return LATENCY_TREATMENTS + (HETCONV_TREATMENTS if het else ())


def trained_model(ev: Evidence, name: str) -> nn.Module:
    """A finished row's trained model: its architecture rebuilt as the row built it, its last weights."""
    import compconv
    from compconv.train.checkpoint import load_checkpoint, load_model_state

    ov, model, _ = ev.row(name)
    if model is None:
        model = compconv.load(ov["init"])
    ckpt = ev.out / name / "checkpoints" / "last.pt"
    load_model_state(model, load_checkpoint(ckpt), ckpt)
    return model.eval()


def latency(evs: list[Evidence], rows: list[str], batches: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """The finished rows of every evidence folder in ``evs`` (one teacher) and the teacher, each deployed in
    each of ``treatments_for(model)`` (the best is reported), timed round-robin in one interleaved group per
    batch (``compconv.bench``'s timing); each folder gets its ``latency.json`` (its rows and the teacher)."""
    from compconv.bench.suites import make_runner
    from compconv.bench.timing import hardware_info, interleaved_median, loadavg

    models = {"teacher": evs[0]._trained()}
    where: dict[str, tuple[Evidence, str]] = {}
    for ev in evs:
        for name in rows:
            if _finished(ev.out / name):
                key = name if len(evs) == 1 else f"{ev.out.name}/{name}"
                models[key], where[key] = trained_model(ev, name), (ev, name)
    size = evs[0].calib().image_size
    result: dict[str, Any] = {"hardware": hardware_info("cpu"), "threads": torch.get_num_threads(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_start": loadavg(),
                              "treatments": list(LATENCY_TREATMENTS), "hetconv_treatments": list(HETCONV_TREATMENTS),
                              "repeats": repeats, "timed_together": [str(ev.out) for ev in evs], "batches": {}}
    per_batch: dict[str, dict[str, Any]] = {}
    for b in batches:
        torch._dynamo.reset()
        x = torch.randn(b, 3, size, size)
        cands = {f"{n}/{t}": make_runner(m, t, x, num_classes=evs[0].args.num_classes)
                 for n, m in models.items() for t in treatments_for(m)}
        with torch._dynamo.config.patch(recompile_limit=max(64, 2 * len(cands))):
            res = interleaved_median(cands, repeats=repeats, warmup=1, min_time=0.05)
        per: dict[str, Any] = {}
        for n in models:
            ts = {t: res[f"{n}/{t}"].median for t in treatments_for(models[n])}
            ok = {t: v for t, v in ts.items() if v == v}
            best = min(ok, key=ok.__getitem__)
            per[n] = {"best": best, "best_ms": 1e3 * ok[best], "ms": {t: 1e3 * v for t, v in ts.items()}}
            _log(f"batch {b} {n:28s} best {best:26s} {1e3 * ok[best]:8.2f} ms")
        per_batch[str(b)] = per
    result["loadavg_end"] = loadavg()
    for ev in evs:
        mine = {"teacher"} | {k for k, (e, _) in where.items() if e is ev}
        own = {**result, "batches": {b: {("teacher" if k == "teacher" else where[k][1]): v for k, v in per.items()
                                         if k in mine} for b, per in per_batch.items()}}
        tmp = ev.out / "latency.json.tmp"
        tmp.write_text(json.dumps(own, indent=1, default=str))
        os.replace(tmp, ev.out / "latency.json")
    return result


def plot(out: Path, groups: list[tuple[str, list[dict[str, Any]]]], lat: dict[str, Any],
         teacher_dir: str | None) -> None:
    """``OUT/top1_vs_macs.png`` and, with latencies, ``OUT/top1_vs_latency.png`` (batch 1 and 32): the rows of
    each ``(folder name, rows)`` group (one marker per folder), and the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tres = Path(teacher_dir) / "results.json" if teacher_dir else None
    teacher = json.loads(tres.read_text()) if tres is not None and tres.exists() else None
    several = len(groups) > 1

    def scatter(ax: Any, xkey: str, xlabel: str, tx: float | None) -> None:
        for (label, rows), marker in zip(groups, "os^Dv", strict=False):
            for r in rows:
                if r.get(xkey) is None:
                    continue
                x = r[xkey] / 1e6 if xkey == "macs" else r[xkey]
                ax.scatter(x, r["top1"], s=30, marker=marker)
                text = f"{r['row']} [{label}]" if several else r["row"]
                ax.annotate(text, (x, r["top1"]), textcoords="offset points", xytext=(4, 3), fontsize=6)
        if teacher and tx is not None:
            ax.scatter(tx, teacher["top1"], marker="*", s=120, c="k")
            ax.annotate("teacher", (tx, teacher["top1"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("CIFAR-10 top-1 (%)")
        ax.grid(alpha=0.3)

    names = ", ".join(label for label, _ in groups)
    epochs = groups[0][1][0]["epochs"]
    fig, ax = plt.subplots(figsize=(7, 5) if several else (6, 4.5))
    scatter(ax, "macs", "MACs per image (M)", teacher["macs"] / 1e6 if teacher else None)
    ax.set_title(f"Top-1 vs MACs ({names}, every row {epochs} epochs or as named)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "top1_vs_macs.png", dpi=120)
    plt.close(fig)
    if lat:
        bs = sorted(lat["batches"], key=int)
        fig, axes = plt.subplots(1, len(bs), figsize=(7 * len(bs), 5), squeeze=False)
        for ax, b in zip(axes[0], bs, strict=True):
            t = lat["batches"][b].get("teacher")
            scatter(ax, f"latency_b{b}_ms", f"latency at batch {b} (ms, best deployed form)",
                    t["best_ms"] if t else None)
            ax.set_title(f"Top-1 vs latency, batch {b} ({lat['threads']} thread(s), {lat['hardware'].get('cpu')})",
                         fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "top1_vs_latency.png", dpi=120)
        plt.close(fig)


def _rows(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The finished rows of one evidence folder (with latencies, when timed) and its ``latency.json``."""
    rows = []
    lat = json.loads((out / "latency.json").read_text()) if (out / "latency.json").exists() else {}
    for name in ROWS:
        res = _finished(out / name)
        if not res:
            continue
        prov = json.loads((out / name / "provenance.json").read_text()) if (out / name / "provenance.json").exists() \
            else {}
        rows.append({"row": name, "top1": res["top1"], "params": res.get("params"), "macs": res.get("macs"),
                     "epochs": res.get("epochs"), "lr": res.get("config", {}).get("lr"),
                     "teacher": res.get("config", {}).get("teacher"), "start": prov.get("start"),
                     "distill_features": res.get("distill", {}).get("features"),
                     "dense": prov.get("dense"),
                     **{f"latency_b{b}_ms": per[name]["best_ms"] for b, per in lat.get("batches", {}).items()
                        if name in per},
                     **{f"latency_b{b}_best": per[name]["best"] for b, per in lat.get("batches", {}).items()
                        if name in per}})
    return rows, lat


def table(out: Path, teacher_dir: str | None = None, others: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """``OUT/summary.json`` and the printed table of ``out``'s rows; the plots (in ``out``) also show the rows
    of the ``others`` folders."""
    rows, lat = _rows(out)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1, default=str))
    os.replace(tmp, out / "summary.json")
    if rows:
        groups = [(out.name, rows)] + [(o.name, r) for o in others if (r := _rows(o)[0])]
        plot(out, groups, lat, teacher_dir)
    print("| row | top-1 | MACs | params | epochs | lr | start | latency b1 ms | latency b32 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat1, lat32 = r.get("latency_b1_ms"), r.get("latency_b32_ms")
        print(f"| {r['row']} | {r['top1']:.2f}% | {r['macs'] / 1e6:.2f}M | {r['params'] / 1e3:.1f}k | {r['epochs']} | "
              f"{r['lr']} | {r['start']} | {'-' if lat1 is None else f'{lat1:.2f}'} | "
              f"{'-' if lat32 is None else f'{lat32:.2f}'} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="docs/results/train_runs/r20-vanilla-cpu60-s0",
                   help="the trained teacher's run directory")
    p.add_argument("--model", default="cifar_resnet20", help="the teacher's zoo name")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--budget", type=float, default=0.5, help="share of the teacher's MACs")
    p.add_argument("--epochs", type=int, default=10, help="every row's training budget")
    p.add_argument("--long-epochs", type=int, default=30, help="the *_long rows' epochs")
    p.add_argument("--lr", type=float, default=0.01, help="the distillation rows' lr (scratch rows: preset's)")
    p.add_argument("--preset", default="cifar_cpu30")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--match-tolerance", type=float, default=0.03,
                   help="how close (relative MACs) the pruned and thinned rows must come to the compress_compconv "
                        "row's MACs; their channel granularity may not reach 3%% at deep budgets")
    p.add_argument("--threads", type=int)
    p.add_argument("--stop-after", type=int, help="stop each row after N epochs in this invocation")
    p.add_argument("--train-subset", type=int, help="smoke runs: train on this many images")
    p.add_argument("--eval-subset", type=int, help="smoke runs: evaluate on this many images")
    p.add_argument("--max-steps", type=int, help="smoke runs: stop each row after this many steps")
    p.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows to run, in order: {' '.join(ROWS)}")
    p.add_argument("--out", required=True, help="folder of the row run directories")
    p.add_argument("--table", action="store_true", help="only summarise the finished rows")
    p.add_argument("--latency", action="store_true",
                   help="time the finished rows' models and the teacher (deployed, best of "
                        f"{', '.join(LATENCY_TREATMENTS)}; models with HetConv also {', '.join(HETCONV_TREATMENTS)}) "
                        "at --latency-batches, interleaved; nothing else "
                        "may run on the machine meanwhile")
    p.add_argument("--with", dest="with_", nargs="+", default=[], metavar="OUT",
                   help="other evidence folders of the same teacher (e.g. another --budget): timed in the same "
                        "interleaved --latency run, and drawn in --out's plots")
    p.add_argument("--latency-batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--latency-repeats", type=int, default=5)
    args = p.parse_args(argv)
    # recorded in each row's commands.txt: rerunning it resumes every row (also when main() is called directly)
    from compconv.train.engine import invocation

    args.command = invocation([_script(), *(sys.argv[1:] if argv is None else argv)])
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        p.error(f"--rows: unknown {bad}; known: {', '.join(ROWS)}")
    others = tuple(Path(o) for o in args.with_)
    if args.table:
        table(Path(args.out), args.teacher, others)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    ev = Evidence(args)
    if args.latency:
        evs = [ev, *(Evidence(argparse.Namespace(**{**vars(args), "out": str(o)})) for o in others)]
        latency(evs, args.rows, tuple(args.latency_batches), args.latency_repeats)
        for e in evs:
            table(e.out, args.teacher, others if e is ev else ())
        return 0
    for name in args.rows:
        ev.run(name)
        table(Path(args.out), args.teacher, others)
    return 0


if __name__ == "__main__":
    sys.exit(main())
