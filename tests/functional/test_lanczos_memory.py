"""The Lanczos basis grows with the steps a run takes, not with its budget (issue 14, 4)."""

from __future__ import annotations

import math

import torch

from lightning_curvature.functional.linalg.lanczos import LanczosProcess

BLOCK = 8  # rows allocated at a time (functional/linalg/lanczos.py)


def _allocated_rows(run: LanczosProcess) -> int:
    return run.allocated_rows


def test_rows_follow_the_steps_taken_within_a_block_of_eight() -> None:
    size, budget = 2_000, 500  # the old preallocation: (budget + 1) rows
    values = torch.linspace(1.0, 2.0, size, dtype=torch.float64)
    start = torch.randn(size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = LanczosProcess(lambda v: values * v, start, budget)
    assert _allocated_rows(run) == BLOCK
    for steps in range(1, 41):
        assert run.step()
        stored = steps + 1  # the next start vector is stored with each step
        assert _allocated_rows(run) == BLOCK * math.ceil(stored / BLOCK)
    assert _allocated_rows(run) == 48  # not budget + 1 = 501
    assert run.basis.shape == (41, size)


def test_the_last_block_stops_at_the_budget() -> None:
    size, budget = 100, 10
    start = torch.ones(size, dtype=torch.float64)
    values = torch.arange(1.0, size + 1.0, dtype=torch.float64)
    run = LanczosProcess(lambda v: values * v, start, budget)
    while run.step():
        pass
    assert run.num_steps == budget
    assert _allocated_rows(run) == budget + 1  # 8 + 3: never beyond the budget's rows
