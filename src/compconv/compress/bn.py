"""Batch-norm statistics after layers are replaced: two ways to make them the network's own.

After layers are replaced, the activations' means and variances shift; the BNs' stored statistics (from
the original training) no longer match.

* ``reestimate_bn`` resets them and runs the calibration batches in train mode with ``momentum=None`` (a
  cumulative average over all batches, not an exponential one), without gradients, then restores each
  module's mode and momentum. Parameters are not touched, so the eval-mode outputs change.
* ``reparametrize_bn`` sets each BN's running statistics to the ones its input has in the eval-mode network
  and moves the change into its affine parameters, so the eval-mode outputs stay the same (up to float
  rounding) while training mode (batch statistics) computes nearly what eval mode does. A fine-tune of a
  warm-started model then starts from the warm start instead of from what batch statistics make of it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["reestimate_bn", "reparametrize_bn"]


def reestimate_bn(model: nn.Module, batches: list[Tensor]) -> int:
    """Re-estimate the running statistics of every ``BatchNorm`` in ``model``; returns how many there are.

    ``batches``: model inputs, e.g. ``(N, C, H, W)``. The model ends in the mode it started in (train or
    eval). Raises ``ValueError`` when ``batches`` is empty.
    """
    if not batches:
        raise ValueError("reestimate_bn needs at least one calibration batch")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in norms]
    try:
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: every batch weighs the same
            bn.train()
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for bn, mom in zip(norms, momenta, strict=True):
            bn.momentum = mom
        for m, mode in modes.items():
            m.train(mode)
    return len(norms)


def reparametrize_bn(model: nn.Module, batches: Any) -> int:
    """Give every affine ``BatchNorm`` the statistics of its own input, keeping the eval-mode function; returns
    how many were changed.

    One eval-mode pass over ``batches`` (what ``compress`` takes as ``calib``: a tensor, a list of tensors or
    ``(input, label)`` pairs, a DataLoader; inputs e.g. ``(N, C, H, W)``) measures each BN input's
    per-channel mean ``m`` and variance ``v`` (unbiased, as BN's running_var). With the stored ``mu``, ``var``,
    ``gamma``, ``beta`` and ``eps``, eval BN computes ``gamma (x - mu) / sqrt(var + eps) + beta``; it becomes

        running_mean = m, running_var = v,
        gamma' = gamma sqrt(v + eps) / sqrt(var + eps),  beta' = beta + gamma (m - mu) / sqrt(var + eps),

    the same affine map of ``x``. Since no eval output changes, every BN's statistics come from the one pass.
    In training mode each BN then normalises with batch statistics close to ``m``, ``v``, so train-mode outputs
    are close to eval-mode ones and momentum updates of the running statistics barely move them.
    BNs without affine parameters or running statistics are left as they are (not counted). A BN called
    more than once per forward gets the pooled statistics of all its inputs (its eval map is still kept, but
    training mode then differs per call). Computed in float64; the model ends in the mode it started in.
    Raises ``ValueError`` when ``batches`` yields nothing or holds NaN / inf, ``TypeError`` for other input.
    """
    from compconv.compress.calib import as_batches, first_non_finite

    try:
        batches = as_batches(batches)
    except ValueError as e:
        raise ValueError(f"reparametrize_bn needs at least one calibration batch ({e})") from None
    bad = first_non_finite(batches)
    if bad is not None:  # NaN statistics would turn every gamma / beta into NaN
        raise ValueError(f"batch {bad} holds non-finite values (NaN or inf): check the data and its normalisation")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats and m.affine and m.running_mean is not None]
    if not norms:
        return 0
    sums: dict[nn.Module, list[Tensor | int]] = {bn: [0, 0, 0] for bn in norms}

    def measure(bn: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].detach().double().transpose(0, 1).reshape(inputs[0].shape[1], -1)  # (C, N * spatial)
        acc = sums[bn]
        acc[0] = acc[0] + x.sum(1)
        acc[1] = acc[1] + (x * x).sum(1)
        acc[2] = int(acc[2]) + x.shape[1]

    handles = [bn.register_forward_pre_hook(measure) for bn in norms]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    names = {m: n for n, m in model.named_modules()}
    new: list[tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]] = []
    with torch.no_grad():
        for bn in norms:
            s1, s2, n = sums[bn]
            if not n:  # not on the forward path of these inputs
                continue
            mean = s1 / n  # type: ignore[operator]
            var = (s2 / n - mean * mean).clamp_min(0) * (n / max(int(n) - 1, 1))  # type: ignore[operator]
            mu, old_var = bn.running_mean.double(), bn.running_var.double()
            gamma, beta = bn.weight.double(), bn.bias.double()
            old_std, new_std = (old_var + bn.eps).sqrt(), (var + bn.eps).sqrt()
            new.append((bn, gamma * new_std / old_std, beta + gamma * (mean - mu) / old_std, mean, var))
        bad = next((names[t[0]] for t in new if not all(torch.isfinite(v).all() for v in t[1:])), None)
        if bad is not None:  # checked before anything is written: the model is left as it was
            raise ValueError(f"the input of BN {bad!r} has non-finite values on these batches; nothing was changed")
        for bn, weight, bias, mean, var in new:
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return len(new)
