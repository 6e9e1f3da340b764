"""Callback tests: one intra-op thread, and a seeded global RNG for every test.

With two threads on a loaded 2-core machine a tiny Hessian-vector product took 10-30 ms of
thread hand-off instead of under 1 ms. Every test module here gets one thread, set before its
module-scoped fixtures (a baseline trained with two threads would differ in the last bits
from a run with one), and the setting is put back afterwards.

Models are initialised and loaders shuffled from the global RNG, so every test starts from
the same seed: its numbers do not depend on which tests ran before it.
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
