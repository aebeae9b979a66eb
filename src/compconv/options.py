"""Checks for a method's options, run once before ``convert`` walks (or touches) a model.

Two kinds of "no" are kept apart:

* an option no layer can take (an unknown name such as ``detph``, or a value outside the method's range
  such as ``depth=-1``) is a ``ValueError`` here, naming the option, the allowed names or values and the
  close matches, before anything is built;
* a valid option that one particular layer cannot take (``part=8`` on a conv with 12 input channels) is
  the layer's business: ``convert`` keeps that layer and the report says why.

Each method class states its own names and ranges in ``validate_options`` (classmethod, see
``compconv.layers.base.CompactConv2d``); the helpers below give every method the same error wording.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_option_names",
    "merge_options",
]

# Options that choose the same thing two ways: a per-layer override that sets one of them replaces the
# other (``c0=128`` globally, ``overrides={"layer4.*": {"depth": 3}}``: layer4 uses depth 3, not both).
ALTERNATIVES: dict[str, tuple[frozenset[str], ...]] = {
    "compconv": (frozenset({"depth", "c0"}),),
    "slimconv": (frozenset({"split", "k"}),),
}


# The papers' symbols for options whose compconv names differ: a user reading the paper types these.
PAPER_NAMES: dict[str, dict[str, str]] = {
    "ghost": {"s": "ratio", "d": "dw_size"},  # GhostNet (Han et al., CVPR 2020), Sec. 3.1
    "compconv": {"C0": "c0", "d": "depth"},    # CompConv Eq. 6
}


def check_option_names(method: str, options: Iterable[str], allowed: Collection[str]) -> None:
    """Raise ``ValueError`` for the first name in ``options`` not in ``allowed`` (with close matches, or the
    option a paper's symbol stands for)."""
    known = sorted(allowed)
    for name in options:
        if name in allowed:
            continue
        paper = PAPER_NAMES.get(method, {}).get(str(name))
        close = [paper] if paper in allowed else difflib.get_close_matches(str(name), known, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        if paper in allowed:
            hint += f" (the paper's {name} is compconv's {paper})"
        raise ValueError(f"unknown option {name!r} for method {method!r}; its options are {known}.{hint}")


def check_choice(name: str, value: Any, choices: Collection[Any], *, optional: bool = False) -> None:
    """``value`` must be one of ``choices`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{name} must be one of {tuple(choices)}, but got {value!r}{hint}")


def check_int(name: str, value: Any, *, minimum: int | None = None, optional: bool = False,
              odd: bool = False, hint: str = "") -> None:
    """``value`` must be an int (not a bool), ``>= minimum``, odd when ``odd`` (or None when ``optional``)."""
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (not odd or value % 2 == 1)
    if not ok:
        what = "an odd int" if odd else "an int"
        rng = f" >= {minimum}" if minimum is not None else ""
        extra = f" ({hint})" if hint else ""
        none = " or None" if optional else ""
        raise ValueError(f"{name} must be {what}{rng}{none}{extra}, but got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """``value`` must be a bool (0 and 1 are accepted, as YAML and CLI strings may give them)."""
    if not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
        raise ValueError(f"{name} must be True or False, but got {value!r}")


def merge_options(method: str, base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``; an override that sets one of two alternatives drops the other."""
    out = dict(base)
    for group in ALTERNATIVES.get(method, ()):
        if group & set(override):
            for k in group - set(override):
                out.pop(k, None)
    out.update(override)
    return out
