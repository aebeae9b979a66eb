"""What ``compress`` did, per layer and in total; ``str(report)`` is a table, ``to_dict()`` is JSON-ready."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from compconv.convert import ConversionReport

__all__ = ["CompressionReport", "LayerRecord"]


@dataclass
class LayerRecord:
    """One candidate layer: the chosen option and what it cost and did.

    ``macs_*`` are per image at the report's ``input_size``; ``sensitivity`` is the chosen candidate's
    (see :mod:`compconv.compress.search`; ``None`` when no search ran); ``err_init`` / ``err_fit`` are the
    held-out relative output errors of the layer in the compressed network before (random init) and
    after the warm start (``None`` when kept or not warm-started); ``err_plain`` / ``err_matched`` are
    both assignments' errors when both were tried (CompConv); ``parts``: error per kind of output channel.
    ``latency_before`` / ``latency_after``: seconds per forward of the model spent in the dense conv and in
    the chosen module, measured at the layer's input shape(s) with the deployment batch (every call summed;
    ``None`` unless ``budget_type="latency"``).
    """

    name: str
    choice: str
    options: dict[str, Any] | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    sensitivity: float | None = None
    err_init: float | None = None
    err_fit: float | None = None
    fit: str | None = None
    assignment: str | None = None
    err_plain: float | None = None
    err_matched: float | None = None
    parts: dict[str, float] = field(default_factory=dict)
    latency_before: float | None = None
    latency_after: float | None = None


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{1e3 * t:.3g}"


@dataclass
class CompressionReport:
    """The result of :func:`compconv.compress` (see its docstring for the fields' meaning).

    Latency fields (``budget_type="latency"`` only, else ``None``; seconds per forward at ``input_size``, whose
    batch is the deployment batch, on the machine ``compress`` ran on): ``latency_before`` is the original
    model's measured latency; ``latency_estimate`` the compressed model's as the budget was met on it (the
    original's less each layer's measured saving); ``latency_after`` the compressed model's measured latency
    and ``latency_before_measured`` the original's, timed in alternation with it at the end
    (:func:`compconv.compress.latency.time_side_by_side`), so their ratio, ``latency_share_measured``, is free
    of the machine's drift since ``latency_before`` was taken.
    ``latency_form`` is what every module was timed as (``"deployed"`` or ``"converted"``,
    :mod:`compconv.compress.latency`); ``latency_form_before`` / ``latency_form_after`` the fastest form of the
    original and of the compressed model (e.g. ``"deploy(collapse_hetconv=True)"``: deploy it that way).
    """

    method: str
    rule: str
    budget: float
    budget_type: str
    input_size: tuple[int, ...]
    seed: int
    layers: list[LayerRecord]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    rule_detail: str = ""
    warm_start: bool = True
    bn_reestimated: int = 0
    bn_reparametrized: int = 0
    calib_images: int = 0
    held_out_images: int = 0
    agreement: float | None = None
    kl: float | None = None
    notes: list[str] = field(default_factory=list)
    conversion: ConversionReport | None = None
    latency_before: float | None = None
    latency_estimate: float | None = None
    latency_after: float | None = None
    latency_before_measured: float | None = None
    latency_form: str | None = None
    latency_form_before: str | None = None
    latency_form_after: str | None = None

    @property
    def latency_share_estimated(self) -> float | None:
        """``latency_estimate / latency_before``: the share the latency budget was met on (``None`` if not timed)."""
        if self.latency_estimate is None or not self.latency_before:
            return None
        return self.latency_estimate / self.latency_before

    @property
    def latency_share_measured(self) -> float | None:
        """``latency_after / latency_before_measured``: the measured share, both models timed side by side
        (``latency_before`` for a report without that field; ``None`` if not timed); compare with the
        estimate: the two differ by the timer's noise and by effects outside the timed layers."""
        base = self.latency_before_measured or self.latency_before
        if self.latency_after is None or not base:
            return None
        return self.latency_after / base

    @property
    def achieved(self) -> float:
        """The compressed model's share of the original's MACs (or params, per ``budget_type``); for
        ``"latency"`` the estimated share the budget was met on (the measured one: ``latency_share_measured``)."""
        if self.budget_type == "latency":
            share = self.latency_share_estimated
            return float("nan") if share is None else share
        if self.budget_type == "params":
            return self.params_after / self.params_before
        return self.macs_after / self.macs_before

    @property
    def overrides(self) -> dict[str, dict[str, Any]]:
        """``{layer name: options}`` of the converted layers (what ``convert`` was given)."""
        return {r.name: dict(r.options) for r in self.layers if r.options is not None}

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "conversion"}
        d["input_size"] = list(self.input_size)
        d["achieved"] = self.achieved
        d["latency_share_estimated"] = self.latency_share_estimated
        d["latency_share_measured"] = self.latency_share_measured
        d["conversion"] = self.conversion.to_dict() if self.conversion is not None else None
        return d

    def table(self) -> str:
        timed = any(r.latency_before is not None for r in self.layers)
        head = ["layer", "choice", "MACs", "->", "params", "->", *(["ms", "->"] if timed else []), "sens",
                "err init", "err fit", "fit"]
        rows = []
        for r in self.layers:
            fit = r.fit or "-"
            if r.assignment:
                fit += f" ({r.assignment})"
            lat = [_ms(r.latency_before), _ms(r.latency_after)] if timed else []
            rows.append([r.name, r.choice, f"{r.macs_before:,}", f"{r.macs_after:,}", f"{r.params_before:,}",
                         f"{r.params_after:,}", *lat, _f(r.sensitivity, ".4f"), _f(r.err_init), _f(r.err_fit), fit])
        widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]
        lines.append(
            f"method={self.method}, rule={self.rule}{' (' + self.rule_detail + ')' if self.rule_detail else ''}, "
            f"budget={self.budget:g} of {self.budget_type}, achieved {self.achieved:.4f}; model MACs "
            f"{self.macs_before:,} -> {self.macs_after:,}, params {self.params_before:,} -> {self.params_after:,} "
            f"(MACs = multiply-accumulates per image, at input {(1, *self.input_size[1:])})")
        if self.latency_before is not None:
            lines.append(
                f"latency at input {self.input_size} on this machine: {_ms(self.latency_before)} ms -> estimated "
                f"{_ms(self.latency_estimate)} ms ({_f(self.latency_share_estimated, '.4f')}, what the budget was "
                f"met on), measured {_ms(self.latency_after)} ms ({_f(self.latency_share_measured, '.4f')} of "
                f"the original re-timed beside it: {_ms(self.latency_before_measured)} ms); "
                f"timed {self.latency_form} (original: {self.latency_form_before}, compressed: "
                f"{self.latency_form_after}); layer ms: per forward, every call summed")
        tail = f"warm start: {'on' if self.warm_start else 'off (random init)'}; BN re-estimated: {self.bn_reestimated}"
        if self.bn_reparametrized:
            tail += f"; BN re-parametrised (outputs kept): {self.bn_reparametrized}"
        tail += f"; calibration {self.calib_images} images ({self.held_out_images} held out)"
        if self.agreement is not None:
            tail += f"; top-1 agreement with the original on held-out: {self.agreement:.3f}, KL {self.kl:.4f}"
        lines.append(tail)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
