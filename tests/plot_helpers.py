"""Shared check of the plot tests: no two drawn texts of a figure overlap (no stacked labels)."""

from __future__ import annotations

import itertools
from typing import Any


def overlapping_texts(fig: Any) -> list[tuple[str, str]]:
    """Pairs of drawn, non-empty texts (titles, labels, tick labels, legend, notes) whose boxes overlap."""
    import matplotlib.text

    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    hidden = set()
    for ax in fig.axes:  # tick labels outside the view limits exist as objects but are not drawn
        for tl in ax.get_xticklabels(which="both"):
            b = tl.get_window_extent(r)
            if not ax.bbox.x0 - 1 <= (b.x0 + b.x1) / 2 <= ax.bbox.x1 + 1:
                hidden.add(id(tl))
        for tl in ax.get_yticklabels(which="both"):
            b = tl.get_window_extent(r)
            if not ax.bbox.y0 - 1 <= (b.y0 + b.y1) / 2 <= ax.bbox.y1 + 1:
                hidden.add(id(tl))
    texts = [t for t in fig.findobj(matplotlib.text.Text)
             if t.get_visible() and t.get_text().strip() and id(t) not in hidden]
    boxes = [(t.get_text(), t.get_window_extent(r).shrunk(0.95, 0.9)) for t in texts]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


def legend_labels(fig: Any) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def figure_notes(fig: Any) -> str:
    return " ".join(t.get_text() for t in fig.texts)
