"""Fabric tests: one intra-op thread and a seeded global RNG, as the callback tests have.

One thread keeps a tiny probe from spending its time in thread hand-off on a loaded 2-core
machine, and makes a run with monitors and one without use the same kernels.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
