"""The papers' published numbers and the code that rebuilds each row with our modules and counter.

``TABLES`` maps a table-set name to a function returning ``list[TableRow]``; ``compconv tables`` prints
them all. Each paper's module registers its own entries here.
"""

from __future__ import annotations

from collections.abc import Callable

from compconv.paper.common import TableRow, format_rows

__all__ = ["TABLES", "TableRow", "all_rows", "format_rows"]

# name -> (import path "module:function"); imported lazily so one paper's tables never slow another's.
TABLES: dict[str, str] = {
    "compconv": "compconv.paper.compconv_tables:rows",
    "hetconv": "compconv.paper.hetconv_tables:rows",
    "slimconv": "compconv.paper.slimconv_tables:rows",
    "xsepconv": "compconv.paper.xsepconv_tables:rows",
}


def _load(spec: str) -> Callable[[], list[TableRow]]:
    import importlib

    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod), fn)


def all_rows(names: list[str] | None = None, progress: bool = False) -> list[TableRow]:
    """Rows of the named table sets (all when None); unknown names raise with the known ones.

    ``progress``: report on stderr while counting (minutes on a loaded CPU): a tqdm bar per table set,
    counting its rows, and one line per paper table when it is done (rows, seconds).
    """
    names = list(TABLES) if names is None else names
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise ValueError(f"unknown table set(s) {unknown}; choose from {sorted(TABLES)}")
    rows: list[TableRow] = []
    for n in names:
        if progress:
            rows += _with_progress(n)
        else:
            rows += _load(TABLES[n])()
    return rows


def _with_progress(name: str) -> list[TableRow]:
    import sys
    import time

    from tqdm import tqdm

    from compconv.paper.common import set_row_hook

    bar = tqdm(desc=f"tables {name}", unit=" rows", file=sys.stderr, leave=False, dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    state: dict = {"table": None, "rows": 0, "t0": time.perf_counter(), "last": time.perf_counter()}

    def done() -> None:  # one line per finished paper table: its rows and the time they took
        t = state["table"]
        if t is not None:
            what = f"table {t}" if t[:1].isdigit() or set(t) <= set("IVXLC") else t
            bar.write(f"{name} {what}: {state['rows']} rows in {state['last'] - state['t0']:.1f} s",
                      file=sys.stderr)

    def hook(row: TableRow) -> None:
        now = time.perf_counter()
        if row.table != state["table"]:
            done()
            state.update(table=row.table, rows=0, t0=state["last"])  # it started when the last table ended
        state.update(rows=state["rows"] + 1, last=now)
        bar.set_postfix_str(f"table {row.table}: {row.row}", refresh=False)
        bar.update(1)

    previous = set_row_hook(hook)
    try:
        rows = _load(TABLES[name])()
        done()
    finally:
        set_row_hook(previous)
        bar.close()
    return rows
