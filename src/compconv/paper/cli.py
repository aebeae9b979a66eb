"""``compconv tables``: print the papers' tables beside our counts (Markdown), optionally as JSON."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from compconv.paper import TABLES, all_rows, format_rows

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tables", help="print the papers' Params/FLOPs tables beside ours",
                       description="Rebuild every paper table row with our modules and counter and print "
                                   "paper vs ours (MACs = multiply-accumulates of conv + linear layers).")
    p.add_argument("--paper", action="append", default=None,
                   help=f"table set(s) to print (repeatable); default all of {sorted(TABLES)}")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (by default one line per paper table as it is counted)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = all_rows(args.paper, progress=not args.quiet)
    print("Params in millions (BN included unless the row says otherwise, as each paper counts them); "
          "MACs in millions (the papers' 'FLOPs').")
    print(format_rows(rows))
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as f:
            json.dump([r.to_dict() for r in rows], f, indent=2)
        os.chmod(f.name, 0o644)  # NamedTemporaryFile is private (0600); a results file is not
        os.replace(f.name, args.json)
    bad = [r for r in rows if r.status == "gap" and (r.tol_params is not None or r.tol_macs is not None)]
    return 1 if bad else 0
