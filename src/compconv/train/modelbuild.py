"""The run's model: ``check_names`` (fail fast on names and files) and ``build_model`` (name, file, object).

Kept apart from the training loop in ``engine`` (which re-exports both): where the model comes from is
described in ``sources``; this module turns a config into the model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from compconv.train.config import TrainConfig

__all__ = ["build_model", "check_names"]


def check_names(cfg: TrainConfig, *, files: bool = True) -> None:
    """Fail fast (before any data is read) on an unknown model or method name; with ``files``, on a missing
    weights / init / teacher file or an unknown teacher name."""
    from compconv import list_methods
    from compconv.models import get_model_builder
    from compconv.train.checkpoint import not_a_file

    if cfg.model_object is None and cfg.init is None:
        get_model_builder(cfg.model)  # ValueError listing close matches
    # files and teacher: before a new run reads any data (resume and eval load the run's own weights;
    # a resumed run's teacher is checked when it is built)
    for key in ("weights", "init", "teacher_weights") if files else ():
        f = getattr(cfg, key)
        if f is not None and not os.path.isfile(f):
            raise not_a_file(f, f"{key} file")
    if files and cfg.teacher is not None and not os.path.exists(cfg.teacher):
        get_model_builder(cfg.teacher)  # not a file or run directory: must be a model name
    if files and cfg.teacher is not None and os.path.isdir(cfg.teacher):
        from compconv.train.checkpoint import find_checkpoint

        find_checkpoint(cfg.teacher)  # a directory without checkpoints/last.pt: refused before the run dir exists
    if cfg.method is not None and cfg.method not in list_methods():
        raise ValueError(f"method must be one of {', '.join(list_methods())}, but got {cfg.method!r}")


def build_model(
    cfg: TrainConfig,
    num_classes: int,
    *,
    model: nn.Module | None = None,
    arch: dict[str, Any] | None = None,
    load_init: bool = True,
) -> nn.Module:
    """``get_model(cfg.model, num_classes=...)``, converted with ``cfg.method`` when set, binarized with
    ``compconv.binarize`` when ``cfg.binarize`` (seeded init). With ``cfg.binarize``, ``cfg.weights`` is loaded
    before binarizing when it holds the full-precision model, after when it holds the binarized one.

    ``model``: a model object to use instead of the name (``train(cfg, model=...)``; converted in place
    when ``cfg.method`` is set). ``arch``: a checkpoint's record of an ``init`` file's architecture
    (resume and eval rebuild it without the file). ``load_init``: load ``cfg.weights`` / ``cfg.init``'s
    weights (False on resume and eval, where the checkpoint's weights follow). Raises ValueError for a
    run trained on a model object when ``model`` is not given, or weights that do not fit.
    """
    from compconv.models import get_model
    from compconv.train import sources

    check_names(cfg, files=load_init)
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights, whatever came before
    if cfg.model_object is not None and model is None:
        raise ValueError(
            f"this run was trained on a model object of class {cfg.model_object} passed to train(model=...); "
            "it cannot be rebuilt from a name. Pass the same architecture again: "
            "train(resume=RUN, model=...) / evaluate_checkpoint(PATH, model=...)"
        )
    if model is not None:
        if cfg.model_object is not None and sources.model_class(model) != cfg.model_object:
            raise ValueError(f"the run was trained on a {cfg.model_object}, but model is a "
                             f"{sources.model_class(model)}")
    elif arch is not None or cfg.init is not None:
        arch = arch if arch is not None else sources.arch_of_save(str(cfg.init))
        model = sources.build_from_arch(arch)
        if load_init and cfg.init is not None:
            sources.load_weights(model, cfg.init, "init")
        if arch.get("binary"):  # a binarized file (train() then sets cfg.binarize): binarize once, never twice
            return model
        return _binarize(cfg, model)
    else:
        model = get_model(cfg.model, num_classes=num_classes)
    if cfg.method is not None:
        from compconv.convert import convert

        model, report = convert(model, cfg.method, return_report=True, **dict(cfg.method_options))
        if report.converted and all(r.params_after == r.params_before for r in report.converted):
            # e.g. CompConv depth 0: every "converted" layer is a plain conv of the same size
            raise ValueError(
                f"method {cfg.method!r} with options {dict(cfg.method_options)} converted "
                f"{len(report.converted)} convolutions of {cfg.model!r}, but every one keeps the plain "
                "conv's parameter count (e.g. depth 0 makes CompConv a plain conv); the run would train the "
                "vanilla model under the method's name. Change method_options (--method-opt / --c0 / --depth) "
                "or drop --method"
            )
        if not report.converted:
            # Training the unconverted model under the method's name would mislabel the result.
            reasons = sorted({r.reason for r in report.kept if getattr(r, "reason", None)})
            raise ValueError(
                f"method {cfg.method!r} with options {dict(cfg.method_options)} converted 0 of the "
                f"{len(report.layers)} convolutions of {cfg.model!r} (kept: {'; '.join(reasons) or 'no reason given'})"
                "; the run would train the vanilla model under the method's name. Change method_options "
                "(--method-opt / --c0 / --depth) or drop --method"
            )
    if not (load_init and cfg.weights is not None):
        return _binarize(cfg, model)
    if not cfg.binarize:
        try:
            sources.load_weights(model, cfg.weights)
        except ValueError as e:
            why = sources.binarized_source(cfg.weights)
            if why:  # the keys differ by .conv./.bn.: say what the file is, not only which keys
                raise ValueError(f"{e}. The weights file {why}: add --binarize to train it binarized") from None
            raise
        return model
    # --binarize --weights: full-precision weights of this model are loaded before binarizing (the two-step
    # recipe of Bi-Real Net / ReActNet: train full precision, then binarize from it); binarized weights after
    if set(sources.read_weights(cfg.weights)) == set(model.state_dict()):
        sources.load_weights(model, cfg.weights)
        return _binarize(cfg, model)
    model = _binarize(cfg, model)
    try:
        sources.load_weights(model, cfg.weights)
    except ValueError as e:
        raise ValueError(
            f"{e}. With --binarize, --weights must hold either the full-precision model (loaded before binarizing) "
            "or the binarized one (a --binarize run's checkpoint, loaded after); the file fits neither"
        ) from None
    recorded = sources.recorded_binary(cfg.weights)
    if recorded:  # the options are not in the weights (K has no tensor): they loaded, but would run otherwise
        from compconv.binary.transform import spec_difference

        diff = spec_difference(recorded, model)
        if diff:
            raise ValueError(
                f"weights file {cfg.weights!r} was binarized otherwise than --binarize binarizes (compconv.binarize's "
                f"defaults): {diff}. Start from the file's own architecture with --init {cfg.weights} instead"
            )
    return model


def _binarize(cfg: TrainConfig, model: nn.Module) -> nn.Module:
    """``compconv.binarize(model)`` (its defaults) when ``cfg.binarize``; the model unchanged otherwise.

    The input BNs it adds are initialised deterministically (weight 1, bias 0), so the seeded init stays the
    same on resume. (An already binarized init file is not passed here: it is binarized once, as recorded.)
    """
    if not cfg.binarize:
        return model
    from compconv.binary.transform import binarize

    return binarize(model)
