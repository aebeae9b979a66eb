"""``compconv bench``: per-layer and whole-model speed of every method against fair vanilla baselines.

    compconv bench --quick                       # seconds: a tiny end-to-end run (used by the tests)
    compconv bench --suite models --models Comp-VGG16 Comp128-ResNet50 --repeats 5
    compconv bench --device cuda                 # bf16, channels_last, batch 256 (see --help)
    compconv bench --suite models --dense-baselines   # no dense alternatives (default: width prune)

Every model case is timed beside its dense alternatives at the converted model's MACs (within 3%): the host
uniformly width-scaled and the host pruned by Torch-Pruning (``compconv.bench.baselines``); every row says
its latency relative to them (``vs_dense_width``, ``vs_dense_prune``), eager and compiled separately.

Writes JSON, a Markdown report and a MACs-vs-latency plot into ``--out-dir`` (default: a new
``runs/bench/<date-time>``; the committed results under ``docs/`` change only when ``--json``, ``--md`` and
``--plot`` name them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

__all__ = ["add_parser", "build_arg_parser", "check_args", "run_bench"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=("all", "models", "layers"), default="all")
    p.add_argument(
        "--quick", action="store_true", help="tiny models/shapes, 1 repeat: checks the pipeline only"
    )
    p.add_argument(
        "--methods", nargs="+", default=None, help="methods to run (default: every registered one)"
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="model labels to run, e.g. Comp-VGG16 Comp128-ResNet50 (default: all)",
    )
    p.add_argument(
        "--batches", nargs="+", type=int, default=None,
        help="inference batches, integers >= 0 (CPU: 1 32; CUDA: 256; 0 = no inference rows)",
    )
    p.add_argument("--train-batch", type=int, default=None,
                   help="training-step batch, >= 0 (0 = none; default 32, CUDA 256)")
    p.add_argument(
        "--treatments",
        nargs="+",
        default=None,
        help="inference treatments: eager deploy deploy_cl deploy_compile deploy_cl_compile, or "
        "deploy followed by any of, in this order: _dense1x1 / _lowrank1x1 / _auto1x1 (1x1 CompConv forms), "
        "_densehet / _autohet (HetConv forms), _cl, _compile "
        "(default: the first five on CPU; eager deploy_cl deploy_cl_compile on CUDA)",
    )
    p.add_argument(
        "--train-treatments", nargs="+", default=None,
        help="training treatments among train_eager train_cl train_compile (default: all on CPU; train_cl "
        "train_compile on CUDA)"
    )
    p.add_argument(
        "--width-multiples",
        nargs="*",
        type=int,
        default=[8, 16],
        help="also run CompConv with these width_multiple values (hardware-aware widths)",
    )
    p.add_argument(
        "--dense-baselines",
        nargs="*",
        choices=("width", "prune"),
        default=["width", "prune"],
        help="dense alternatives at the converted model's MACs timed beside each model case: width = the host "
        "uniformly width-scaled, prune = Torch-Pruning magnitude pruning (needs compconv[prune]); none = "
        "give the flag with no value",
    )
    p.add_argument(
        "--hardware-aware",
        action="store_true",
        help="also time each model case converted with convert(..., hardware_aware=True) (kind converted_hw): "
        "is it ever slower than its vanilla source? Its layers (each dense conv against its compact form as "
        "convert returns it, not deployed) are timed at each inference batch's input size on --device in "
        "--dtype, in NCHW for the NCHW treatments and in channels_last for the _cl ones, and the whole model "
        "against its source as the treatment runs it (deployed, compiled), reverting layers while it is "
        "slower: one conversion per (batch, treatment). Model suite only (not --suite layers)",
    )
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds, >= 1 (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per configuration, >= 0")
    p.add_argument(
        "--min-time", type=float, default=0.05, help="seconds per measurement, >= 0 (calls are repeated)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads, >= 1 (default: torch's, i.e. all cores); 1 is far more stable on a "
        "machine shared with other busy processes",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="default float32 (CPU), bfloat16 (CUDA)"
    )
    p.add_argument("--size", type=int, default=None, help="override every model's input size (pixels, >= 1)")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in --json (a saved row is replaced only by a row this run timed for the "
        "same model, mode and batch, or the same layer)",
    )
    p.add_argument(
        "--out-dir",
        default=None,
        help="folder for bench_speed.json / .md / .png (default: a new runs/bench/<date-time>; never docs/)",
    )
    p.add_argument("--json", default=None, help="results JSON (default OUT_DIR/bench_speed.json; '' = none)")
    p.add_argument("--md", default=None, help="Markdown report (default OUT_DIR/bench_speed.md; '' = none)")
    p.add_argument("--plot", default=None, help="MACs-vs-latency plot (default OUT_DIR/bench_speed.png; '' = none)")


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_arguments(p)
    return p


def add_parser(subparsers: Any) -> None:
    """Register ``compconv bench``."""
    p = subparsers.add_parser(
        "bench",
        help="speed: MAC ratio vs latency ratio, per layer and whole model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=run_bench)


def run_dir(parent: str, out_dir: str | None = None) -> str:
    """``out_dir``, or a new ``<parent>/<date-time>`` (suffixed ``-2``, ``-3``... if taken); not created here."""
    if out_dir:
        return out_dir
    base = os.path.join(parent, time.strftime("%Y%m%d-%H%M%S"))
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def output_paths(args: argparse.Namespace) -> dict[str, str]:
    """``{"json", "md", "plot"}`` paths: as given (``""`` = not written), else ``bench_speed.*`` in the run dir."""
    given = {k: getattr(args, k, None) for k in ("json", "md", "plot")}
    if all(v is not None for v in given.values()):
        return {k: str(v) for k, v in given.items()}
    if getattr(args, "append", False) and not given["json"]:
        raise ValueError("--append extends the results in --json FILE: name that file")
    d = run_dir(os.path.join("runs", "bench"), getattr(args, "out_dir", None))
    names = {"json": "bench_speed.json", "md": "bench_speed.md", "plot": "bench_speed.png"}
    return {k: str(v) if v is not None else os.path.join(d, names[k]) for k, v in given.items()}


def _int_at_least(flag: str, value: Any, least: int, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"argument {flag}: must be an integer >= {least}{meaning}, but got {value!r}")


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments before anything is built or timed: ``ValueError`` in argparse's words
    ("argument --FLAG: ...", naming the allowed values; ``compconv bench`` exits 2 with it)."""
    from compconv.bench.suites import INFER_TREATMENTS_TEXT, TRAIN_TREATMENTS, is_infer_treatment

    get = args.__dict__.get
    for t in get("treatments") or ():
        if not is_infer_treatment(t):
            raise ValueError(f"argument --treatments: invalid choice: {t!r} (choose from {INFER_TREATMENTS_TEXT})")
    for t in get("train_treatments") or ():
        if t not in TRAIN_TREATMENTS:
            raise ValueError(f"argument --train-treatments: invalid choice: {t!r} (choose from "
                             f"{', '.join(TRAIN_TREATMENTS)})")
    if get("threads") is not None:
        _int_at_least("--threads", args.threads, 1)
    if get("size") is not None:
        _int_at_least("--size", args.size, 1, " (the input height and width in pixels)")
    for b in get("batches") or ():
        _int_at_least("--batches", b, 0, " (0 = no inference rows)")
    if get("train_batch") is not None:
        _int_at_least("--train-batch", args.train_batch, 0, " (0 = no training rows)")
    if get("batches") is not None and not any(args.batches):
        if get("train_batch") == 0:
            raise ValueError("argument --batches: --batches 0 with --train-batch 0 leaves nothing to time")
        if get("suite") == "layers":  # the layer suite times inference batches only
            raise ValueError("argument --batches: --batches 0 with --suite layers leaves nothing to time")
    _int_at_least("--repeats", get("repeats", 5), 1)
    _int_at_least("--warmup", get("warmup", 2), 0)
    for w in get("width_multiples") or ():
        _int_at_least("--width-multiples", w, 1)
    min_time = get("min_time", 0.05)
    if isinstance(min_time, bool) or not isinstance(min_time, int | float) or not 0 <= min_time < float("inf"):
        raise ValueError(f"argument --min-time: must be a number of seconds >= 0, but got {min_time!r}")
    device = get("device", "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"argument --device: invalid device {device!r} (use cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"argument --device: {device!r} was given but torch.cuda.is_available() is False")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"argument --device: the bench runs on cpu or cuda[:N], but got {device!r}")
    if get("hardware_aware") and get("suite", "all") == "layers":
        raise ValueError("argument --hardware-aware: it converts the model cases, so it needs --suite all or "
                         "--suite models, not --suite layers")


def run_bench(args: argparse.Namespace) -> int:
    """Run the suites as ``args`` say and write the JSON / Markdown / plot (see ``output_paths``).

    Bad arguments are refused first (:func:`check_args`), before any output path is chosen or model built.
    """
    check_args(args)
    paths = output_paths(args)
    args.json, args.md, args.plot = paths["json"], paths["md"], paths["plot"]
    threads = torch.get_num_threads()
    try:
        return _run_bench(args)
    finally:  # --threads must not leak into the caller's process (tests call main() in-process)
        torch.set_num_threads(threads)


def _run_bench(args: argparse.Namespace) -> int:
    from compconv.bench import report
    from compconv.bench.suites import (
        INFER_TREATMENTS,
        TRAIN_TREATMENTS,
        LayerCase,
        ModelCase,
        default_layer_cases,
        default_model_cases,
        run_layer_suite,
        run_model_suite,
    )
    from compconv.bench.timing import gemm_ceiling, hardware_info, loadavg
    from compconv.layers.base import list_methods

    if args.threads:  # checked by check_args, as every argument
        torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    methods = args.methods or list_methods()
    for m in methods:
        if m not in list_methods():
            raise ValueError(f"--methods: unknown method {m!r}; known: {list_methods()}")
    treatments = tuple(
        args.treatments or (("eager", "deploy_cl", "deploy_cl_compile") if cuda else INFER_TREATMENTS)
    )
    train_treatments = tuple(
        args.train_treatments or (("train_cl", "train_compile") if cuda else TRAIN_TREATMENTS)
    )
    batches = tuple(b for b in (args.batches or ((256,) if cuda else (1, 32))) if b > 0)  # 0: none
    train_batch = args.train_batch if args.train_batch is not None else (256 if cuda else 32)
    width_multiples = tuple(args.width_multiples or ())
    repeats, warmup, min_time = args.repeats, args.warmup, args.min_time
    dense = tuple(getattr(args, "dense_baselines", ("width", "prune")) or ())

    if args.quick:
        # A few seconds: a CIFAR ResNet-20 at 16x16 per method, two small layers, no compile.
        model_cases = [
            ModelCase(f"{m}-ResNet20", "cifar_resnet20", m, {"c0": 16} if m == "compconv" else {}, 16, 10)
            for m in methods
        ]
        if "compconv" in methods:
            model_cases += [
                ModelCase(
                    f"Comp-ResNet20-w{w}",
                    "cifar_resnet20",
                    "compconv",
                    {"c0": 16, "width_multiple": w},
                    16,
                    10,
                )
                for w in width_multiples
            ]
        layer_cases = [LayerCase(64, 64, 8, 3, 1, 2), LayerCase(256, 256, 4, 1, 2, 1)]
        batches, train_batch = (2,), 2
        treatments = tuple(t for t in treatments if "compile" not in t) or ("eager",)
        train_treatments = tuple(t for t in train_treatments if "compile" not in t)
        repeats, warmup, min_time = 1, 1, 0.0
    else:
        model_cases = default_model_cases(methods)
        if "compconv" in methods:
            model_cases += [
                ModelCase(f"Comp128-ResNet50-w{w}", "resnet50", "compconv", {"c0": 128, "width_multiple": w})
                for w in width_multiples
            ]
            model_cases += [
                ModelCase(
                    f"Comp-VGG16-w{w}", "cifar_vgg16", "compconv", {"c0": 128, "width_multiple": w}, 32, 10
                )
                for w in width_multiples
            ]
        layer_cases = default_layer_cases(batches if not cuda else (1, 32))
    if args.models:
        known = [c.label for c in model_cases]
        for name in args.models:
            if name not in known:
                raise ValueError(f"--models: unknown label {name!r}; known: {known}")
        model_cases = [c for c in model_cases if c.label in args.models]

    result: dict[str, Any] = {
        "hardware": hardware_info(args.device),
        "dtype": str(dtype).replace("torch.", ""),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": loadavg(),
        "settings": {
            "repeats": repeats,
            "warmup": warmup,
            "min_time": min_time,
            "batches": list(batches),
            "train_batch": train_batch,
            "treatments": list(treatments),
            "train_treatments": list(train_treatments),
            "quick": args.quick,
            "dense_baselines": list(dense),
            "hardware_aware": bool(getattr(args, "hardware_aware", False)),
        },
        "model_rows": [],
        "layer_rows": [],
    }
    # --append: the rows already in --json stay unless this run timed new rows for the same (model, mode,
    # batch) or layer; a run that times nothing (or whose timings fail) therefore never removes a saved row.
    previous: dict[str, list[dict[str, Any]]] = {"model_rows": [], "layer_rows": []}
    fresh: dict[str, list[dict[str, Any]]] = {"model_rows": [], "layer_rows": []}
    if args.append and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        previous = {k: list(old.get(k) or []) for k in previous}
        result["previous_runs"] = old.get("previous_runs", []) + [
            {k: old.get(k) for k in ("started", "loadavg_start", "loadavg_end", "wall_s", "settings")}
        ]

    def merged() -> None:
        timed = [r for r in fresh["model_rows"] if "mode" in r and report.is_finite(r.get("latency_s"))]
        new_models = {r.get("model") for r in timed}
        new_keys = {(r.get("model"), r.get("mode"), r.get("batch")) for r in timed}

        def replaced(r: dict[str, Any]) -> bool:  # an error row (no mode) goes once its model has new rows
            if "mode" in r:
                return (r.get("model"), r.get("mode"), r.get("batch")) in new_keys
            return r.get("model") in new_models

        new_layers = {r.get("layer") for r in fresh["layer_rows"] if report.is_finite(r.get("latency_s"))}
        result["model_rows"] = [r for r in previous["model_rows"] if not replaced(r)] + fresh["model_rows"]
        result["layer_rows"] = [r for r in previous["layer_rows"] if r.get("layer") not in new_layers] + fresh[
            "layer_rows"]

    merged()
    t0 = time.time()
    result["gemm_n"] = 512 if args.quick else 2048
    result["gemm_ceiling_gmacs"] = gemm_ceiling(
        args.device, dtype, n=result["gemm_n"], repeats=1 if args.quick else 5
    )
    print(
        f"GEMM ceiling: {result['gemm_ceiling_gmacs']:.1f} GMAC/s; load {result['loadavg_start']}", flush=True
    )

    def save() -> None:
        merged()
        result["wall_s"] = time.time() - t0
        result["loadavg_end"] = loadavg()
        result["headline"] = report.headline(result["model_rows"])
        if args.json:
            report.write_json(args.json, result)
        if args.md:
            report.write_text(args.md, report.markdown(result))
        if args.plot:
            try:
                report.plot(result, args.plot)
            except ImportError as e:  # matplotlib is a dependency, but a stripped install must still bench
                print(f"no plot: {e}")

    def log(s: str) -> None:
        print(s, flush=True)

    if args.suite in ("all", "models"):
        for case in model_cases:  # one case at a time, saving after each, so a long run is readable early
            fresh["model_rows"] += run_model_suite(
                [case],
                batches=batches,
                train_batch=train_batch,
                treatments=treatments,
                train_treatments=train_treatments,
                repeats=repeats,
                warmup=warmup,
                min_time=min_time,
                size_override=args.size,
                device=args.device,
                dtype=dtype,
                ceiling_gmacs=result["gemm_ceiling_gmacs"],
                dense_baselines=dense,
                hardware_aware=bool(getattr(args, "hardware_aware", False)),
                log=log,
            )
            save()
    if args.suite in ("all", "layers"):
        for case in layer_cases:
            fresh["layer_rows"] += run_layer_suite(
                [case],
                methods,
                treatments=tuple(t for t in treatments if "compile" not in t),
                width_multiples=width_multiples,
                repeats=repeats,
                warmup=warmup,
                min_time=min_time,
                device=args.device,
                dtype=dtype,
                ceiling_gmacs=result["gemm_ceiling_gmacs"],
                log=log,
            )
            save()
    # The ceiling again at the end (the load drifts): keep both, use the higher one for the "% ceiling".
    end = gemm_ceiling(args.device, dtype, n=result["gemm_n"], repeats=1 if args.quick else 3)
    result["gemm_ceiling_gmacs_start_end"] = [result["gemm_ceiling_gmacs"], end]
    if end > result["gemm_ceiling_gmacs"]:
        result["gemm_ceiling_gmacs"] = end
        for r in fresh["model_rows"] + fresh["layer_rows"]:  # this run's rows (saved ones had their own ceiling)
            if r.get("gmacs_per_s") == r.get("gmacs_per_s") and r.get("gmacs_per_s") is not None:
                r["ceiling_share"] = r["gmacs_per_s"] / end
    save()
    written = [p for p in (args.json, args.md, args.plot) if p]
    if written:
        print(f"written: {', '.join(written)}")
    for h in result["headline"]:
        met = "" if h["met"] is None else (" target met" if h["met"] else f" target {h['target']} NOT met")
        vs = "".join(f"; vs dense {k} x{h[f'vs_dense_{k}']:.2f}" for k in ("width", "prune")
                     if h.get(f"vs_dense_{k}") is not None)
        print(
            f"{h['model']:24s} {h['mode']} b{h['batch']} {h['regime']}: {h['best_converted']} vs "
            f"{h['best_vanilla']} speed x{h['speedup']:.2f} of MAC x{h['mac_ratio']:.2f} = share "
            f"{h['real_share']:.2f}{met}{vs}"
        )
    return 0
