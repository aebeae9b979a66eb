"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test with one intra-op thread, restoring the count after.

    Tests of many tiny ops (gradgradcheck, MAC counting, candidate building): on a loaded 2-core machine the
    threads of each op spin-wait for a CPU (measured: 60 s of CPU with 2 threads vs 1 s with 1 for one
    gradgradcheck). Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
