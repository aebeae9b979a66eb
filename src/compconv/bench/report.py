"""Turn benchmark rows into the headline, Markdown tables, JSON and the MACs-vs-latency plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["TARGETS", "figure", "headline", "json_safe", "json_text", "markdown", "plot", "write_json", "write_text"]

# Issue 8's targets on the 2-core CPU: share of the MAC ratio reached by best converted vs best vanilla.
TARGETS = {("infer", 32): 0.8, ("infer", 1): 0.6, ("train", 32): 0.6}
TARGET_MODELS = ("Comp-VGG16", "Comp128-ResNet50")
# Issue 17's target: at inference (batch 1 and 32, eager and compiled), the best converted latency within
# DENSE_TARGET x the faster dense alternative at equal MACs (width-scaled or Torch-Pruning), for these hosts.
DENSE_TARGET = 1.15
DENSE_TARGET_MODELS = ("Comp-VGG16", "Comp128-ResNet50", "Comp128-ResNet20")


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and v == v and v not in (float("inf"), float("-inf"))


is_finite = _finite  # a finite number (not None, NaN or an infinity): a measured time


def headline(
    rows: Sequence[dict[str, Any]], targets: dict[tuple[str, int], float] | None = None
) -> list[dict]:
    """Best vanilla vs best converted per (model, mode, batch, regime): speed-up, MAC ratio, share, target, and
    the best converted against the best of each dense alternative at equal MACs (``vs_dense_width``,
    ``vs_dense_prune``: dense latency / converted latency, above 1 = the converted model is faster).

    The regimes are reported separately: ``eager`` (treatments without ``torch.compile``) and ``compiled``.
    """
    targets = TARGETS if targets is None else targets
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "mode" in r and _finite(r.get("latency_s")):
            reg = "compiled" if "compile" in r["treatment"] else "eager"
            groups.setdefault((r["model"], r["mode"], r["batch"], reg), []).append(r)
    out = []
    for (model, mode, batch, reg), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                                                                 kv[0][3] != "eager")):
        van = [r for r in rs if r["kind"] == "vanilla"]
        conv = [r for r in rs if r["kind"] == "converted"]
        if not van or not conv:
            continue
        bv = min(van, key=lambda r: r["latency_s"])
        bc = min(conv, key=lambda r: r["latency_s"])
        speed = bv["latency_s"] / bc["latency_s"]
        # The targets are for Comp-VGG16 and Comp128-ResNet50, also with hardware-aware widths (-w8, -w16).
        target = targets.get((mode, batch)) if model.split("-w")[0] in TARGET_MODELS else None
        share = speed / bc["mac_ratio"]
        dense: dict[str, Any] = {}
        for kind in ("dense_width", "dense_prune"):
            ds = [r for r in rs if r["kind"] == kind]
            bd = min(ds, key=lambda r: r["latency_s"]) if ds else None
            dense[f"best_{kind}"] = bd["treatment"] if bd else None
            dense[f"best_{kind}_ms"] = 1e3 * bd["latency_s"] if bd else None
            dense[f"{kind}_macs"] = bd["macs"] if bd else None
            dense[f"vs_{kind}"] = bd["latency_s"] / bc["latency_s"] if bd else None
        ds_all = [r for r in rs if r["kind"] in ("dense_width", "dense_prune")]
        vs_best = min(r["latency_s"] for r in ds_all) / bc["latency_s"] if ds_all else None
        dense_target = DENSE_TARGET if mode == "infer" and model.split("-w")[0] in DENSE_TARGET_MODELS else None
        dense["vs_dense_best"] = vs_best
        dense["dense_target"] = dense_target
        dense["dense_met"] = None if dense_target is None or vs_best is None else vs_best >= 1 / dense_target
        hw = [r for r in rs if r["kind"] == "converted_hw"]
        bh = min(hw, key=lambda r: r["latency_s"]) if hw else None
        dense["best_hw"] = bh["treatment"] if bh else None
        dense["best_hw_ms"] = 1e3 * bh["latency_s"] if bh else None
        dense["hw_mac_ratio"] = bh["mac_ratio"] if bh else None
        dense["hw_kept"] = len(bh.get("hw_kept", [])) if bh else None
        dense["hw_speedup"] = bv["latency_s"] / bh["latency_s"] if bh else None
        out.append(
            {
                "model": model,
                "method": bc["method"],
                "mode": mode,
                "batch": batch,
                "regime": reg,
                "best_vanilla": bv["treatment"],
                "best_vanilla_ms": 1e3 * bv["latency_s"],
                "best_converted": bc["treatment"],
                "best_converted_ms": 1e3 * bc["latency_s"],
                "mac_ratio": bc["mac_ratio"],
                "speedup": speed,
                "real_share": share,
                "target": target,
                "met": None if target is None else share >= target,
                "loadavg": bc.get("loadavg_before"),
                **dense,
            }
        )
    return out


def _ms(seconds: Any) -> Any:
    """Seconds as ms; a failed time (NaN in memory, ``null`` in a JSON read back) stays missing."""
    return None if seconds is None else 1e3 * seconds


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if v == v else "nan"
    return str(v)


def markdown(result: dict[str, Any]) -> str:
    """The whole report: hardware, load, ceiling, headline, model rows, layer rows."""
    hw = result.get("hardware", {})
    gpu = f", {hw['gpu']}" if hw.get("gpu") else ""
    lines = [
        "# Speed benchmark (generated by `compconv bench`)",
        "",
        f"Hardware: {hw.get('cpu')} ({hw.get('cores')} cores, torch {hw.get('torch')}, "
        f"{hw.get('torch_threads')} threads, device `{hw.get('device')}`{gpu}); "
        f"dtype {result.get('dtype')}; started {result.get('started')}, "
        f"took {_fmt(result.get('wall_s'), 0)} s.",
        f"Load average (1/5/15 min) at start {result.get('loadavg_start')}, "
        f"at end {result.get('loadavg_end')}: "
        "the machine is shared, so absolute times are noisy; each group of rows was timed interleaved "
        "(round-robin, median of repeats), which keeps the ratios within a group fair.",
        f"Large-GEMM ceiling: {_fmt(result.get('gemm_ceiling_gmacs'), 1)} GMAC/s "
        f"({result.get('gemm_n')}^3 fp32 matmul).",
        "",
        "Columns: MACx = MAC ratio (vanilla / this); speedx = best vanilla latency / this latency; "
        "share = speedx / MACx (the part of the theoretical speed-up that is real); "
        "GMAC/s = achieved (training counts 3x the forward MACs); vs dense width / prune = the best latency of "
        "that dense alternative at equal MACs (same regime: eager or compiled) / this latency, above 1 = "
        "faster than the dense model with the same MACs.",
        "",
    ]
    heads = result.get("headline", [])
    if heads:
        lines += [
            "## Headline: best converted vs best vanilla and vs the dense alternatives at equal MACs",
            "",
            "| model | setting | regime | best vanilla | ms | best converted | ms | MACx | speedx | share | target "
            "| met | dense width ms | vs dense width | dense prune ms | vs dense prune | vs faster dense "
            f"| within {DENSE_TARGET}x of dense | hardware_aware ms | its MACx | kept dense | hw speedx |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for h in heads:
            lines.append(
                f"| {h['model']} | {h['mode']} b{h['batch']} | {h.get('regime', '-')} | {h['best_vanilla']} | "
                f"{_fmt(h['best_vanilla_ms'], 1)} | "
                f"{h['best_converted']} | {_fmt(h['best_converted_ms'], 1)} | {_fmt(h['mac_ratio'])} | "
                f"{_fmt(h['speedup'])} | {_fmt(h['real_share'])} | {_fmt(h['target'])} | "
                f"{'-' if h['met'] is None else ('yes' if h['met'] else 'no')} | "
                f"{_fmt(h.get('best_dense_width_ms'), 1)} | {_fmt(h.get('vs_dense_width'))} | "
                f"{_fmt(h.get('best_dense_prune_ms'), 1)} | {_fmt(h.get('vs_dense_prune'))} | "
                f"{_fmt(h.get('vs_dense_best'))} | "
                f"{'-' if h.get('dense_met') is None else ('yes' if h['dense_met'] else 'no')} | "
                f"{_fmt(h.get('best_hw_ms'), 1)} | {_fmt(h.get('hw_mac_ratio'))} | {_fmt(h.get('hw_kept'))} | "
                f"{_fmt(h.get('hw_speedup'))} |"
            )
        lines.append("")
    mrows = [r for r in result.get("model_rows", []) if "mode" in r]
    if mrows:
        lines += [
            "## Whole models",
            "",
            "| model | setting | kind | treatment | GMACs/img | ms | MACx | speedx | vs same treatment "
            "| share | vs dense width | vs dense prune | GMAC/s | % ceiling | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mrows:
            lines.append(
                f"| {r['model']} | {r['mode']} b{r['batch']} | {r['kind']} | {r['treatment']} | "
                f"{r['macs'] / 1e9:.3f} | {_fmt(_ms(r['latency_s']), 1)} | {_fmt(r['mac_ratio'])} | "
                f"{_fmt(r['latency_ratio'])} | {_fmt(r['latency_ratio_same_treatment'])} | "
                f"{_fmt(r['real_share'])} | {_fmt(r.get('vs_dense_width'))} | {_fmt(r.get('vs_dense_prune'))} | "
                f"{_fmt(r['gmacs_per_s'], 1)} | "
                f"{_fmt(100 * r['ceiling_share'] if r.get('ceiling_share') else None, 0)} "
                f"| {_fmt((r.get('loadavg_before') or [None])[0], 1)} |"
            )
        lines.append("")
    dense = {(r["model"], r["kind"]): r["dense"] for r in mrows if r.get("dense")}
    if dense:
        lines += [
            "## Dense alternatives at equal MACs (`compconv.bench.baselines`)",
            "",
            "| model | kind | method | knob | value | GMACs/img | target | error | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for (model, kind), d in dense.items():
            lines.append(
                f"| {model} | {kind} | {d['method']} | {d['knob']} | {d['value']:.3f} | {d['macs'] / 1e9:.3f} | "
                f"{d['target_macs'] / 1e9:.3f} | {100 * d['rel_error']:+.1f}% | {d['note']} |"
            )
        lines.append("")
    bad = [r for r in result.get("model_rows", []) if r.get("error")]
    for r in bad:
        lines.append(f"- {r.get('model')} {r.get('treatment', '')}: {r['error']}")
    lrows = result.get("layer_rows", [])
    if lrows:
        lines += [
            "## Per layer (each method vs the nn.Conv2d it replaces; best treatment of each)",
            "",
            "| layer | method | treatment | MACx | ms | speedx | share | GMAC/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        best: dict[tuple[str, str], dict[str, Any]] = {}
        for r in lrows:
            if not _finite(r.get("latency_s")):
                continue
            key = (r["layer"], r["method"])
            if key not in best or r["latency_s"] < best[key]["latency_s"]:
                best[key] = r
        for r in best.values():
            lines.append(
                f"| {r['layer']} | {r['method']} | {r['treatment']} | {_fmt(r['mac_ratio'])} | "
                f"{_fmt(1e3 * r['latency_s'], 3)} | {_fmt(r['latency_ratio'])} | {_fmt(r['real_share'])} | "
                f"{_fmt(r['gmacs_per_s'], 1)} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (a failed time's NaN, an infinite ratio) replaced by ``None``, so
    it is standard JSON (``null``); dicts, lists and tuples are walked, other values kept as they are."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int = 1) -> str:
    """``obj`` as standard JSON text: non-finite floats as ``null`` (:func:`json_safe`), other non-JSON
    values as their ``str``; never ``NaN`` or ``Infinity``."""
    return json.dumps(json_safe(obj), indent=indent, default=str, allow_nan=False)


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON write (tmp + rename), standard JSON (:func:`json_text`: NaN and infinities as ``null``)."""
    text = json_text(obj)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _not_results(result: dict[str, Any]) -> list[str]:
    """Labels of the models whose method converted no layer (timed or not, they are no result)."""
    return sorted({r["model"] for r in result.get("model_rows", []) if r.get("converted_layers") == 0
                   and r.get("kind", "converted") == "converted"})


def figure(result: dict[str, Any]) -> Any:
    """MACs vs latency (a matplotlib ``Figure``), one column per setting; None when there is nothing to plot.

    Top row: GMACs per image against the best latency of each model (log-log). Bottom row: the same
    relative to the vanilla model of the same interleaved group (MACs / vanilla MACs against latency /
    best vanilla latency), which cancels the drift of the machine's load between groups; on the diagonal
    the whole MAC saving is real, above it only part of it. Each model has its own colour and marker, named
    once in the legend below the panels (no labels on the points, so none can stack). Models whose method
    converted no layer are left out and named in a footnote.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skipped = _not_results(result)
    rows = [r for r in result.get("model_rows", []) if "mode" in r and _finite(r.get("latency_s"))
            and r["model"] not in skipped]
    settings = sorted({(r["mode"], r["batch"]) for r in rows})
    if not settings:
        return None
    fig, axes = plt.subplots(2, len(settings), figsize=(5 * len(settings), 8.6), squeeze=False)
    # One style per plotted series: each converted model, and each vanilla base (its groups share a style).
    series = sorted({r["model"] for r in rows if r["kind"] == "converted"})
    series += sorted({f"vanilla {r['base']}" for r in rows if r["kind"] == "vanilla"})
    cmap = plt.get_cmap("tab20")
    markers = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
    style = {name: dict(color=cmap(i % 20), marker=markers[i % len(markers)]) for i, name in enumerate(series)}
    for name in series:
        if name.startswith("vanilla "):  # a star for every vanilla model, as on the relative panel
            style[name]["marker"] = "*"
    for col, (mode, batch) in enumerate(settings):
        ax, rel = axes[0][col], axes[1][col]
        here = [r for r in rows if (r["mode"], r["batch"]) == (mode, batch)]
        top = 1.2  # the relative panel grows to show converted models slower than vanilla (y > 1)
        for model in sorted({r["model"] for r in here}):
            group = [r for r in here if r["model"] == model]
            van = [r for r in group if r["kind"] == "vanilla"]
            for kind in ("vanilla", "converted"):
                rs = [r for r in group if r["kind"] == kind]
                if not rs:
                    continue
                b = min(rs, key=lambda r: r["latency_s"])
                name = b["model"] if kind == "converted" else f"vanilla {b['base']}"
                ax.scatter(b["macs"] / 1e9, 1e3 * b["latency_s"], s=45, label=name, **style[name])
                if kind == "converted" and van:
                    bv = min(van, key=lambda r: r["latency_s"])
                    x, y = b["macs"] / bv["macs"], b["latency_s"] / bv["latency_s"]
                    rel.scatter(x, y, s=45, label=name, **style[name])
                    top = max(top, 1.1 * y)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel("best latency (ms)")
        ax.set_title(f"{mode}, batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        rel.plot([0, 1.2], [0, 1.2], color="grey", lw=0.8, ls="--")
        rel.axhline(1.0, color="grey", lw=0.6, ls=":")  # above it: slower than the best vanilla
        rel.scatter([1], [1], color="0.35", marker="*", s=80, label="vanilla (reference)")
        rel.set_xlim(0, 1.1)
        rel.set_ylim(0, top)
        rel.set_xlabel("MACs / vanilla MACs")
        rel.set_ylabel("latency / best vanilla latency (same group)", fontsize=9)
        rel.grid(True, alpha=0.3)
    legend: dict[str, Any] = {}
    for a in axes.flat:
        for h, lab in zip(*a.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    ncol = min(5, max(1, len(legend)))
    nrows = math.ceil(len(legend) / ncol)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=8,
               bbox_to_anchor=(0.5, 0.03 if skipped else 0.0))
    if skipped:
        fig.text(0.5, 0.005, "not plotted (their method converted no layer): " + ", ".join(skipped),
                 ha="center", va="bottom", fontsize=7)
    fig.suptitle(
        f"MACs vs latency ({result.get('hardware', {}).get('cpu')}, load {result.get('loadavg_start')})",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.028 * nrows + (0.04 if skipped else 0.015), 1, 1))
    return fig


def plot(result: dict[str, Any], path: str) -> None:
    """``figure(result)`` saved to ``path`` (PNG, written atomically); nothing when there is nothing to plot."""
    import matplotlib.pyplot as plt

    fig = figure(result)
    if fig is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
