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


def all_rows(names: list[str] | None = None) -> list[TableRow]:
    """Rows of the named table sets (all when None); unknown names raise with the known ones."""
    names = list(TABLES) if names is None else names
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise ValueError(f"unknown table set(s) {unknown}; choose from {sorted(TABLES)}")
    rows: list[TableRow] = []
    for n in names:
        rows += _load(TABLES[n])()
    return rows
