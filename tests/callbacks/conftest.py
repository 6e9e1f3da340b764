"""Callback tests run tiny models: one intra-op thread is faster and steadier for them.

With two threads on a loaded 2-core machine a tiny Hessian-vector product took 10-30 ms of
thread hand-off instead of under 1 ms. Every test module here gets one thread, set before its
module-scoped fixtures (a baseline trained with two threads would differ in the last bits
from a run with one), and the setting is put back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
