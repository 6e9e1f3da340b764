"""Unequal batches on two processes (threads play them): every reduced quantity is the union's.

The operator's products and gradient, and the losses and gradient of ``DisplacedLoss`` (loss
slices, critical sharpness), each process weighted by its share of the examples, against the
same quantity of the union batch on one process. Before, the processes' values were averaged
with equal weights.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_curvature.functional.distributed.agreement import agreed
from lightning_curvature.functional.distributed.union import UnionMean
from lightning_curvature.functional.operator.displaced_loss import DisplacedLoss
from lightning_curvature.functional.operator.operator import HessianOperator
from tests.functional.test_agreement import Processes

SIZES = (6, 2)  # examples on process 0 and process 1


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return (model(x).squeeze(-1) - y).pow(2).mean()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SIZES), 3, generator=g, dtype=torch.float64)
    y = torch.randn(sum(SIZES), generator=g, dtype=torch.float64)
    return [(x[: SIZES[0]], y[: SIZES[0]]), (x[SIZES[0] :], y[SIZES[0] :])]


def _on_processes(measure: Any) -> list[Any]:
    """``measure(model, batch, all_reduce)`` on two simulated processes with unequal batches."""
    processes, batches = Processes(), _batches()
    models = [_model() for _ in SIZES]  # (built here: threads would share the global RNG)

    def on(rank: int) -> Any:
        all_sum = agreed(processes.sum_in_place(rank))
        return measure(models[rank], batches[rank], lambda t: all_sum(t).div_(2))

    results = processes.run(on)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _union() -> tuple[torch.Tensor, torch.Tensor]:
    batches = _batches()
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_the_operator_is_the_union_batchs() -> None:
    v = torch.linspace(-1.0, 1.0, 21, dtype=torch.float64)

    def products(model: nn.Module, batch: Any, all_reduce: Any) -> tuple[torch.Tensor, ...]:
        with HessianOperator(model, _loss, batch, all_reduce=all_reduce) as operator:
            return operator.matvec(v), operator.gradient()

    with HessianOperator(_model(), _loss, _union()) as union:
        expected = (union.matvec(v), union.gradient())
    for got in _on_processes(products):
        for value, reference in zip(got, expected, strict=True):
            torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-14)
    equal = []
    for batch in _batches():
        with HessianOperator(_model(), _loss, batch) as operator:
            equal.append(operator.matvec(v))
    assert not torch.allclose((equal[0] + equal[1]) / 2, expected[0], rtol=1e-3)  # (the bug)


def test_displaced_losses_are_the_union_batchs() -> None:
    step = torch.full((21,), 0.1, dtype=torch.float64)

    def losses(model: nn.Module, batch: Any, all_reduce: Any) -> tuple[torch.Tensor, ...]:
        with DisplacedLoss(model, _loss, batch, all_reduce=all_reduce) as displaced:
            return (displaced.at(step), *displaced.gradient())

    with DisplacedLoss(_model(), _loss, _union()) as union:
        expected = (union.at(step), *union.gradient())
    for got in _on_processes(losses):
        for value, reference in zip(got, expected, strict=True):
            torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("size", "per_process", "share"), [(6, 4.0, 1.5), (2, 4.0, 0.5), (4, 4.0, 1.0)]
)
def test_a_process_share_is_its_examples_over_the_mean(
    size: int, per_process: float, share: float
) -> None:
    assert UnionMean.share_of(size, per_process) == share


def test_an_unknown_size_anywhere_gives_equal_weights() -> None:
    union = UnionMean.of(lambda t: t, None, torch.device("cpu"))
    assert union.share == 1.0
    unknown_elsewhere = UnionMean.of(
        lambda t: t + torch.tensor([0.0, 0.5], dtype=t.dtype), 3, torch.device("cpu")
    )
    assert unknown_elsewhere.share == 1.0
