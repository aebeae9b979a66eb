"""Rows of a paper's table beside ours, and how ``compconv tables`` prints them.

The paper's side of each row is data typed from the paper (with the table and row it came from); our
side is computed at that moment by building the real modules and counting them with ``compconv.profile``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TableRow", "format_rows", "rel_diff", "set_row_hook"]

_row_hook: Callable[[TableRow], None] | None = None


def set_row_hook(hook: Callable[[TableRow], None] | None) -> Callable[[TableRow], None] | None:
    """Call ``hook(row)`` on every ``TableRow`` built from now on (None: stop); returns the previous hook."""
    global _row_hook
    previous, _row_hook = _row_hook, hook
    return previous


def rel_diff(ours: float | None, paper: float | None) -> float | None:
    """``(ours - paper) / paper``, or None when either side is missing."""
    if ours is None or paper is None or paper == 0:
        return None
    return (ours - paper) / paper


@dataclass
class TableRow:
    """One row: the paper's Params/MACs (as printed) beside ours.

    ``status`` is ``"reproduced"`` (within ``tol_*``), ``"gap"`` (outside, or reported with its gap by
    design), ``"not reproducible"`` (with ``note`` saying why) or ``"info"`` (no comparison).
    ``paper_params`` are in millions, ``paper_macs`` in millions of MACs (the papers' "FLOPs").
    """

    paper: str
    table: str
    row: str
    paper_params: float | None
    paper_macs: float | None
    ours_params: float | None
    ours_macs: float | None
    tol_params: float | None = None
    tol_macs: float | None = None
    note: str = ""
    status: str = ""

    def __post_init__(self) -> None:
        if not self.status:
            self.status = self._status()
        if _row_hook is not None:  # progress of ``all_rows(progress=True)``: a row is built once counted
            _row_hook(self)

    def _status(self) -> str:
        if self.tol_params is None and self.tol_macs is None:
            return "gap" if self.paper_params is not None else "info"
        ok = True
        for tol, o, p in ((self.tol_params, self.ours_params, self.paper_params),
                          (self.tol_macs, self.ours_macs, self.paper_macs)):
            d = rel_diff(o, p)
            if tol is not None and d is not None and abs(d) > tol:
                ok = False
        return "reproduced" if ok else "gap"

    @property
    def params_diff(self) -> float | None:
        return rel_diff(self.ours_params, self.paper_params)

    @property
    def macs_diff(self) -> float | None:
        return rel_diff(self.ours_macs, self.paper_macs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params_diff"] = self.params_diff
        d["macs_diff"] = self.macs_diff
        return d


def _f(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


def format_rows(rows: list[TableRow], markdown: bool = True) -> str:
    """A Markdown table (Params in M, MACs in M; MACs = multiply-accumulates of conv + linear layers)."""
    head = ["paper", "table", "row", "paper params (M)", "ours params (M)", "diff", "paper MACs (M)",
            "ours MACs (M)", "diff", "status", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.paper, r.table, r.row, _f(r.paper_params), _f(r.ours_params), _pct(r.params_diff),
                 _f(r.paper_macs, 1), _f(r.ours_macs, 1), _pct(r.macs_diff), r.status, r.note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)
