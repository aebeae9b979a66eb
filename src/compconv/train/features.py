"""Feature distillation: the student's intermediate outputs pulled towards the teacher's at named modules.

The loss added to the logit distillation (``distill_loss``) is, over the chosen modules ``l``,

    beta * mean_l  ||s_l - t_l||^2 / ||t_l||^2        (sums over the batch and every element)

the relative squared error of each feature map (FitNets, Romero et al. 2015, without a regressor: the
modules are chosen where student and teacher outputs already have the same shape, which is the case for a
model from ``compconv.compress``, where every converted conv keeps its output, and for block outputs of a
model pruned inside its blocks). Dividing by ``||t_l||^2`` makes every module count alike whatever its
activation scale, and ``beta`` independent of the depth of the modules chosen.

``"auto"`` picks the *block outputs*: for each top-level ``nn.Sequential`` of the teacher, its children
that are themselves composite modules (the residual blocks ``layer1.0`` ... of a ResNet, ``features.3`` of
a MobileNetV2, the stages ``blocks.2`` of a timm EfficientNet) or pooling layers (the stage ends of a
VGG-like plain stack); single layers (a conv, a BatchNorm, a Dropout, the classifier's Linear) are never
picked. Where the two models' ``nn.Sequential`` of that name have other children (a ResNet-56 student of a
ResNet-20 teacher), the ``nn.Sequential``'s own output (the stage end) is used instead. A module is kept
only where the student has one of that name, both outputs are tensors of the same shape on a probe batch,
it runs once per forward and no later in-place op (``ReLU(inplace=True)``) overwrites its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["FeatureDistill", "resolve_feature_layers"]

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _auto_candidates(student: nn.Module, teacher: nn.Module) -> list[str]:
    s_mods = dict(student.named_modules())
    names: list[str] = []
    for top, seq in teacher.named_children():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = [(n, m) for n, m in seq.named_children() if any(True for _ in m.children()) or isinstance(m, _POOLS)]
        other = s_mods.get(top)
        if isinstance(other, nn.Sequential) and [n for n, _ in seq.named_children()] != \
                [n for n, _ in other.named_children()]:
            names.append(top)  # other depths: the stage end, not blocks paired by position
        else:
            names += [f"{top}.{n}" for n, _ in kids]
    return names


@dataclass
class _Probe:
    shape: object = None  # None: not reached; a tuple; or the output's type name
    calls: int = 0
    overwritten: bool = False


@torch.no_grad()
def _probe(model: nn.Module, names: Sequence[str], x: Tensor) -> dict[str, _Probe]:
    """Each named module's output shape on ``x``, how often it ran, whether a later op overwrote it."""
    mods = dict(model.named_modules())
    seen = {n: _Probe() for n in names}
    outs: dict[str, tuple[Tensor, int]] = {}
    hooks = []
    for name in names:
        def hook(_m: nn.Module, _i: object, out: object, _name: str = name) -> None:
            p = seen[_name]
            p.calls += 1
            p.shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            if isinstance(out, Tensor):
                outs[_name] = (out, out._version)
        hooks.append(mods[name].register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}  # restored one by one: frozen BN stays frozen
    model.eval()
    try:
        model(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
        for h in hooks:
            h.remove()
    for name, (out, version) in outs.items():
        seen[name].overwritten = out._version != version
    return seen


def _problems(s: _Probe, t: _Probe) -> str | None:
    for p in (s, t):
        if p.calls != 1:
            return f"runs {p.calls} times per forward" if p.calls else "does not run in the forward"
        if not isinstance(p.shape, tuple):
            return f"returns a {p.shape}, not a tensor"
        if p.overwritten:
            return "its output is overwritten in place by a later op (e.g. ReLU(inplace=True))"
    if s.shape != t.shape:
        return f"output shapes differ (student {s.shape}, teacher {t.shape})"
    return None


def resolve_feature_layers(
    student: nn.Module, teacher: nn.Module, spec: str | Sequence[str], example: Tensor
) -> list[str]:
    """The module names whose outputs are distilled: ``spec`` is ``"auto"`` or a list of names.

    ``example``: a probe batch ``(N, C, H, W)`` on the models' device (one forward of each model in eval
    mode, without gradients; every module's train/eval mode is restored). Explicit names must exist in both
    models, run once per forward, give tensor outputs of the same shape that no later in-place op overwrites;
    ``"auto"`` keeps the block outputs (module docstring) that do. Raises ``ValueError`` naming
    ``distill_features`` and each refused module with its reason.
    """
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"distill_features must be 'auto' or a list of module names, but got {spec!r}")
        s_mods = dict(student.named_modules())
        names = _auto_candidates(student, teacher)
        absent = [n for n in names if n not in s_mods]
        names = [n for n in names if n in s_mods]
        t_seen, s_seen = _probe(teacher, names, example), _probe(student, names, example)
        why = {n: _problems(s_seen[n], t_seen[n]) for n in names}
        keep = [n for n in names if why[n] is None]
        if not keep:
            refused = {n: w for n, w in why.items()} | dict.fromkeys(absent, "not in the student")
            raise ValueError(
                "distill_features='auto' found no block output shared by student and teacher (composite children "
                "and pooling layers of the teacher's top-level nn.Sequential modules); "
                + (f"candidates refused: {dict(list(refused.items())[:8])}; " if refused else "no candidates; ")
                + "pass module names (distill_features=[...], --distill-features a,b) whose outputs match"
            )
        return keep
    names = list(spec)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"distill_features must be 'auto' or a non-empty list of module names, but got {spec!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"distill_features: modules named more than once: {dup}")
    for which, model in (("student", student), ("teacher", teacher)):
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise ValueError(f"distill_features: the {which} has no module {missing} (its modules: "
                             f"{[n for n in mods if n][:12]} ...)")
    t_seen, s_seen = _probe(teacher, names, example), _probe(student, names, example)
    bad = {n: w for n in names if (w := _problems(s_seen[n], t_seen[n])) is not None}
    if bad:
        raise ValueError(f"distill_features: these modules cannot be distilled: {bad}")
    return names


class FeatureDistill:
    """Collects the outputs of ``names`` in student and teacher during a training step; ``loss()`` compares them.

    Hooks record only while active (inside ``with``: the training step), so evaluation forwards keep
    nothing. Use::

        fd = FeatureDistill(student, teacher, names)
        with fd:
            out = student(x); t_out = teacher(x)          # teacher under torch.no_grad()
            loss = distill_loss(...) + beta * fd.loss()
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str], weight: float = 1.0) -> None:
        self.names = list(names)
        self.weight = float(weight)  # beta: the trainer adds weight * loss()
        self.active = False
        self._s: dict[str, tuple[Tensor, int]] = {}
        self._t: dict[str, tuple[Tensor, int]] = {}
        self._hooks = []
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        for name in self.names:
            self._hooks.append(s_mods[name].register_forward_hook(self._record(self._s, name)))
            self._hooks.append(t_mods[name].register_forward_hook(self._record(self._t, name)))

    def _record(self, store: dict[str, tuple[Tensor, int]], name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _i: object, out: Tensor) -> None:
            if self.active:
                if name in store:
                    raise RuntimeError(f"feature distillation: module {name!r} ran twice in one forward")
                store[name] = (out, out._version)
        return hook

    def __enter__(self) -> FeatureDistill:
        self.release()
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False

    def loss(self) -> Tensor:
        """``mean_l ||s_l - t_l||^2 / ||t_l||^2`` in float32 over the outputs recorded in this step (a scalar).

        A module whose teacher output is all zeros counts its absolute error. Raises ``RuntimeError`` when a
        module did not run or its output was overwritten in place after it was recorded.
        """
        missing = [n for n in self.names if n not in self._s or n not in self._t]
        if missing:
            raise RuntimeError(f"feature distillation: modules {missing} did not run in this step's forward")
        terms = []
        for n in self.names:
            (s, sv), (t, tv) = self._s[n], self._t[n]
            if s._version != sv or t._version != tv:
                raise RuntimeError(f"feature distillation: the output of {n!r} was overwritten in place after "
                                   "it was recorded (e.g. by ReLU(inplace=True)): distil another module")
            s, t = s.float(), t.detach().float()
            t2 = t.pow(2).sum()
            terms.append((s - t).pow(2).sum() / torch.where(t2 > 0, t2, torch.ones_like(t2)))
        return torch.stack(terms).mean()

    def release(self) -> None:
        """Drop the recorded tensors (frees the activations once the backward pass has run)."""
        self._s.clear()
        self._t.clear()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.release()
