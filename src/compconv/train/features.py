"""Feature distillation: the student's intermediate outputs pulled towards the teacher's at named modules.

The loss added to the logit distillation (``distill_loss``) is, over the chosen modules ``l``,

    beta * mean_l  ||s_l - t_l||^2 / ||t_l||^2        (sums over the batch and every element)

the relative squared error of each feature map (FitNets, Romero et al. 2015, without a regressor: the
modules are chosen where student and teacher outputs already have the same shape, which is the case for a
model from ``compconv.compress``, where every converted conv keeps its output, and for block outputs of a
model pruned inside its blocks). Dividing by ``||t_l||^2`` makes every module count alike whatever its
activation scale, and ``beta`` independent of the depth of the modules chosen.

``"auto"`` picks the *block outputs*: the children of each top-level ``nn.Sequential`` of the teacher
(``layer1.0`` ... of a ResNet, ``features.3`` of a MobileNet, ``blocks.2`` of a timm EfficientNet), kept
where the student has a module of that name with an output of the same shape on a probe batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["FeatureDistill", "resolve_feature_layers"]


def _auto_candidates(teacher: nn.Module) -> list[str]:
    names: list[str] = []
    for top, child in teacher.named_children():
        if isinstance(child, nn.Sequential):
            names += [f"{top}.{sub}" for sub, _ in child.named_children()]
    return names


@torch.no_grad()
def _output_shapes(model: nn.Module, names: Sequence[str], x: Tensor) -> dict[str, object]:
    """The output shape of every named module on ``x`` (``None``: not reached; a type name: not a tensor)."""
    mods = dict(model.named_modules())
    shapes: dict[str, object] = dict.fromkeys(names)
    hooks = []
    for name in names:
        def hook(_m: nn.Module, _i: object, out: object, _name: str = name) -> None:
            shapes[_name] = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        hooks.append(mods[name].register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return shapes


def resolve_feature_layers(
    student: nn.Module, teacher: nn.Module, spec: str | Sequence[str], example: Tensor
) -> list[str]:
    """The module names whose outputs are distilled: ``spec`` is ``"auto"`` or a list of names.

    ``example``: a probe batch ``(N, C, H, W)`` on the models' device. Explicit names must exist in both
    models and give tensor outputs of the same shape; ``"auto"`` keeps the block outputs (module docstring)
    that do. Raises ``ValueError`` naming ``distill_features`` and the offending modules.
    """
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"distill_features must be 'auto' or a list of module names, but got {spec!r}")
        names = _auto_candidates(teacher)
        s_mods = dict(student.named_modules())
        names = [n for n in names if n in s_mods]
        t_shapes = _output_shapes(teacher, names, example)
        s_shapes = _output_shapes(student, names, example)
        keep = [n for n in names if isinstance(t_shapes[n], tuple) and t_shapes[n] == s_shapes[n]]
        if not keep:
            raise ValueError(
                "distill_features='auto' found no block output shared by student and teacher (children of the "
                "teacher's top-level nn.Sequential modules with the same name and output shape in the student): "
                "pass the module names (distill_features=[...], --distill-features a,b)"
            )
        return keep
    names = list(spec)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"distill_features must be 'auto' or a non-empty list of module names, but got {spec!r}")
    for which, model in (("student", student), ("teacher", teacher)):
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise ValueError(f"distill_features: the {which} has no module {missing} (its modules: "
                             f"{[n for n in mods if n][:12]} ...)")
    t_shapes = _output_shapes(teacher, names, example)
    s_shapes = _output_shapes(student, names, example)
    bad = {n: (s_shapes[n], t_shapes[n]) for n in names
           if not isinstance(t_shapes[n], tuple) or t_shapes[n] != s_shapes[n]}
    if bad:
        raise ValueError("distill_features: these modules' outputs differ between student and teacher or are "
                         f"not tensors (student, teacher): {bad}")
    return names


class FeatureDistill:
    """Collects the outputs of ``names`` in student and teacher during a training step; ``loss()`` compares them.

    Hooks record only while ``active`` (the training step), so evaluation forwards keep nothing. Use::

        fd = FeatureDistill(student, teacher, names)
        with fd:
            out = student(x); t_out = teacher(x)          # teacher under torch.no_grad()
            loss = distill_loss(...) + beta * fd.loss()
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str]) -> None:
        self.names = list(names)
        self.active = False
        self._s: dict[str, Tensor] = {}
        self._t: dict[str, Tensor] = {}
        self._hooks = []
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        for name in self.names:
            self._hooks.append(s_mods[name].register_forward_hook(self._record(self._s, name)))
            self._hooks.append(t_mods[name].register_forward_hook(self._record(self._t, name)))

    def _record(self, store: dict[str, Tensor], name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _i: object, out: Tensor) -> None:
            if self.active:
                store[name] = out
        return hook

    def __enter__(self) -> FeatureDistill:
        self._s.clear()
        self._t.clear()
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False

    def loss(self) -> Tensor:
        """``mean_l ||s_l - t_l||^2 / ||t_l||^2`` in float32 over the outputs recorded in this step (a scalar)."""
        missing = [n for n in self.names if n not in self._s or n not in self._t]
        if missing:
            raise RuntimeError(f"feature distillation: modules {missing} did not run in this step's forward")
        terms = []
        for n in self.names:
            s, t = self._s[n].float(), self._t[n].detach().float()
            terms.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
        return torch.stack(terms).mean()

    def release(self) -> None:
        """Clear the recorded tensors (frees the activations once the backward pass has run)."""
        self._s.clear()
        self._t.clear()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.release()
