"""What ``binarize`` did, per layer and in total: ``LayerBinarization`` rows and the ``BinarizationReport``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BinarizationReport", "LayerBinarization"]


@dataclass
class LayerBinarization:
    """One conv (or linear) layer: binarized (XNOR-Net) or kept in full precision, and why.

    ``name`` is the first name the module is registered under (``aliases``: its other names; the one binary
    module is set at every name). ``unit`` is the model-level layer it belongs to (a compact conv for its
    inner convs, else the layer itself). ``binary_params`` are the weights now 1 bit each (0 when kept);
    ``params`` every parameter of the layer before binarizing.
    """

    name: str
    type: str
    unit: str
    c_in: int | None
    c_out: int | None
    kernel: tuple[int, ...] | None
    groups: int | None
    action: str  # "binarized" | "kept"
    reason: str
    params: int
    binary_params: int = 0
    aliases: list[str] = field(default_factory=list)


class BinarizationReport:
    """Per-layer record of ``binarize``; ``str(report)`` is a readable table.

    ``binarized`` / ``kept`` list the rows by action; ``options`` are the arguments the call used.
    """

    def __init__(self, layers: list[LayerBinarization], options: dict[str, Any]) -> None:
        self.layers = layers
        self.options = options

    @property
    def binarized(self) -> list[LayerBinarization]:
        return [r for r in self.layers if r.action == "binarized"]

    @property
    def kept(self) -> list[LayerBinarization]:
        return [r for r in self.layers if r.action == "kept"]

    def totals(self) -> dict[str, int]:
        """Layers binarized / kept, and the weights now binary (the rows' sums)."""
        return {
            "binarized": len(self.binarized),
            "kept": len(self.kept),
            "binary_params": sum(r.binary_params for r in self.layers),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"options": dict(self.options), "layers": [asdict(r) for r in self.layers], "totals": self.totals()}

    def table(self) -> str:
        head = ["layer", "type", "C_in", "C_out", "k", "g", "action", "binary weights", "why"]

        def num(v: Any) -> str:
            return "-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)

        rows = []
        for r in self.layers:
            name = r.name + (f" (= {', '.join(r.aliases)})" if r.aliases else "")
            k = "x".join(map(str, r.kernel)) if r.kernel else "-"
            rows.append(
                [
                    name,
                    r.type,
                    num(r.c_in),
                    num(r.c_out),
                    k,
                    num(r.groups),
                    r.action,
                    num(r.binary_params) if r.action == "binarized" else "-",
                    r.reason,
                ]
            )
        widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]
        t = self.totals()
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        lines.append(
            f"binarize (XNOR-Net; {opts}): {t['binarized']} binarized, {t['kept']} kept; "
            f"{t['binary_params']:,} weights now 1 bit each (count BOPs with compconv.profile)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"BinarizationReport(binarized={len(self.binarized)}, kept={len(self.kept)})"
