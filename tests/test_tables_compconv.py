"""The CompConv paper's tables, rebuilt with our modules and counter (our side computed live)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from compconv.paper import TABLES, all_rows


@pytest.fixture(scope="module")
def rows():  # noqa: ANN201
    return all_rows(["compconv"])


@pytest.mark.slow
def test_every_reproducible_row_is_within_tolerance(rows) -> None:  # noqa: ANN001
    checked = [r for r in rows if r.tol_params is not None or r.tol_macs is not None]
    assert {r.table for r in checked} >= {"1", "2", "3", "4", "5", "7", "8"}
    for r in checked:
        assert r.ours_params is not None and r.ours_macs is not None
        assert r.status == "reproduced", (r.table, r.row, r.params_diff, r.macs_diff)
        if r.tol_params is not None:
            assert abs(r.params_diff) <= r.tol_params
        if r.tol_macs is not None:
            assert abs(r.macs_diff) <= r.tol_macs


@pytest.mark.slow
def test_open_rows_report_the_gap_and_the_closest_reading(rows) -> None:  # noqa: ANN001
    comp_resnet = [r for r in rows if r.table in ("7", "8") and r.row.startswith("Comp")]
    assert len(comp_resnet) == 5
    for r in comp_resnet:
        assert r.status == "gap" and r.note.startswith("closest reading:") and r.ours_macs > 0
    unrepro = [r for r in rows if r.status == "not reproducible"]
    assert all(r.note for r in unrepro)
    binary = [r for r in rows if r.table == "6"]  # built by compconv.binarize, reported with the closest reading
    assert len(binary) == 3 and all(r.status == "gap" and "closest reading:" in r.note and r.ours_macs for r in binary)


def test_unknown_table_set() -> None:
    with pytest.raises(ValueError, match="unknown table set"):
        all_rows(["compcnv"])
    assert "compconv" in TABLES


@pytest.mark.slow
def test_cli_tables_writes_json(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "t.json"
    # The CLI path (the CompConv rows themselves are checked above; hetconv's set is the quickest to rebuild).
    proc = subprocess.run([sys.executable, "-m", "compconv", "tables", "--paper", "hetconv", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| HetConv |" in proc.stdout and "MACs in millions" in proc.stdout
    data = json.loads(out.read_text())
    assert data and {"paper", "table", "row", "ours_macs", "status"} <= set(data[0])
    bad = subprocess.run([sys.executable, "-m", "compconv", "tables", "--paper", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown table set" in bad.stderr


def _fake_rows() -> list:
    from compconv.paper.common import TableRow

    return [TableRow("P", t, f"row {i}", None, None, None, None, status="info") for i, t in enumerate(("1", "1", "2"))]


def test_progress_says_one_line_per_table_on_stderr(capsys, monkeypatch) -> None:
    monkeypatch.setitem(TABLES, "fake", f"{__name__}:_fake_rows")
    rows = all_rows(["fake"], progress=True)
    err = capsys.readouterr().err
    assert [r.table for r in rows] == ["1", "1", "2"]
    lines = [ln for ln in err.splitlines() if ln.startswith("fake ")]
    assert [ln.split(" rows")[0] for ln in lines] == ["fake table 1: 2", "fake table 2: 1"]
    all_rows(["fake"])  # without progress: silent, and the hook is gone
    assert capsys.readouterr().err == ""
