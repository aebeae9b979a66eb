"""``compconv compare``: every compact conv on the same host models, at its paper setting and at matched MACs.

    compconv compare                                        # the 4 hosts, every method -> runs/compare/<date-time>
    compconv compare --quick --out /tmp/cmp                 # tiny hosts, 1 repeat: checks the pipeline

For each host (CIFAR VGG-16, ResNet-50 and ResNet-20 at 32x32, ImageNet ResNet-50 and MobileNetV2 at 224x224,
and with timm installed timm MobileNetV3-Large and EfficientNet-B0 at 224x224) and
each method of ``compconv.list_methods()`` it builds

* the **paper setting**: the method's own defaults (its paper's hyper-parameters; ``PAPER_OPTIONS``), applied
  the way its paper applies it (SlimConv through ``convert_blocks`` on residual hosts, XSepConv through
  ``convert_xsepconv``, the others through ``compconv.convert``);
* the **matched-MACs setting**: the value of the method's main hyper-parameter (``SWEEPS``) whose converted
  model's MACs come closest (in |log ratio|) to a common target, CompConv128's MACs on that host. The sweep
  counts on the meta device (shapes only), so it costs no memory. A method whose range cannot reach the
  target keeps its closest value and the row says how far off it is.

Beside them, the **dense alternatives at the same target MACs** (``--dense-baselines``, default both;
``compconv.bench.baselines``): the host uniformly width-scaled (``dense / width``) and the host pruned by
Torch-Pruning's magnitude pruning (``dense / prune``), each within 3% of CompConv128's MACs, timed in the same
interleaved rounds; every row's ``vs_dense`` gives the dense model's latency / its own (above 1: faster than
the dense model with the same MACs).

A method that converts no layer of a host (XSepConv on dense nets, HetConv on depthwise nets) is reported as
not applicable with the converter's reason. Params and MACs come from ``compconv.profile`` (MACs =
multiply-accumulates of conv + linear layers); CPU latency is measured in the same run with
``compconv.bench.timing`` (``--threads`` threads), after a warm-up, interleaved round-robin over
all models of a host so that background load hits each alike, and reported as the median over ``--repeats``
rounds at batch 1 and batch 32. ``--threads`` defaults to 1: on a small shared machine two spinning OpenMP
threads measure the neighbours' load (50-100x slower under load here), not the model. Results:
``compare.md``, ``compare.json`` and ``compare.png`` (MACs vs latency; ``--name`` changes the stem) in ``--out``
(default a new ``runs/compare/<date-time>``; written atomically). Methods that convert no layer of a host are
not plotted (the figure's footnote names them).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from compconv.bench.report import json_text
from compconv.convert import convert
from compconv.layers.base import get_method, list_methods
from compconv.layers.slimconv import SlimConv2d, _kind, convert_blocks, split_from_k
from compconv.layers.xsepconv import convert_xsepconv
from compconv.profile import profile
from compconv.serialization import build_base

__all__ = ["HOSTS", "PAPER_OPTIONS", "SWEEPS", "Host", "Result", "add_parser", "figure", "plot", "run_compare"]


@dataclass(frozen=True)
class Host:
    """A host model: zoo name, builder options, input ``(C, H, W)`` and a label."""

    label: str
    model: str
    input_chw: tuple[int, int, int]
    options: dict[str, Any] = field(default_factory=dict)


HOSTS: dict[str, Host] = {
    "cifar_vgg16": Host("CIFAR VGG-16 (32x32)", "cifar_vgg16", (3, 32, 32)),
    "cifar_resnet50": Host("CIFAR ResNet-50 (32x32)", "cifar_resnet50", (3, 32, 32)),
    "resnet50": Host("ImageNet ResNet-50 (224x224)", "resnet50", (3, 224, 224)),
    "mobilenet_v2": Host("MobileNetV2 (224x224)", "mobilenet_v2", (3, 224, 224)),
    "cifar_resnet20": Host("CIFAR ResNet-20 (32x32)", "cifar_resnet20", (3, 32, 32)),
}
if importlib.util.find_spec("timm") is not None:  # issue 17's depthwise-heavy hosts (the [timm] extra)
    HOSTS["mobilenetv3_large_100"] = Host("timm MobileNetV3-Large (224x224)", "timm:mobilenetv3_large_100",
                                          (3, 224, 224))
    HOSTS["efficientnet_b0"] = Host("timm EfficientNet-B0 (224x224)", "timm:efficientnet_b0", (3, 224, 224))
QUICK_HOSTS: dict[str, Host] = {
    "cifar_resnet20": Host("CIFAR ResNet-20 (32x32, quick)", "cifar_resnet20", (3, 32, 32)),
    "mobilenet_v2": Host("MobileNetV2 (32x32, quick)", "mobilenet_v2", (3, 32, 32)),
}

# The paper setting of each method: its class defaults unless listed ({host: options} or "*" for all hosts).
PAPER_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "compconv": {"*": {"c0": 128}},
    "slimconv": {"*": {"k": Fraction(4, 3)}, "mobilenet_v2": {"k": Fraction(8, 3), "min_hidden": 24}},
}
# The hyper-parameter each method sweeps to match MACs, and its candidate values.
SWEEPS: dict[str, tuple[str, list[Any]]] = {
    "compconv": ("c0", [32, 64, 128, 256, 512]),
    "hetconv": ("part", [2, 4, 8, 16, 32, 64]),
    "ghost": ("ratio", [2, 3, 4, 6, 8]),
    "xsepconv": ("k", [3, 5, 7]),
    "slimconv": ("split", [2, 3, 4, 6, 8]),
}
TARGET_METHOD, TARGET_OPTIONS = "compconv", {"c0": 128}


@dataclass
class Result:
    """One row: a host with one method at one setting (or the unconverted baseline)."""

    host: str
    method: str
    setting: str  # "baseline" | "paper" | "matched"
    options: dict[str, Any]
    applicable: bool = True
    converted: int = 0
    params: int | None = None
    macs: int | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # "b1", "b32" -> median ms per batch
    note: str = ""
    vs_dense: dict[str, float] = field(default_factory=dict)  # "width_b1" -> dense ms / this ms


def _opts_str(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"


def paper_options(method: str, host: str) -> dict[str, Any]:
    table = PAPER_OPTIONS.get(method, {})
    return dict(table.get(host, table.get("*", {})))


def apply_method(model: nn.Module, method: str, host: str,
                 opts: dict[str, Any]) -> tuple[nn.Module, int, str]:
    """Convert ``model`` in place the way ``method``'s paper does; ``(model, layers converted, note)``.

    A note that starts with "not applicable" says why nothing was converted.
    """
    if method == "slimconv":
        if any(_kind(m) for m in model.modules()):
            convert_blocks(model, **opts)
            n = sum(isinstance(m, SlimConv2d) for m in model.modules())
            return model, n, "convert_blocks (the paper's block integration)"
        model, report = convert(model, "slimconv", return_report=True, **opts)  # type: ignore[misc]
        note = "plain drop-in: SlimConv + 1x1 projection per conv (not a paper model)"
    elif method == "xsepconv":
        model, report = convert_xsepconv(model, return_report=True, **opts)  # type: ignore[misc]
        note = ""
    else:
        model, report = convert(model, method, return_report=True, **opts)  # type: ignore[misc]
        note = ""
    n = len(report.converted)
    if n == 0:
        reasons = Counter(r.reason for r in report.kept if not r.reason.startswith("stem"))
        why = reasons.most_common(1)[0][0] if reasons else "no eligible conv"
        return model, 0, f"not applicable: {why}"
    return model, n, note


def _build(host: Host, method: str | None, opts: dict[str, Any],
           device: str | None) -> tuple[nn.Module, int, str]:
    ctx = torch.device(device) if device else torch.device("cpu")
    with ctx:
        model = build_base(host.model, **host.options)  # a zoo name, "torchvision:NAME" or "timm:NAME"
    if method is None:
        return model, 0, ""
    return apply_method(model, method, host.model, opts)


def _count(host: Host, method: str | None, opts: dict[str, Any]) -> tuple[int, int, int, str]:
    """``(params, MACs, converted, note)`` counted on the meta device (falls back to CPU)."""
    size = (1, *host.input_chw)
    try:
        model, n, note = _build(host, method, opts, "meta")
        p = profile(model, size)
    except (NotImplementedError, RuntimeError):
        model, n, note = _build(host, method, opts, None)
        p = profile(model, size)
    return p.total_params, p.total_macs, n, note


def _matched(host: Host, method: str, target: int, quick: bool) -> tuple[dict[str, Any], str]:
    """The sweep value whose MACs are closest to ``target`` (in |log ratio|), and a note."""
    if method not in SWEEPS:
        return {}, "no sweep defined for this method"
    name, values = SWEEPS[method]
    base = paper_options(method, host.model)
    if method == "slimconv" and "k" in base:
        base["split"] = split_from_k(base.pop("k"))
    paper_value = base.get(name, _default(method, name))
    if quick:
        values = values[:2]
    if paper_value is not None:  # tried first: ties keep the paper's value
        values = [paper_value, *(v for v in values if v != paper_value)]
    best: tuple[float, dict[str, Any], int] | None = None
    for v in values:
        opts = {**base, name: v}
        try:
            _, macs, n, note = _count(host, method, opts)
        except (ValueError, TypeError):
            continue
        if n == 0:
            continue
        d = abs(math.log(macs / target))
        if best is None or d < best[0]:
            best = (d, opts, macs)
    if best is None:
        return {}, "no sweep value applies"
    off = best[2] / target - 1
    return best[1], f"{name} swept over {sorted(values)}; MACs {100 * off:+.1f}% vs the CompConv128 target"


def _default(method: str, name: str) -> Any:
    """The class default of hyper-parameter ``name`` (the paper's setting), None if it has none."""
    param = inspect.signature(get_method(method).__init__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _time_models(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int,
                 min_time: float) -> dict[str, float]:
    """Median ms per call of each model on ``x``: warm-up, calibrate, then interleaved rounds.

    Uses the project's own timer (``compconv.bench.timing``): ``torch.utils.benchmark`` would import
    ``cpp_extension``, whose CUDA probe prints noise on a CPU machine, for nothing this needs.
    """
    from compconv.bench.timing import interleaved_median

    def runner(m: nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return m(x)

        return call

    res = interleaved_median({k: runner(m) for k, m in models.items()}, repeats=repeats, warmup=warmup,
                             min_time=min_time)
    bad = {k: r.error for k, r in res.items() if r.error}
    if bad:
        raise RuntimeError(f"timing failed: {bad}")
    return {k: r.median * 1e3 for k, r in res.items()}


def run_compare(hosts: dict[str, Host], methods: list[str], batches: list[int], repeats: int, warmup: int,
                min_time: float, quick: bool = False, threads: int = 1,
                log: Callable[[str], None] = print,
                dense_baselines: Sequence[str] = ("width", "prune")) -> dict[str, Any]:
    """Build, count and time every (host, method, setting) and the dense alternatives at the target MACs
    (``dense_baselines``: ``"width"``, ``"prune"``; ``()`` for none); returns the JSON-ready result."""
    torch.manual_seed(0)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(hosts, methods, batches, repeats, warmup, min_time, quick, log, tuple(dense_baselines))
    finally:
        torch.set_num_threads(old_threads)


def _dense_rows(host: Host, target: int, kinds: tuple[str, ...],
                log: Callable[[str], None]) -> list[tuple[Result, nn.Module | None]]:
    """The dense alternatives at ``target`` MACs as rows (and models); one that cannot be built says why."""
    from compconv.bench.baselines import dense_baselines

    out: list[tuple[Result, nn.Module | None]] = []
    for k in kinds:
        try:
            ((model, rec),) = dense_baselines(host.model, target, (1, *host.input_chw), kinds=(k,),
                                              host_kwargs=dict(host.options)).values()
        except Exception as e:  # noqa: BLE001 - reported in the row; the rest of the host is still timed
            log(f"  dense {k}: not built ({type(e).__name__}: {e})")
            out.append((Result(host.label, "dense", k, {}, False, note=f"not built: {type(e).__name__}: {e}"), None))
            continue
        note = (f"{rec.method}: {rec.knob} {rec.value:.3f}; MACs {100 * rec.rel_error:+.1f}% vs the CompConv128 "
                f"target; {rec.note}")
        out.append((Result(host.label, "dense", k, {rec.knob: round(rec.value, 4)}, True, 0, rec.params, rec.macs,
                           note=note), model))
    return out


def _run(hosts: dict[str, Host], methods: list[str], batches: list[int], repeats: int, warmup: int,
         min_time: float, quick: bool, log: Callable[[str], None],
         dense: tuple[str, ...] = ()) -> dict[str, Any]:
    results: list[Result] = []
    for hkey, host in hosts.items():
        log(f"[{hkey}] counting")
        target = None
        if TARGET_METHOD in list_methods():
            target = _count(host, TARGET_METHOD, TARGET_OPTIONS)[1]
        rows: list[tuple[Result, str | None]] = []
        p, m, _, _ = _count(host, None, {})
        rows.append((Result(host.label, "-", "baseline", {}, True, 0, p, m), None))
        for method in methods:
            settings = [("paper", paper_options(method, hkey), "")]
            for setting, opts, extra in settings:
                r = Result(host.label, method, setting, opts)
                try:
                    r.params, r.macs, r.converted, note = _count(host, method, opts)
                except (ValueError, TypeError) as e:
                    r.applicable, r.note = False, f"not applicable: {e}"
                    rows.append((r, None))
                    continue
                r.note = "; ".join(s for s in (note, extra) if s)
                r.applicable = not note.startswith("not applicable")
                if setting == "matched" and not opts:
                    r.applicable = False
                rows.append((r, method if r.applicable else None))
                if setting == "paper" and target is not None:
                    if r.applicable:
                        settings.append(("matched", *_matched(host, method, target, quick)))
                    else:  # nothing to sweep on this host
                        rows.append((Result(host.label, method, "matched", {}, False, note=r.note), None))
        dense_models: dict[int, nn.Module] = {}
        if target is not None and dense:
            log(f"[{hkey}] dense alternatives at {target / 1e6:.1f}M MACs")
            for r, model in _dense_rows(host, target, dense, log):
                if model is not None:
                    dense_models[len(rows)] = model
                rows.append((r, None))
        # latency: build the real models, interleave them per batch size
        models: dict[str, nn.Module] = {}
        same: dict[str, str] = {}
        seen: dict[str, str] = {}
        for i, (r, method) in enumerate(rows):
            if not r.applicable:
                continue
            # same method and the same counts = the same model under two spellings (k=4/3 vs split=2)
            key = f"{r.method}|{r.params}|{r.macs}|{r.converted}"
            if key in seen:  # matched == paper: time once
                same[str(i)] = seen[key]
                continue
            seen[key] = str(i)
            model = dense_models[i] if i in dense_models else _build(host, method, r.options, None)[0]
            models[str(i)] = model.eval()
        for b in batches:
            log(f"[{hkey}] timing batch {b} ({len(models)} models x {repeats} rounds)")
            x = torch.randn(b, *host.input_chw)
            ms = _time_models(models, x, repeats, warmup, min_time)
            for i, (r, _) in enumerate(rows):
                k = same.get(str(i), str(i))
                if k in ms:
                    r.latency_ms[f"b{b}"] = ms[k]
            for r, _ in rows:
                for d, _ in rows:
                    if d.method == "dense" and f"b{b}" in d.latency_ms and f"b{b}" in r.latency_ms:
                        r.vs_dense[f"{d.setting}_b{b}"] = d.latency_ms[f"b{b}"] / r.latency_ms[f"b{b}"]
        del models
        results += [r for r, _ in rows]
    return {
        "units": "params: all parameters; MACs: multiply-accumulates of conv + linear layers per image; "
                 "latency: median ms per forward of one batch (CPU, float32, inference_mode)",
        "hosts": {k: asdict(h) for k, h in hosts.items()},
        "methods": methods,
        "dense_baselines": list(dense),
        "batches": batches,
        "repeats": repeats,
        "warmup": warmup,
        "min_time": min_time,
        "quick": quick,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "loadavg": _loadavg(),
        "target": f"{TARGET_METHOD} {TARGET_OPTIONS} MACs per host",
        "results": [asdict(r) for r in results],
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def to_markdown(data: dict[str, Any]) -> str:
    """The comparison as Markdown tables, one per host."""
    batches = data["batches"]
    lines = [
        "# compconv compare",
        "",
        f"CPU: {data['cpu']} ({data['threads']} threads), torch {data['torch']}; load average at the end "
        f"{data['loadavg']}. Params in M; MACs in M per image (multiply-accumulates of conv + linear "
        "layers); "
        f"latency = median ms per forward of one batch over {data['repeats']} interleaved rounds after "
        f"{data['warmup']} warm-up calls. Matched = the method's hyper-parameter whose MACs come closest to "
        "CompConv128's on that host. Dense width / prune = the host width-scaled / pruned by Torch-Pruning to "
        "CompConv128's MACs (within 3%); vs dense = that dense model's latency / this row's (above 1: faster).",
        "",
    ]
    if data.get("measured_on"):
        lines[1:1] = ["", f"_Measured on: {data['measured_on']}_"]
    by_host: dict[str, list[dict[str, Any]]] = {}
    for r in data["results"]:
        by_host.setdefault(r["host"], []).append(r)
    kinds = [k for k in ("width", "prune") if any(r["method"] == "dense" and r["setting"] == k
                                                   for r in data["results"])]
    head = ["method", "setting", "options", "layers", "params (M)", "MACs (M)", "MACs vs base"]
    head += [f"b{b} ms" for b in batches] + [f"b{b} speed-up" for b in batches]
    head += [f"b{b} vs dense {k}" for k in kinds for b in batches] + ["note"]
    for host, rows in by_host.items():
        base = rows[0]
        lines += [f"## {host}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            if not r["applicable"]:
                cells = [r["method"], r["setting"], _opts_str(r["options"]), "-", "-", "-", "-"]
                cells += ["-"] * ((2 + len(kinds)) * len(batches)) + [r["note"]]
            else:
                cells = [r["method"], r["setting"], _opts_str(r["options"]), str(r["converted"]),
                         f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e6:.1f}",
                         f"{r['macs'] / base['macs']:.2f}x"]
                for b in batches:
                    v = r["latency_ms"].get(f"b{b}")
                    cells.append("-" if v is None else f"{v:.2f}")
                for b in batches:
                    v, v0 = r["latency_ms"].get(f"b{b}"), base["latency_ms"].get(f"b{b}")
                    cells.append("-" if v is None or v0 is None else f"{v0 / v:.2f}x")
                for k in kinds:
                    for b in batches:
                        v = r.get("vs_dense", {}).get(f"{k}_b{b}")
                        cells.append("-" if v is None else f"{v:.2f}x")
                cells.append(r["note"])
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(data: dict[str, Any]) -> Any:
    """The MACs-vs-latency figure (a matplotlib ``Figure``): one panel per host and batch size.

    One marker per method and setting, named in one legend below the panels (no labels on the points, so
    none can stack). Rows that are not results (the method converted no layer of the host) are left out and
    named in a footnote.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = list(dict.fromkeys(r["host"] for r in data["results"]))
    batches = data["batches"]
    fig, axes = plt.subplots(len(batches), len(hosts), figsize=(4.4 * len(hosts), 3.6 * len(batches)),
                             squeeze=False)
    methods = ["-", *data["methods"], "dense"]
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for j, host in enumerate(hosts):
        for i, b in enumerate(batches):
            ax = axes[i][j]
            for r in data["results"]:
                v = r["latency_ms"].get(f"b{b}")
                # nothing converted: the vanilla model again (the dense alternatives convert nothing by design)
                not_a_result = r["method"] not in ("-", "dense") and not r.get("converted")
                if r["host"] != host or not r["applicable"] or not_a_result or v is None:
                    continue
                label = "baseline" if r["method"] == "-" else f"{r['method']} ({r['setting']})"
                marker = {"baseline": "*", "paper": "o", "matched": "s", "width": "v", "prune": "D"}[r["setting"]]
                ax.scatter(r["macs"] / 1e6, v, color=colors[r["method"]], marker=marker, s=60, label=label)
            ax.set_title(f"{_short(host)}, batch {b}", fontsize=9)
            ax.set_xlabel("MACs per image (M)", fontsize=8)
            ax.set_ylabel("latency (ms / batch)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}
    for ax in axes.flat:  # every method, from whichever panel has it
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    skipped = sorted({f"{r['method']} on {_short(r['host'])}" for r in data["results"]
                      if r["method"] != "-" and r["setting"] == "paper" and not r["applicable"]})
    ncol = min(5, max(1, len(legend)))
    rows = math.ceil(len(legend) / ncol)
    bottom = 0.05 * rows / len(batches) + (0.05 if skipped else 0.02)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=8,
               bbox_to_anchor=(0.5, 0.04 if skipped else 0.0))
    if skipped:  # not results: nothing was converted, so there is nothing to plot for them
        fig.text(0.5, 0.005, "not plotted (no layer converted): " + "; ".join(skipped), ha="center",
                 va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def _short(host: str) -> str:
    """A host label without its parenthesised input size (the titles must fit their panels)."""
    return host.split(" (")[0]


def plot(data: dict[str, Any], path: str) -> None:
    """``figure(data)`` saved to ``path`` (PNG, written atomically)."""
    import matplotlib.pyplot as plt

    fig = figure(data)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        _readable(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def _readable(path: str) -> None:
    """Give a temporary file (created 0600) the mode a plain ``open`` would have (0666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as f:
        f.write(text)
    _readable(f.name)
    os.replace(f.name, path)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="every method on the same hosts: params, MACs, CPU latency",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="output folder (default: a new runs/compare/<date-time>; never docs/ unless named)")
    p.add_argument("--name", default="compare",
                   help="file stem: writes NAME.md, NAME.json, NAME.png (default compare)")
    p.add_argument("--note", default=None,
                   help="a sentence on the conditions of the run (machine, load), kept in the JSON as "
                        "measured_on and printed at the top of the Markdown")
    p.add_argument("--hosts", nargs="+", default=None, help=f"host keys (default: {list(HOSTS)})")
    p.add_argument("--methods", nargs="+", default=None, help="methods (default: every registered one)")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default: 1 32)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per model and batch size")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per timing sample (calls repeated)")
    p.add_argument("--quick", action="store_true",
                   help="tiny hosts (ResNet-20, MobileNetV2 at 32x32), batches 1 2, 1 round: pipeline check")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads while timing (default 1: robust on a shared machine)")
    p.add_argument("--no-plot", action="store_true", help="skip the matplotlib plot")
    p.add_argument("--dense-baselines", nargs="*", choices=("width", "prune"), default=["width", "prune"],
                   help="dense alternatives at CompConv128's MACs timed beside the methods: width = the host "
                        "width-scaled, prune = Torch-Pruning magnitude pruning (compconv[prune]); the flag "
                        "alone = none")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    known = list_methods()
    methods = args.methods or known
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; methods must be among {known}")
    pool = QUICK_HOSTS if args.quick else HOSTS
    # --quick: the quick (32x32) version of a host that has one; otherwise always the real host
    all_hosts = {**HOSTS, **QUICK_HOSTS} if args.quick else HOSTS
    if args.hosts:
        unknown = [h for h in args.hosts if h not in all_hosts]
        if unknown:
            raise ValueError(f"unknown host(s) {unknown}; hosts must be among {list(all_hosts)}")
        pool = {h: all_hosts[h] for h in args.hosts}
    batches = args.batches or ([1, 2] if args.quick else [1, 32])
    if min(batches) < 1:
        raise ValueError(f"argument --batches: every batch must be an integer >= 1, but got {batches}")
    if args.repeats < 1:
        raise ValueError(f"argument --repeats: must be an integer >= 1, but got {args.repeats}")
    if args.warmup < 0:
        raise ValueError(f"argument --warmup: must be an integer >= 0, but got {args.warmup}")
    if not 0 <= args.min_time < math.inf:
        raise ValueError(f"argument --min-time: must be a number of seconds >= 0, but got {args.min_time}")
    repeats = 1 if args.quick else args.repeats
    min_time = 0.0 if args.quick else args.min_time
    if args.threads < 1:
        raise ValueError(f"argument --threads: must be an integer >= 1, but got {args.threads}")
    name = getattr(args, "name", "compare") or ""
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"--name must be a plain file stem like compare_cpu, but got {name!r}")
    from compconv.bench.cli import run_dir

    out = run_dir(os.path.join("runs", "compare"), args.out)
    data = run_compare(pool, methods, batches, repeats, args.warmup, min_time, quick=args.quick,
                       threads=args.threads, dense_baselines=getattr(args, "dense_baselines", ("width", "prune")))
    if getattr(args, "note", None):
        data["measured_on"] = args.note
    os.makedirs(out, exist_ok=True)
    md = to_markdown(data)
    paths = [os.path.join(out, f"{name}.{ext}") for ext in ("json", "md", "png")]
    _write_atomic(paths[0], json_text(data, indent=2))
    _write_atomic(paths[1], md)
    if not args.no_plot:
        plot(data, paths[2])
    print(md)
    print(f"written: {', '.join(paths if not args.no_plot else paths[:2])}")
    return 0
