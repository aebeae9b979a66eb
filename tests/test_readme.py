"""The README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci = [ln for ln in lines if ln and not ln.startswith(("#", "set ", "cd "))]
    assert len(ci) == 1
    assert ci[0] in (ROOT / "README.md").read_text(), "the README must show the exact command .ci/run runs"


README = (ROOT / "README.md").read_text()
RUNS = ROOT / "docs" / "results" / "train_runs"


def _table(first_cell_prefix: str, text: str = README) -> list[list[str]]:
    """Rows (cells) of the table in ``text`` (the README) whose header row starts with ``first_cell_prefix``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_cell_prefix}"))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def test_commands_after_the_quick_start_say_to_activate_the_venv() -> None:
    quick, rest = README.split("## In a few lines", 1)
    assert "source .venv/bin/activate" in quick and "compconv: command not found" in quick
    assert "compconv " in rest  # the bare commands that need it


def test_training_table_is_what_the_results_command_prints() -> None:
    from compconv.train.results import markdown_table

    # The README prints the command beside the table; run it on the same committed run directories.
    assert "python -m compconv.train.results docs/results/train_runs/r*-s0" in README
    dirs = sorted(RUNS.glob("r*-s0"))
    printed = {c[0]: c for c in ([x.strip() for x in ln.strip("|").split("|")]
                                 for ln in markdown_table(dirs).splitlines()[2:])}
    rows = _table("run (")
    assert len(rows) == len(dirs) == len(printed)
    for cells in rows:
        name = cells[0].split("`")[1]
        got = printed[name]
        top1, params, macs, ips, epochs = cells[1:6]
        assert top1.strip("*%") == got[1]
        assert params.split()[0] == got[3]
        assert macs.split()[0] == f"{int(got[4].replace(',', '')) / 1e6:.1f}M"
        assert ips == got[5].split(" / ")[1]  # the median epoch's images/s
        done = got[7].split("/")[0]  # "7/30 (running)": a run still training says how far it is
        assert epochs == (done if "running" not in got[7] else got[7].replace("/", " of ", 1)), name


def test_like_for_like_training_speeds_are_what_the_script_prints() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_train_speed", ROOT / "benchmarks" / "train_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    got = [round(mod.median_speed(RUNS / run, a, b)[0]) for run, a, b in (
        ("r20-vanilla-cpu30-s0", 17, 30), ("r20-comp128-cpu30-s0", 19, 30), ("r20-comp16-cpu30-s0", 12, 30))]
    text = " ".join(README.split())
    ratios = [f"{v / got[0]:.2f}x" for v in got[1:]]
    assert f"they train at {got[0]}, {got[1]} ({ratios[0]}) and {got[2]} ({ratios[1]}) img/s" in text
    assert "r20-vanilla-cpu30-s0:17-30" in text and "r20-comp16-cpu30-s0:12-30" in text


def test_compare_figures_are_in_the_committed_json() -> None:
    import json

    data = json.loads((ROOT / "docs" / "results" / "compare_cpu.json").read_text())
    assert "--out docs/results --name compare_cpu" in README
    hosts = {"CIFAR VGG-16": "CIFAR VGG-16 (32x32)", "ImageNet ResNet-50": "ImageNet ResNet-50 (224x224)",
             "MobileNetV2": "MobileNetV2 (224x224)"}
    for cells in _table("host | CompConv128"):
        host = hosts[cells[0].split(" (")[0]]
        rows = [r for r in data["results"] if r["host"] == host]
        base = rows[0]
        ok = {f"{r['macs'] / base['macs']:.2f}" for r in rows if r["applicable"]}
        ok |= {f"{base['latency_ms']['b32'] / r['latency_ms']['b32']:.2f}" for r in rows if r["latency_ms"]}
        figures = re.findall(r"(\d+\.\d\d)x", " ".join(cells))
        assert figures and set(figures) <= ok, (host, set(figures) - ok)


def test_bench_figures_are_in_the_committed_json() -> None:
    import json

    data = json.loads((ROOT / "docs" / "results" / "bench_speed_v4.json").read_text())
    head = {(h["model"], h["mode"], h["batch"]): h for h in data["headline"]}
    assert "--json docs/results/bench_speed_v4.json --md docs/bench_speed_v4.md --plot docs/bench_speed_v4.png" in (
        README)
    names = {"Comp-VGG16 (CIFAR)": "Comp-VGG16", "Comp128-ResNet50 (224)": "Comp128-ResNet50",
             "Comp512-ResNet50 (224)": "Comp512-ResNet50", "Ghost-VGG16": "ghost-VGG16",
             "SlimConv-VGG16": "slimconv-VGG16", "HetConv-VGG16": "hetconv-VGG16",
             "XSepConv-MobileNetV3-small": "xsepconv-MobileNetV3S"}
    rows = _table("model | MAC ratio")
    assert {c[0] for c in rows} == set(names)
    for cells in rows:
        model = names[cells[0]]
        assert cells[1] == f"{head[(model, 'infer', 1)]['mac_ratio']:.2f}x"
        for cell, key in zip(cells[2:5], (("infer", 1), ("infer", 32), ("train", 32)), strict=True):
            assert re.search(r"\d+\.\d\d", cell).group() == f"{head[(model, *key)]['real_share']:.2f}", (model, key)


@pytest.mark.slow
def test_the_python_example_runs_and_its_override_changes_the_model() -> None:
    block = README.split("## In a few lines", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)  # the example as printed
    assert tuple(ns["y"].shape) == (8, 256, 28, 28)
    # The same convert call without its `overrides=` line: the override must change the model.
    call = block[block.index("model, report = compconv.convert("):block.index("return_report=True)") + 19]
    assert "overrides=" in call
    without = "\n".join(ln for ln in call.splitlines() if "overrides=" not in ln)
    loc = {"torchvision": ns["torchvision"], "compconv": ns["compconv"], "model": ns["torchvision"].models.resnet50()}
    exec(without, loc)
    prof = ns["compconv"].profile
    assert str(loc["report"]) != str(ns["report"])
    assert prof(loc["model"], (1, 3, 224, 224)).total_macs != prof(ns["model"], (1, 3, 224, 224)).total_macs


def test_dense_alternative_figures_are_in_the_committed_json() -> None:
    import json

    data = json.loads((ROOT / "docs" / "results" / "bench_dense_targets.json").read_text())
    head = {(h["model"], h["batch"], h["regime"]): h for h in data["headline"] if h["mode"] == "infer"}
    names = {"Comp-VGG16 (CIFAR)": "Comp-VGG16", "Comp128-ResNet20 (CIFAR)": "Comp128-ResNet20",
             "Comp128-ResNet50 (224)": "Comp128-ResNet50"}
    rows = _table("host | inference b1, eager")
    assert {c[0] for c in rows} == set(names)
    for cells in rows:
        for cell, key in zip(cells[1:5], ((1, "eager"), (1, "compiled"), (32, "eager"), (32, "compiled")),
                             strict=True):
            h = head[(names[cells[0]], *key)]
            assert re.search(r"\d+\.\d\d", cell).group() == f"{1 / h['vs_dense_best']:.2f}", (cells[0], key)
            assert ("met" in cell) == bool(h["dense_met"]), (cells[0], key)
    hw = json.loads((ROOT / "docs" / "results" / "bench_hardware_aware.json").read_text())["headline"]
    assert len({h["model"] for h in hw}) == 6
    for h in hw:  # the README's claim: never slower than vanilla beyond noise; 0.998 is vanilla against itself
        assert h["hw_speedup"] >= (0.99 if h["hw_mac_ratio"] == 1.0 else 1.0), h


def _latency_cell(folder, row: str) -> str:  # noqa: ANN001
    """``"b1 / b32"`` ms, the best deployed form of ``row`` in ``folder/latency.json``."""
    import json

    lat = json.loads((folder / "latency.json").read_text())["batches"]
    return f"{lat['1'][row]['best_ms']:.2f} / {lat['32'][row]['best_ms']:.2f}"


def _assert_run_row(cells: list[str], res: dict, epochs: int) -> None:
    """A results-table row's top-1, MACs and params cells are the finished run's ``results.json``."""
    assert res["finished"] and res["epochs"] == epochs, cells[0]
    assert cells[1].strip("*") == f"{res['top1']:.2f}%"
    assert cells[2] == f"{res['macs'] / 1e6:.2f}M" and cells[3] == f"{res['params'] / 1e3:.1f}k"


def test_compress_evidence_figures_are_the_runs_results() -> None:
    import json

    runs = ROOT / "docs" / "results" / "compress" / "r20-b050"
    rows = {c[0]: c for c in _table("ResNet-20 at 0.5x MACs, 10 epochs")}
    for prefix, run in (("`compconv.compress(..., \"compconv\"", "compress_compconv"),
                        ("Torch-Pruning one call (L1", "tp_magnitude"),
                        ("ResNet-20 uniformly thinned to the same MACs", "thin"), ("CompConv by Eq. 6", "eq6_warm"),
                        ("the `compress` architecture re-initialised", "random_distill"),
                        ("Torch-Pruning one call (group-norm", "tp_group_norm"),
                        ("the `compress` architecture trained from scratch", "scratch"),
                        ("`compconv.compress(..., \"ghost\"", "compress_ghost"),
                        ("`compconv.compress(..., \"hetconv\"", "compress_hetconv"),
                        ("`compconv.compress(..., \"slimconv\"", "compress_slimconv"),
                        ("the same, trained from scratch for 30 epochs", "scratch_long"),
                        ("ResNet-20 uniformly thinned, from scratch for 30 epochs", "thin_long")):
        (cells,) = [c for k, c in rows.items() if k.startswith(prefix)]
        res = json.loads((runs / run / "results.json").read_text())
        _assert_run_row(cells, res, 30 if run.endswith("_long") else 10)
        assert cells[4] == _latency_cell(runs, run)
    (teacher,) = [c for k, c in rows.items() if k.startswith("the teacher")]
    assert teacher[4] == _latency_cell(runs, "teacher")
    deeper = {c[0]: c for c in _table("ResNet-20 at 0.3x MACs, 10 epochs")}
    assert len(deeper) == 4  # the teacher and the three rows
    for prefix, run in (("`compconv.compress(..., \"compconv\", 0.3)", "compress_compconv"),
                        ("Torch-Pruning one call (L1", "tp_magnitude"),
                        ("Torch-Pruning one call (group-norm", "tp_group_norm")):
        (cells,) = [c for k, c in deeper.items() if k.startswith(prefix)]
        res = json.loads((runs.parent / "r20-b030" / run / "results.json").read_text())
        _assert_run_row(cells, res, 10)
        assert cells[4] == _latency_cell(runs.parent / "r20-b030", run)


def test_resnet56_compress_figures_are_the_runs_results() -> None:
    """Every row of the ResNet-56 table is a finished run's ``results.json`` (rows are added as they finish)."""
    import json

    runs = ROOT / "docs" / "results" / "compress" / "r56-b050"
    table = _table("ResNet-56 at 0.5x MACs, 10 epochs")
    prefixes = {"the teacher": ROOT / "docs" / "results" / "train_runs" / "r56-vanilla-cpu60-s0",
                "`compconv.compress(..., \"compconv\"": runs / "compress_compconv",
                "`compconv.compress(..., \"hetconv\"": runs / "compress_hetconv",
                "Torch-Pruning one call (L1": runs / "tp_magnitude",
                "Torch-Pruning one call (group-norm": runs / "tp_group_norm",
                "the `compress` architecture trained from scratch": runs / "scratch",
                "ResNet-56 uniformly thinned to the same MACs": runs / "thin",
                "CompConv by Eq. 6": runs / "eq6_warm",
                "the `compress` architecture re-initialised": runs / "random_distill",
                "`compconv.compress(..., \"ghost\"": runs / "compress_ghost",
                "`compconv.compress(..., \"slimconv\"": runs / "compress_slimconv",
                "the same, trained from scratch for 30 epochs": runs / "scratch_long",
                "ResNet-56 uniformly thinned, from scratch for 30 epochs": runs / "thin_long"}
    assert len(table) >= 4
    timed = json.loads((runs / "latency.json").read_text())["batches"]["1"]
    for cells in table:
        (run,) = [r for k, r in prefixes.items() if cells[0].startswith(k)]
        res = json.loads((run / "results.json").read_text())
        teacher = "train_runs" in str(run)
        _assert_run_row(cells, res, 60 if teacher else 30 if run.name.endswith("_long") else 10)
        name = "teacher" if teacher else run.name
        # rows finished after the latency run show "-" until the next one times them
        assert cells[4] == (_latency_cell(runs, name) if name in timed else "-"), cells[0]


def test_binarized_table_6_figures_are_in_the_committed_tables_json() -> None:
    import json

    rows = {r["row"]: r for r in json.loads((ROOT / "docs" / "results" / "tables.json").read_text())
            if r["paper"] == "CompConv" and r["table"] == "6"}
    (line,) = [ln for ln in README.splitlines() if ln.startswith("| 6 | Bin-VGG16")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    names = ["Bin-VGG16", "Bin-Ghost-VGG16 (s=2)", "Bin-Comp-VGG16 (C0=128)"]
    assert cells[3] == " / ".join(f"{rows[n]['ours_params']:.2f}" for n in names)
    assert cells[5] == " / ".join(f"{rows[n]['ours_macs']:.1f}" for n in names)
    assert cells[2] == " / ".join(f"{rows[n]['paper_params']:g}" for n in names)
    assert all(rows[n]["status"] == "gap" for n in names) and cells[6].startswith("gap")


def test_compiled_hardware_aware_range_is_the_committed_runs() -> None:
    import json

    rows = json.loads((ROOT / "docs" / "results" / "bench_hardware_aware_compiled.json").read_text())["model_rows"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"]), {})[r["kind"]] = r["latency_s"]
    hw = [g["vanilla"] / g["converted_hw"] for g in groups.values()]
    depthwise = [g["vanilla"] / g["converted"] for (m, _), g in groups.items()
                 if m in ("Comp128-MobileNetV2", "Comp128-MobileNetV3L", "Comp128-EfficientNetB0")]
    assert len(hw) == 12
    assert f"`torch.compile`: {min(hw):.2f}-{max(hw):.2f}x" in README
    assert f"runs at {min(depthwise):.2f}-{max(depthwise):.2f}x" in README


def _late_jump(top1: list[float]) -> float:
    """The largest change of test top-1 from one epoch to the next over epochs 21-30 (binarize.md's noise)."""
    return max(abs(top1[i] - top1[i - 1]) for i in range(20, 30))


def test_binarized_runs_table_is_the_runs_results() -> None:
    """docs/binarize.md's evidence table: every cell is its run's (and its full-precision partner's) results.json."""
    import json

    text = (ROOT / "docs" / "binarize.md").read_text()
    rows = _table("model | run (`docs/results/train_runs/`)", text)
    assert rows
    words = " ".join(text.split())
    for label, run, _epochs, _top1, partner, *_ in rows:  # the prose quotes every finished run beside its partner
        b = json.loads((RUNS / run.strip("`") / "results.json").read_text())
        fp_file = RUNS / partner.split("`")[1] / "results.json"
        if b["finished"]:
            assert (f"{label} ends at {b['top1']:.2f}% after 30 epochs (best {b['best_top1']:.2f}% at epoch "
                    f"{b['best_epoch']})") in words, label
        if label == "Bin-Ghost-ResNet20" and b["finished"]:  # beside Bin-Comp, the same network reordered
            c = json.loads((RUNS / "r20-comp128-bin-cpu30-s0" / "results.json").read_text())
            d = b["top1"] - c["top1"]
            assert (f"Against Bin-Comp-ResNet20 (C0=128) ({c['top1']:.2f}%), the same layer structure (in another "
                    f"channel order and initialisation, above), at equal FLOPs "
                    f"({b['combined_macs_bops64'] / 1e6:.2f}M) and storage ({b['storage_mb']:.3f} MB), "
                    f"it is {abs(d):.2f} points {'higher' if d > 0 else 'lower'}") in words
            dt = c["history"][-1]["train_acc"] - b["history"][-1]["train_acc"]
            assert (f"its last epoch's training accuracy was {b['history'][-1]['train_acc']:.2f}% (Bin-Comp: "
                    f"{c['history'][-1]['train_acc']:.2f}%)") in words and f"is {dt:.2f} points lower too" in words
            jump = _late_jump([h["test_top1"] for h in b["history"]])
            assert f"Over epochs 21-30 its test top-1 moved by up to {jump:.2f} points" in words
        if b["finished"] and fp_file.is_file():
            f = json.loads(fp_file.read_text())
            assert (f"{label} ends at {b['top1']:.2f}% after 30 epochs (best {b['best_top1']:.2f}% at epoch "
                    f"{b['best_epoch']}), {f['top1'] - b['top1']:.1f} points below its full-precision run "
                    f"({f['top1']:.2f}%)") in words, label
            assert (f"{f['macs'] / b['combined_macs_bops64']:.0f}x fewer FLOPs under the BOPs/64 convention "
                    f"({b['combined_macs_bops64'] / 1e6:.2f}M against {f['macs'] / 1e6:.2f}M MACs)") in words, label
    van = json.loads((RUNS / "r20-vanilla-bin-cpu30-s0" / "results.json").read_text())
    fvan = json.loads((RUNS / "r20-vanilla-cpu30-s0" / "results.json").read_text())
    assert (f"training accuracy (augmented batches) was {van['history'][-1]['train_acc']:.2f}%, against "
            f"{fvan['history'][-1]['train_acc']:.2f}%") in words
    for _label, run, epochs, top1, partner, bops, macs, combined, storage in rows:
        r = json.loads((RUNS / run.strip("`") / "results.json").read_text())
        assert r["binarize"] is True and r["config"]["binarize"] is True, run
        assert r["epochs"] == 30 and r["config"]["seed"] == 0 and r["preset"] == "cifar_cpu30", run
        assert epochs == (str(r["epochs_done"]) if r["finished"] else f"{r['epochs_done']} of 30 (running)")
        assert top1 == f"{r['top1']:.2f}%"
        assert (bops, macs, combined) == (f"{r['bops'] / 1e6:.2f}M", f"{r['macs'] / 1e6:.2f}M",
                                          f"{r['combined_macs_bops64'] / 1e6:.2f}M")
        assert storage == f"{r['storage_mb']:.3f} MB"
        fp_run = partner.split("`")[1]
        fp_file = RUNS / fp_run / "results.json"
        if fp_file.is_file():
            f = json.loads(fp_file.read_text())
            assert "binarize" not in f and f["config"]["model"] == r["config"]["model"], fp_run
            assert (f["method"], f["method_options"]) == (r["method"], r["method_options"]), fp_run
            assert partner == (f"{f['top1']:.2f}% (`{fp_run}`: {f['macs'] / 1e6:.2f}M MACs, "
                               f"{f['params'] * 4 / 1e6:.2f} MB)")
        else:
            assert partner == f"- (`{fp_run}` not finished yet)"


def test_bn_reparametrisation_table_is_the_committed_json() -> None:
    import json

    doc = (ROOT / "docs" / "compress.md").read_text()
    data = json.loads((ROOT / "docs" / "results" / "compress" / "r20-b050" / "bn_reparametrize.json").read_text())
    section = doc[doc.index("### BN re-parametrisation"):doc.index("### The report")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in section.splitlines() if line.startswith("| `")}
    assert len(rows) == len(data["rows"]) == 5
    for r in data["rows"]:
        s, a = r["saved"], r["reparametrized"]
        want = [f"{v:.2f}%" for v in (s["eval"], s["train_mode"], s["after_8_updates"], a["eval"], a["train_mode"],
                                      a["after_8_updates"])]
        assert rows[f"`{Path(r['file']).name}`"] == want
        assert a["eval"] == s["eval"]  # re-parametrising keeps the eval-mode outputs
    assert f"{data['test_images']} class-mixed test images" in " ".join(section.split())
    by = {Path(r["file"]).name: r for r in data["rows"]}
    for name in ("compconv_search.pt", "ghost_search.pt"):  # the prose's figures
        r = by[name]
        assert f"{r['saved']['eval']:.1f}% -> {r['saved']['train_mode']:.1f}%" in " ".join(section.split())
        assert f"{r['reparametrized']['train_mode']:.1f}%" in section


def test_bn_reparametrisation_short_fine_tune_table_is_the_committed_runs() -> None:
    import csv
    import json

    doc = (ROOT / "docs" / "compress.md").read_text()
    section = doc[doc.index("**It does not rescue a short fine-tune.**"):doc.index("### The report")]
    runs = ROOT / "docs" / "results" / "compress" / "r20-bn-short"
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in section.splitlines()
            if line.startswith(("| as saved", "| re-parametrised"))]
    names = ["plain-bn-lr0.01", "plain-frozen-lr5e-4", "rep-bn-lr0.01", "rep-frozen-lr5e-4"]
    assert len(rows) == len(names)
    for cells, name in zip(rows, names, strict=True):
        res = json.loads((runs / name / "results.json").read_text())
        last = list(csv.DictReader((runs / name / "metrics.csv").open()))[-1]
        assert res["finished"] and res["n_eval"] == 2000
        assert cells[0] == ("re-parametrised" if name.startswith("rep") else "as saved")
        assert cells[2] == name.split("lr")[-1] and cells[1].startswith("frozen" if "frozen" in name else "training")
        assert cells[3:] == [f"{res['top1']:.2f}%", f"{float(last['train_acc']):.2f}%"]
        cmd = (runs / name / "commands.txt").read_text()
        assert "--max-steps 16" in cmd and "--batch-size 64" in cmd
        assert ("--freeze-bn-stats" in cmd) == ("frozen" in name)
        assert ("rep.pt" in cmd) == name.startswith("rep")
    start = json.loads((runs / "start_plain.json").read_text())
    assert f"{start['top1']:.2f}% on 2000 test images before training" in " ".join(section.split())


def test_binarized_comp128_and_ghost_resnet20_are_one_network_up_to_channel_order() -> None:
    """docs/binarize.md: at ResNet-20's widths CompConv C0=128 is depth 1, the Ghost module at ratio 2 reordered."""
    import torch

    import compconv

    words = " ".join((ROOT / "docs" / "binarize.md").read_text().split())
    comp = compconv.convert(compconv.get_model("cifar_resnet20"), method="compconv", c0=128)
    ghost = compconv.convert(compconv.get_model("cifar_resnet20"), method="ghost")
    ghosts = dict(ghost.named_modules())
    pairs = [(c, ghosts[name]) for name, c in comp.named_modules() if isinstance(c, compconv.CompConv2d)]
    assert len(pairs) == 18 and all(c.depth == 1 and isinstance(g, compconv.GhostConv2d) for c, g in pairs)
    torch.manual_seed(0)
    for c, g in pairs:  # the same weights give the same channels, in another order
        c.convs[0].weight.data.copy_(g.primary.weight)
        c.tail.weight.data.copy_(g.cheap.weight)
        x = torch.randn(2, c.in_channels, 8, 8)
        yc, yg = c(x).transpose(0, 1).flatten(1), g(x).transpose(0, 1).flatten(1)
        order = [int(torch.cdist(row[None], yg).argmin()) for row in yc]
        assert sorted(order) == list(range(c.out_channels)) and order != list(range(c.out_channels))
        torch.testing.assert_close(yc, yg[order])
    bc, bg = (compconv.profile(compconv.binarize(m), (1, 3, 32, 32)) for m in (comp, ghost))
    assert bc.total_params == bg.total_params and bc.total_bops == bg.total_bops
    assert (f"the same {bc.total_params:,} parameters and {bc.total_bops / 1e6:.2f}M BOPs") in words


def test_binarized_noise_and_table_6_speed_claims_are_measured() -> None:
    """docs/binarize.md: the end-of-schedule epoch-to-epoch swings, and Table 6's Bin-Comp vs Bin-Ghost ratios."""
    import csv
    import json

    import compconv

    words = " ".join((ROOT / "docs" / "binarize.md").read_text().split())

    def jumps(run: str) -> tuple[float, list[float]]:  # epochs 21-30: the largest change from the epoch before
        with open(RUNS / run / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        t = [float(r["test_top1"]) for r in rows]
        assert len(t) == 30 and abs(float(rows[19]["lr"]) - 0.025) < 1e-9
        return _late_jump(t), t

    (vb, _), (cb, ct), (vf, _), (cf, _) = (jumps(r) for r in ("r20-vanilla-bin-cpu30-s0", "r20-comp128-bin-cpu30-s0",
                                                              "r20-vanilla-cpu30-s0", "r20-comp128-cpu30-s0"))
    assert (f"the test top-1 of Bin-ResNet20 moves by up to {vb:.2f} points from one epoch to the next and "
            f"Bin-Comp's by up to {cb:.2f} ({ct[26]:.2f}%, {ct[27]:.2f}%, {ct[28]:.2f}% at epochs 27-29), where the "
            f"full-precision runs move by at most {vf:.2f} (vanilla) and {cf:.2f} (C0=128)") in words
    rows = {r["row"]: r for r in json.loads((ROOT / "docs" / "results" / "tables.json").read_text())
            if r["paper"] == "CompConv" and r["table"] == "6"}
    g, c = rows["Bin-Ghost-VGG16 (s=2)"], rows["Bin-Comp-VGG16 (C0=128)"]
    assert (f"in its own table, {g['paper_macs'] / c['paper_macs']:.2f}x in FLOPs ({g['paper_macs']:g}M / "
            f"{c['paper_macs']:g}M) and {g['paper_params'] / c['paper_params']:.0f}x in params; in our count it is "
            f"{g['ours_macs'] / c['ours_macs']:.2f}x in FLOPs ({g['ours_macs']:.2f}M / {c['ours_macs']:.2f}M) and "
            f"{g['ours_params'] / c['ours_params']:.2f}x in params ({g['ours_params']:.2f}M / "
            f"{c['ours_params']:.2f}M)") in words
    pg = compconv.profile(compconv.binarize(compconv.convert(compconv.get_model("cifar_vgg16"), method="ghost")),
                          (1, 3, 32, 32))
    pc = compconv.profile(compconv.binarize(compconv.get_model("comp128_cifar_vgg16")), (1, 3, 32, 32))
    assert pg.total_macs == pc.total_macs and pg.combined_macs() / 1e6 == pytest.approx(g["ours_macs"])
    assert (f"The real stem and classifier ({pg.total_macs / 1e6:.2f}M MACs, the same in both) are "
            f"{100 * pg.total_macs / pg.combined_macs():.0f}% of Bin-Ghost's total and "
            f"{100 * pc.total_macs / pc.combined_macs():.0f}% of Bin-Comp's; on the binary convs alone CompConv is "
            f"{pg.total_bops / pc.total_bops:.2f}x below Ghost ({pc.total_bops / 64e6:.2f}M against "
            f"{pg.total_bops / 64e6:.2f}M BOPs/64)") in words


def test_binarized_ghost_and_compconv_initialisations_differ_as_documented() -> None:
    import math

    import torch

    import compconv

    words = " ".join((ROOT / "docs" / "binarize.md").read_text().split())
    torch.manual_seed(0)
    comp = compconv.convert(compconv.get_model("cifar_resnet20"), method="compconv", c0=128)
    ghost = compconv.convert(compconv.get_model("cifar_resnet20"), method="ghost")
    wc, wg = comp.layer1[0].conv1.convs[0].weight, ghost.layer1[0].conv1.primary.weight
    fan_in, fan_out = wc.shape[1] * 9, wc.shape[0] * 9
    expected = math.sqrt(2 / fan_out) / (1 / math.sqrt(3 * fan_in))  # Kaiming-normal fan-out / PyTorch's default
    assert float(wg.detach().std() / wc.detach().std()) == pytest.approx(expected, rel=0.1)
    assert f"about {expected:.1f}x smaller for the first 3x3 conv of `layer1`" in words


def test_readme_binarized_params_and_storage_are_the_runs() -> None:
    import json

    b = json.loads((RUNS / "r20-vanilla-bin-cpu30-s0" / "results.json").read_text())
    f = json.loads((RUNS / "r20-vanilla-cpu30-s0" / "results.json").read_text())
    words = " ".join(README.split())
    assert (f"hence Bin-ResNet20's {b['params']:,} against {f['params']:,}; what a binarized model stores "
            f"({b['storage_mb']:.3f} MB against {f['params'] * 4 / 1e6:.2f} MB)") in words
