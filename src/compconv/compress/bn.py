"""Batch-norm re-estimation: recompute every BN's running statistics on calibration batches.

After layers are replaced, the activations' means and variances shift; the BNs' stored statistics (from
the original training) no longer match. ``reestimate_bn`` resets them and runs the calibration batches
in train mode with ``momentum=None`` (a cumulative average over all batches, not an exponential one),
without gradients, then restores each module's mode and momentum. Parameters are not touched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["reestimate_bn"]


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
