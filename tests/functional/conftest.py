"""Fixtures of the math-layer tests."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lightning_curvature.functional.linalg.lanczos import LanczosProcess

# The first forward-mode product loads torch's jvp decompositions, which call the deprecated
# torch.jit.script (a DeprecationWarning from inside torch 2.13). Load them once, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.func.jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run each test on one intra-op thread, then restore the previous setting.

    The tiny float64 models here gain nothing from threads, and on a shared 2-core machine
    two spinning threads per process made a 10-product probe about 20 times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _sdpa_backends_put_back() -> Iterator[None]:
    """Tests that play processes with threads enter ``sdpa_kernel`` contexts concurrently;
    the backends are global flags, so one thread can restore another's: put them back."""
    flags = ("flash", "mem_efficient", "math", "cudnn")
    cuda = torch.backends.cuda
    enabled = {name: getattr(cuda, f"{name}_sdp_enabled")() for name in flags}
    yield
    for name, on in enabled.items():
        getattr(cuda, f"enable_{name}_sdp")(on)


@pytest.fixture
def lanczos_runs(monkeypatch: pytest.MonkeyPatch) -> list[LanczosProcess]:
    """Every ``LanczosProcess`` the test makes, in order (to read how each holds its basis)."""
    made: list[LanczosProcess] = []
    original = LanczosProcess.__init__

    def spy(self: LanczosProcess, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(LanczosProcess, "__init__", spy)
    return made
