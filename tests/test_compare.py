"""``compconv compare``: how methods are applied, the matched-MACs sweep, the end-to-end --quick run."""

from __future__ import annotations

import json
import math

import pytest

from compconv import list_methods
from compconv.bench import compare
from compconv.cli import main
from compconv.models import get_model


def test_methods_that_cannot_apply_say_why() -> None:
    _, n, note = compare.apply_method(get_model("cifar_vgg16"), "xsepconv", "cifar_vgg16", {})
    assert n == 0 and note.startswith("not applicable") and "depthwise" in note
    _, n, note = compare.apply_method(get_model("cifar_resnet20"), "slimconv", "cifar_resnet20", {})
    assert n == 9 and "convert_blocks" in note  # one SlimConv per basic block (3 stages x 3)


def test_matched_setting_is_the_sweep_value_closest_to_the_target() -> None:
    host = compare.QUICK_HOSTS["cifar_resnet20"]
    target = compare._count(host, "compconv", {"c0": 128})[1]
    opts, note = compare._matched(host, "hetconv", target, quick=False)
    macs = {p: compare._count(host, "hetconv", {"part": p})[1] for p in compare.SWEEPS["hetconv"][1]}
    best = min(macs, key=lambda p: abs(math.log(macs[p] / target)))
    assert opts == {"part": best} and "vs the CompConv128 target" in note
    # the target method matches itself at its paper value
    assert compare._matched(host, "compconv", target, quick=False)[0] == {"c0": 128}


def test_bad_arguments_name_the_allowed_values(tmp_path) -> None:
    with pytest.raises(ValueError, match="methods must be among"):
        compare.run(_args(tmp_path, methods=["nope"]))
    with pytest.raises(ValueError, match="hosts must be among"):
        compare.run(_args(tmp_path, hosts=["vgg19"]))


def _args(tmp_path, **kw):  # noqa: ANN001, ANN202
    import argparse

    base = dict(out=str(tmp_path), hosts=None, methods=None, batches=None, repeats=1, warmup=0, min_time=0.0,
                quick=True, no_plot=True, threads=1, name="compare", note=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.slow
def test_quick_compare_end_to_end(tmp_path) -> None:
    assert main(["compare", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert (tmp_path / "compare.md").read_text().startswith("# compconv compare")
    assert (tmp_path / "compare.png").stat().st_size > 0
    hosts = {r["host"] for r in data["results"]}
    assert len(hosts) == len(compare.QUICK_HOSTS)
    for host in hosts:
        rows = [r for r in data["results"] if r["host"] == host]
        assert rows[0]["setting"] == "baseline" and rows[0]["latency_ms"].keys() == {"b1", "b2"}
        for method in list_methods():  # every registered method, paper and matched, or a reason
            got = {r["setting"]: r for r in rows if r["method"] == method}
            assert set(got) == {"paper", "matched"}
            for r in got.values():
                if r["applicable"]:
                    assert r["macs"] > 0 and r["latency_ms"]["b1"] > 0 and r["converted"] > 0
                else:
                    assert r["note"].startswith("not applicable")
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def _fake_data(methods: list[str], **_: object) -> dict:
    def res(method: str, setting: str, macs: float, ms: float, conv: int = 12, ok: bool = True) -> dict:
        return dict(host="CIFAR VGG-16 (32x32)", method=method, setting=setting, options={}, applicable=ok,
                    converted=conv, params=1, macs=macs, latency_ms={"b1": ms} if ok else {},
                    note="" if ok else "not applicable: dense conv (groups=1)")

    results = [res("-", "baseline", 3.1e8, 10.0, 0)]
    for m, macs in (("compconv", 1.06e8), ("ghost", 1.07e8), ("hetconv", 1.05e8)):  # near-identical points
        results += [res(m, "paper", macs, 6.0), res(m, "matched", macs, 6.0)]
    results += [res("xsepconv", "paper", 0, 0, 0, ok=False), res("xsepconv", "matched", 0, 0, 0, ok=False)]
    return dict(batches=[1], methods=["compconv", "ghost", "hetconv", "xsepconv"], results=results, cpu="X",
                threads=1, torch="t", loadavg=None, repeats=1, warmup=0)


def test_default_output_is_a_new_run_dir_and_name_note_are_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare, "run_compare", lambda hosts, methods, *a, **k: _fake_data(methods))
    assert compare.run(_args(tmp_path, out=None, no_plot=False)) == 0
    (run,) = (tmp_path / "runs" / "compare").iterdir()  # runs/compare/<date-time>, never docs/
    assert sorted(p.name for p in run.iterdir()) == ["compare.json", "compare.md", "compare.png"]
    # The committed docs/results/compare_cpu.* come from --out docs/results --name compare_cpu --note "...".
    out = tmp_path / "docs_results"
    assert compare.run(_args(tmp_path, out=str(out), name="compare_cpu", note="a loaded 2-core VM")) == 0
    assert json.loads((out / "compare_cpu.json").read_text())["measured_on"] == "a loaded 2-core VM"
    assert "_Measured on: a loaded 2-core VM_" in (out / "compare_cpu.md").read_text()
    with pytest.raises(ValueError, match="--name must be a plain file stem"):
        compare.run(_args(tmp_path, name="../x"))


def test_plot_has_no_stacked_labels_and_leaves_out_methods_that_converted_nothing() -> None:
    from plot_helpers import figure_notes, legend_labels, overlapping_texts

    fig = compare.figure(_fake_data([]))
    assert overlapping_texts(fig) == []
    labels = legend_labels(fig)
    assert {"baseline", "compconv (paper)", "ghost (matched)", "hetconv (paper)"} <= set(labels)
    assert not any(lab.startswith("xsepconv") for lab in labels)
    assert "xsepconv on CIFAR VGG-16" in figure_notes(fig)


def test_dense_alternatives_are_rows_at_the_target_macs_and_every_row_says_its_speed_against_them(
        monkeypatch) -> None:
    pytest.importorskip("torch_pruning")
    import torch

    # a stub timer: each model's "latency" is its parameter count in units of 10k (known, not measured)
    monkeypatch.setattr(compare, "_time_models", lambda models, x, *a: {
        k: sum(p.numel() for p in m.parameters()) / 1e4 for k, m in models.items()})
    n = torch.get_num_threads()
    data = compare.run_compare({"cifar_resnet20": compare.QUICK_HOSTS["cifar_resnet20"]}, ["compconv"], [1], 1, 0,
                               0.0, quick=True, log=lambda s: None)
    assert torch.get_num_threads() == n
    rows = {(r["method"], r["setting"]): r for r in data["results"]}
    target = rows[("compconv", "paper")]["macs"]  # CompConv128, the target
    for kind in ("width", "prune"):
        d = rows[("dense", kind)]
        assert d["applicable"] and abs(d["macs"] / target - 1) <= 0.03 and "vs the CompConv128 target" in d["note"]
    for r in data["results"]:
        if r["applicable"] and r["latency_ms"]:
            for kind in ("width", "prune"):  # dense ms / this ms, from the stub's times
                assert r["vs_dense"][f"{kind}_b1"] == pytest.approx(rows[("dense", kind)]["params"] / r["params"])
    md = compare.to_markdown(data)
    assert "b1 vs dense width" in md and "| dense | prune |" in md
    assert data["dense_baselines"] == ["width", "prune"]
    fig = compare.figure(data)  # the dense rows are plotted, with their own marker and label
    from plot_helpers import legend_labels

    assert {"dense (width)", "dense (prune)"} <= set(legend_labels(fig))


def test_a_host_named_without_quick_is_the_real_host_and_with_quick_the_quick_one(tmp_path, monkeypatch) -> None:
    got: list[dict] = []

    def fake(hosts, methods, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        got.append(hosts)
        return _fake_data(methods)

    monkeypatch.setattr(compare, "run_compare", fake)
    names = ["mobilenet_v2", "cifar_resnet20"]
    assert compare.run(_args(tmp_path, quick=False, hosts=names)) == 0
    assert got[-1] == {h: compare.HOSTS[h] for h in names}
    assert got[-1]["mobilenet_v2"].input_chw == (3, 224, 224)
    assert not any("quick" in h.label for h in got[-1].values())
    assert compare.run(_args(tmp_path, quick=True, hosts=names)) == 0
    assert got[-1] == {h: compare.QUICK_HOSTS[h] for h in names}
    assert compare.run(_args(tmp_path, quick=True, hosts=["resnet50"])) == 0  # no quick version: the real one
    assert got[-1] == {"resnet50": compare.HOSTS["resnet50"]}


@pytest.mark.parametrize(("kw", "message"), [
    ({"min_time": -1.0}, "argument --min-time: must be a number of seconds >= 0, but got -1.0"),
    ({"min_time": math.nan}, "argument --min-time: must be a number of seconds >= 0, but got nan"),
    ({"threads": 0}, "argument --threads: must be an integer >= 1, but got 0"),
    ({"repeats": 0}, "argument --repeats: must be an integer >= 1, but got 0"),
    ({"warmup": -1}, "argument --warmup: must be an integer >= 0, but got -1"),
    ({"batches": [1, 0]}, r"argument --batches: every batch must be an integer >= 1, but got \[1, 0\]"),
])
def test_bad_timing_arguments_are_refused_naming_the_flag(kw, message, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(compare, "run_compare", lambda *a, **k: pytest.fail("ran with a bad argument"))
    with pytest.raises(ValueError, match=message):
        compare.run(_args(tmp_path, **kw))


def test_compare_json_is_standard_json_with_null_for_nan(tmp_path, monkeypatch) -> None:
    def fake(hosts, methods, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        data = _fake_data(methods)
        data["results"][1]["vs_dense"] = {"width_b1": math.nan, "prune_b1": math.inf}
        return data

    def no_constants(name: str) -> None:
        raise AssertionError(f"not standard JSON: {name}")

    monkeypatch.setattr(compare, "run_compare", fake)
    assert compare.run(_args(tmp_path)) == 0
    data = json.loads((tmp_path / "compare.json").read_text(), parse_constant=no_constants)
    assert data["results"][1]["vs_dense"] == {"width_b1": None, "prune_b1": None}
