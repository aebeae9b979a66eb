"""Silence one misleading torch message at its source: the CUDA-toolkit probe of ``torch.utils.cpp_extension``.

Importing ``torch.utils.cpp_extension`` (``torch.utils.benchmark`` and every ``torch.compile`` on CPU do) with a
CUDA build of torch, a CUDA toolkit on the machine (``nvcc`` on ``PATH`` or ``CUDA_HOME``) and no GPU logs
"No CUDA runtime is found, using CUDA_HOME=..." once per process. It is noise on a CPU machine: nothing here
builds a CUDA extension. ``silence_cuda_home_probe`` drops exactly that record (a filter on the logger, so
every other warning of that module still shows) and imports nothing.
"""

from __future__ import annotations

import logging

__all__ = ["silence_cuda_home_probe"]

_LOGGER = "torch.utils.cpp_extension"


class _NoCudaRuntimeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def silence_cuda_home_probe() -> None:
    """Drop torch's "No CUDA runtime is found" record for the rest of the process (idempotent)."""
    log = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _NoCudaRuntimeFilter) for f in log.filters):
        log.addFilter(_NoCudaRuntimeFilter())
