"""The last line of defence: the rewritten model must compute what the original did on an example input.

``deploy`` runs the original once on the example input (the user's, or one built here), and the rewritten
model after its passes; outputs (tensors, possibly nested in tuples, lists and dicts) must agree within
float tolerance. When they do not, ``deploy`` redoes the rewrite on a fresh copy checking after every
pass, so the error names the pass that changed the output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from compconv.deploy.compconv import DeployedCompConv2d
from compconv.layers.base import CompactConv2d

__all__ = ["EXAMPLE_SIZES", "TOLERANCE", "CheckFailed", "Checker", "example_input_for"]

# Spatial sizes tried, smallest first, when deploy builds the example input itself.
EXAMPLE_SIZES = (32, 64, 128, 224)
# Largest allowed max |deployed - original|, relative to max |original| (floored at 0.1), per dtype.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}
_LOW_PRECISION_TOLERANCE = 3e-2  # float16 / bfloat16
_HINT = "pass deploy(..., example_input=<a small batch the model accepts>) or check=False"


class CheckFailed(RuntimeError):
    """The rewritten model's output differs from the original's (which pass is not known yet)."""


def _tensors(out: Any) -> list[Any]:
    """The tensors of a (nested) output, in order; other leaves as they are (compared by equality)."""
    if isinstance(out, Tensor):
        return [out.detach().clone()]  # a later run may write into the same storage
    if isinstance(out, dict):
        return [(k, t) for k in out for t in _tensors(out[k])]
    if isinstance(out, list | tuple):
        return [t for o in out for t in _tensors(o)]
    return [out]


@torch.no_grad()
def run_model(model: nn.Module, example: tuple[Any, ...]) -> list[Any]:
    """``model(*example)`` (eval mode, RNG seeded: a model that samples samples alike), flattened."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _tensors(model(*example))


def _first_conv(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d | CompactConv2d | DeployedCompConv2d):
            return m
    return None


@torch.no_grad()
def build_example(model: nn.Module) -> tuple[Tensor, list[Any]]:
    """``(x, model's output for x)`` for the input :func:`example_input_for` describes."""
    conv = _first_conv(model)
    if conv is None:
        raise ValueError(f"deploy: {type(model).__name__} has no Conv2d to build an example input from; {_HINT}")
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    errors = []
    was_training = model.training
    model.eval()
    try:
        for s in EXAMPLE_SIZES:
            x = torch.randn(2, conv.in_channels, s, s, generator=gen).to(device=device, dtype=dtype)
            try:
                return x, run_model(model, (x,))
            except Exception as e:  # noqa: BLE001 - this size does not fit the model: try the next
                errors.append(f"{tuple(x.shape)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        model.train(was_training)
    raise ValueError(
        f"deploy: could not build an example input for {type(model).__name__} (tried {'; '.join(errors)}); {_HINT}"
    )


def example_input_for(model: nn.Module) -> Tensor:
    """A small input ``(2, C, S, S)`` that ``model`` accepts in eval mode (float, on the model's device).

    ``C`` is the first conv's ``in_channels``; ``S`` the first of ``EXAMPLE_SIZES`` the forward runs with.

    Raises:
        ValueError: no conv to read ``C`` from, or no size runs; the message says how to pass
            ``example_input``.
    """
    return build_example(model)[0]


def max_error(ref: list[Any], out: list[Any]) -> tuple[float, float]:
    """(max abs difference, max abs finite reference value); inf when the structures differ."""
    if len(ref) != len(out):
        return math.inf, 0.0
    err, scale = 0.0, 0.0
    for r, o in zip(ref, out, strict=True):
        if isinstance(r, tuple) and isinstance(o, tuple):  # dict entries: (key, value)
            if r[0] != o[0]:
                return math.inf, 0.0
            r, o = r[1], o[1]
        if not isinstance(r, Tensor) or not isinstance(o, Tensor):
            if r is not o and r != o:
                return math.inf, 0.0
            continue
        if r.shape != o.shape:
            return math.inf, 0.0
        r, o = r.double().cpu(), o.double().cpu()
        d = (o - r).abs()
        d[(torch.isnan(o) & torch.isnan(r)) | (o == r)] = 0.0  # NaN where it was NaN; equal infinities
        if d.numel():
            err = max(err, math.inf if torch.isnan(d).any() else float(d.max()))
            finite = r[torch.isfinite(r)]
            scale = max(scale, float(finite.abs().max()) if finite.numel() else 0.0)
    return err, scale


class Checker:
    """Compares ``model`` with the reference outputs, after every pass (``per_pass``) or once at the end."""

    def __init__(
        self, model: nn.Module, example: tuple[Any, ...] | None, ref: list[Any] | None, per_pass: bool
    ) -> None:
        self.model, self.example, self.ref, self.per_pass = model, example, ref, per_pass
        self.errors: dict[str, float] = {}
        dtype = example[0].dtype if example and isinstance(example[0], Tensor) else torch.float32
        self.tol = TOLERANCE.get(dtype, _LOW_PRECISION_TOLERANCE)

    def _compare(self) -> tuple[float, float, bool]:
        assert self.example is not None and self.ref is not None
        err, scale = max_error(self.ref, run_model(self.model, self.example))
        return err, scale, err <= self.tol * max(scale, 0.1)

    def after(self, name: str, how_to_skip: str) -> None:
        """Called after the pass ``name``; raises RuntimeError naming it (per-pass mode)."""
        if self.ref is None or not self.per_pass:
            return
        err, scale, ok = self._compare()
        self.errors[name] = err
        if not ok:
            raise RuntimeError(
                f"deploy: the {name!r} rewrite changed {type(self.model).__name__}'s output on the example input "
                f"(max abs error {err:.3g}, output scale {scale:.3g}, tolerance {self.tol:g} relative). "
                f"This is a bug in compconv.deploy; please report it. {how_to_skip} avoids this rewrite."
            )

    def final(self) -> None:
        """Called after the last pass; raises CheckFailed when the outputs differ (end-only mode)."""
        if self.ref is None or self.per_pass:
            return
        err, scale, ok = self._compare()
        self.errors["all rewrites"] = err
        if not ok:
            raise CheckFailed(
                f"deploy: the rewritten {type(self.model).__name__} differs from the original on the example "
                f"input (max abs error {err:.3g}, output scale {scale:.3g}, tolerance {self.tol:g} relative)"
            )
