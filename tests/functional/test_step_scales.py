"""The finite difference's step from each tensor's own scale: a mixed-scale model.

A layer fed raw features (inputs of scale 30, so its weights are small: rms 0.009) next to
a large-scale block (an embedding table of rms 19). One step from the rms of all weights
moved the small layer by nine times its own weights: λ₁ = 216 for 582 in float32, flagged
unconverged and blamed on "rounding of the dtype". Each matrix's own bound keeps its moves
within 1.5% of its weights; λ₁ is then within 1e-3 of the dense float64 value.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_curvature.errors import CurvatureCheckError
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.operator import finite_difference
from lightning_curvature.functional.operator.operator import HessianOperator
from tests.functional.cases import dense_hessian, seeded


class RawFeatures(nn.Module):
    """tanh(W x) over raw features (scale 30), plus a row of a large-scale table, to a head."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.table = nn.Parameter(torch.randn(50, 6) * 20.0)
        self.head = nn.Linear(6, 1)
        with torch.no_grad():
            self.first.weight.mul_(1 / 30)  # weights sized for inputs of scale 30

    def forward(self, batch: Any) -> torch.Tensor:
        x, rows = batch
        return self.head(torch.tanh(self.first(x)) + 0.01 * self.table[rows]).squeeze(-1)


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    inputs, y = batch
    return F.mse_loss(model(inputs), y)


def _case(dtype: torch.dtype) -> tuple[nn.Module, Any]:
    with seeded(0):
        model = RawFeatures()
        x, rows, y = torch.randn(16, 4) * 30, torch.randint(0, 50, (16,)), torch.randn(16)
    return model.to(dtype), ((x.to(dtype), rows), y.to(dtype))


def _dense_top() -> float:
    model, batch = _case(torch.float64)
    return float(torch.linalg.eigvalsh(dense_hessian(model, _loss, batch))[-1])


def test_the_mixed_scale_top_eigenvalue_within_1e3_of_the_dense_one() -> None:
    exact = _dense_top()
    model, batch = _case(torch.float32)
    out = hessian_eigenvalues(model, _loss, batch, backend="finite_difference")
    assert bool(out.converged[0])
    assert abs(float(out.eigenvalues[0]) - exact) <= 1e-3 * exact


def test_each_matrix_moves_by_its_own_scale() -> None:
    """The raw-feature layer's bound is ten times its own rms (floored at 0.01), the
    table's and the vectors' the overall rms: the step is the smallest over tensors."""
    model, batch = _case(torch.float32)
    with HessianOperator(model, _loss, batch, backend="finite_difference") as operator:
        operator.matvec(torch.ones(operator.size))
        scales = operator._finite_difference.scales
    assert scales is not None
    rms = {name: float(p.detach().pow(2).mean().sqrt()) for name, p in model.named_parameters()}
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    overall = float(weights.pow(2).mean().sqrt())
    names = [name for name, _ in model.named_parameters()]
    by_name = dict(zip(names, scales, strict=True))
    assert by_name["first.weight"] == 10 * max(rms["first.weight"], 0.01) < overall / 50
    assert by_name["table"] == by_name["first.bias"] == by_name["head.bias"]
    assert abs(by_name["table"] - overall) <= 1e-6 * overall
    assert finite_difference._OWN == 10.0


def test_one_step_from_all_weights_misses_the_top_eigenvalue() -> None:
    """The failure the per-tensor bounds fix: with the overall scale only, λ₁ was 63% off
    (216 for 582); the self-check (the step at ε and at ε/2) now refuses it."""
    exact = _dense_top()
    model, batch = _case(torch.float32)
    overall_only = finite_difference._OWN
    finite_difference._OWN = float("inf")
    try:
        with pytest.raises(CurvatureCheckError, match="step is too large"):
            hessian_eigenvalues(model, _loss, batch, backend="finite_difference")
    finally:
        finite_difference._OWN = overall_only
    assert exact > 0
