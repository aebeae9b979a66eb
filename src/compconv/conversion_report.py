"""What ``convert`` did, per conv layer and in total: ``LayerChange`` rows and the ``ConversionReport``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ConversionReport", "LayerChange"]


@dataclass
class LayerChange:
    """What happened to one conv layer (one module object): converted (with the method's choices) or kept, and why.

    ``name`` is the first name the module is registered under; ``aliases`` are its other names (an
    attribute that points at a conv an ``nn.Sequential`` runs, or a conv shared by two parents): the one
    replacement is set at every name. ``macs_*`` are per image at ``input_size`` when it was given (else
    None), summed over every call of the module in one forward (``calls``: 0 = the forward did not reach
    it, its MACs are then None); ``params_*`` count every parameter of the layer before and after.
    """

    name: str
    c_in: int
    c_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    action: str  # "converted" | "kept"
    reason: str
    method: str
    options: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    depth: int | None = None
    c_prim: int | None = None
    aliases: list[str] = field(default_factory=list)
    calls: int | None = None


class ConversionReport:
    """Per-layer record of a conversion, with totals; ``str(report)`` is a readable table.

    ``converted`` / ``kept`` list the rows by action (``len(report.converted) == 0``: nothing was converted);
    ``not_run`` the rows the forward at ``input_size`` never reached (their MACs are unknown, shown "-").
    """

    def __init__(self, method: str, layers: list[LayerChange], input_size: tuple[int, ...] | None) -> None:
        self.method = method
        self.layers = layers
        self.input_size = input_size

    @property
    def converted(self) -> list[LayerChange]:
        return [r for r in self.layers if r.action == "converted"]

    @property
    def kept(self) -> list[LayerChange]:
        return [r for r in self.layers if r.action == "kept"]

    @property
    def not_run(self) -> list[LayerChange]:
        """Rows the forward at ``input_size`` did not reach (empty without ``input_size``)."""
        return [r for r in self.layers if self.input_size is not None and not r.calls]

    def totals(self) -> dict[str, int | None]:
        """Sums over the conv layers (not the whole model: BN and linear layers are not in this report).

        MACs (None without ``input_size``) sum the layers that ran; ``not_run`` counts the others.
        """
        out: dict[str, int | None] = {
            "params_before": sum(r.params_before for r in self.layers),
            "params_after": sum(r.params_after for r in self.layers),
        }
        for key in ("macs_before", "macs_after"):
            vals = [getattr(r, key) for r in self.layers]
            out[key] = None if self.input_size is None else int(sum(v for v in vals if v is not None))
        out["not_run"] = len(self.not_run)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "input_size": list(self.input_size) if self.input_size else None,
            "layers": [asdict(r) for r in self.layers],
            "totals": self.totals(),
        }

    def table(self) -> str:
        has_macs = self.input_size is not None

        def num(v: int | None) -> str:
            return "-" if v is None else f"{v:,}"

        head = ["layer", "C_in", "C_out", "k", "s", "action", "d", "C_prim", "params", "->"]
        if has_macs:
            head += ["MACs", "->"]
        head += ["why"]
        rows = []
        for r in self.layers:
            name = r.name + (f" (= {', '.join(r.aliases)})" if r.aliases else "")
            row = [name, str(r.c_in), str(r.c_out), "x".join(map(str, r.kernel)), str(r.stride[0]), r.action,
                   num(r.depth), num(r.c_prim), num(r.params_before), num(r.params_after)]
            if has_macs:
                row += [num(r.macs_before), num(r.macs_after)]
            row += [r.reason + (f" [{r.calls} calls]" if r.calls and r.calls > 1 else "")]
            rows.append(row)
        widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        t = self.totals()
        summary = (f"method={self.method}: {len(self.converted)} converted, {len(self.kept)} kept; "
                   f"conv params {num(t['params_before'])} -> {num(t['params_after'])}")
        if has_macs:
            summary += (f"; conv MACs at {tuple(self.input_size or ())} {num(t['macs_before'])} -> "
                        f"{num(t['macs_after'])} (MACs = multiply-accumulates")
            summary += (f"; over the layers that ran: {t['not_run']} conv(s) not reached by the forward, "
                        "MACs '-')" if t["not_run"] else ")")
        return "\n".join(lines + [summary])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"ConversionReport(method={self.method!r}, converted={len(self.converted)}, kept={len(self.kept)})"
