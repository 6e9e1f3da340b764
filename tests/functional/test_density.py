"""Stochastic Lanczos quadrature: ``spectral_density`` and ``density_on_grid``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_curvature.functional.density import density_on_grid, spectral_density
from lightning_curvature.functional.linalg.sampling import make_generator
from tests.functional.cases import CASES, CASES_BY_NAME, Case, mse, reference, seeded

CPU = torch.device("cpu")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_extreme_nodes_are_the_extreme_eigenvalues(case: Case) -> None:
    model, loss_fn, batch = case.build()
    hessian, exact = reference(case.name)
    size = hessian.shape[0]
    esd = spectral_density(model, loss_fn, batch, num_steps=size, num_runs=2)
    scale = float(exact.abs().max())
    for nodes, weights in zip(esd.nodes, esd.weights, strict=True):
        live = nodes[weights > 0]
        assert float(live.max()) == pytest.approx(float(exact[0]), abs=1e-8 * scale)
        assert float(live.min()) == pytest.approx(float(exact[-1]), abs=1e-8 * scale)
    assert esd.num_hvps <= 2 * size
    assert esd.num_parameters == size


def test_extreme_nodes_converge_before_the_full_dimension() -> None:
    case = CASES_BY_NAME["transformer_layer"]  # P = 169
    model, loss_fn, batch = case.build()
    _, exact = reference(case.name)
    esd = spectral_density(model, loss_fn, batch, num_steps=60)
    assert esd.num_hvps == 60
    assert float(esd.nodes.max()) == pytest.approx(float(exact[0]), rel=1e-6)
    assert float(esd.nodes.min()) == pytest.approx(float(exact[-1]), rel=1e-6)


@pytest.mark.parametrize("case", CASES[:4], ids=repr)
def test_weights_sum_to_one_per_run_and_density_integrates_to_one(case: Case) -> None:
    model, loss_fn, batch = case.build()
    esd = spectral_density(model, loss_fn, batch, num_steps=12, num_runs=3)
    assert esd.nodes.shape == esd.weights.shape == (3, 12)
    assert esd.num_hvps == 36
    torch.testing.assert_close(esd.weights.sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert (esd.weights >= 0).all()
    grid, density = esd.density()
    assert grid.shape == density.shape == (512,)
    assert (density >= 0).all()
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-5)


def test_runs_estimate_the_trace() -> None:
    """P · Σ τθ is a single-probe Hutchinson estimate per run: averaged over many runs it
    approaches tr(H)."""
    case = CASES_BY_NAME["mlp_gelu"]
    model, loss_fn, batch = case.build()
    hessian, _ = reference(case.name)
    esd = spectral_density(model, loss_fn, batch, num_steps=4, num_runs=300)
    per_run = esd.num_parameters * (esd.nodes * esd.weights).sum(dim=1)
    error = float(per_run.std()) / 300**0.5
    assert abs(float(per_run.mean()) - float(hessian.trace())) <= 4 * error


def test_steps_are_capped_at_the_parameter_count() -> None:
    case = CASES_BY_NAME["least_squares"]  # P = 6
    model, loss_fn, batch = case.build()
    _, exact = reference(case.name)
    esd = spectral_density(model, loss_fn, batch, num_steps=20)
    assert esd.nodes.shape == (1, 6)
    torch.testing.assert_close(esd.nodes[0].sort().values, exact.flip(0), atol=1e-10, rtol=0)


def test_early_breakdown_pads_with_zero_weight() -> None:
    """n = 3 < d = 12: H = 2XᵀX/n has 3 non-zero eigenvalues and 0, so the Krylov space is
    invariant after 4 products; the other 6 nodes are padding of weight 0."""
    with seeded(5):
        x = torch.randn(3, 12, dtype=torch.float64)
        model = nn.Linear(12, 1, bias=False).to(torch.float64)
    y = torch.zeros(3, 1, dtype=torch.float64)
    exact = torch.linalg.eigvalsh(2 * x.T @ x / 3)
    esd = spectral_density(model, mse, (x, y), num_steps=10)
    assert esd.nodes.shape == (1, 10)
    assert esd.num_hvps == 4
    live = esd.weights[0] > 0
    assert int(live.sum()) == 4
    assert float(esd.weights[0].sum()) == pytest.approx(1.0, abs=1e-12)
    found = esd.nodes[0][live].sort().values
    torch.testing.assert_close(found[1:], exact[-3:], atol=1e-10, rtol=0)
    assert float(found[0]) == pytest.approx(0.0, abs=1e-10)


def test_density_on_grid_is_the_kernel_sum() -> None:
    nodes = torch.tensor([[0.0, 1.0, 3.0], [0.5, 1.0, 2.0]], dtype=torch.float64)
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]], dtype=torch.float64)
    grid = torch.tensor([-1.0, 0.25, 1.0, 2.5], dtype=torch.float64)
    sigma = 0.4
    _, density = density_on_grid(nodes, weights, grid, sigma=sigma)
    for point, value in zip(grid.tolist(), density.tolist(), strict=True):
        expected = 0.0
        for node, weight in zip(
            nodes.reshape(-1).tolist(), weights.reshape(-1).tolist(), strict=True
        ):
            gauss = math.exp(-0.5 * ((point - node) / sigma) ** 2) / (
                sigma * math.sqrt(2 * math.pi)
            )
            expected += weight * gauss / 2
        assert value == pytest.approx(expected, rel=1e-12)


def test_density_default_grid_and_width() -> None:
    nodes = torch.tensor([-2.0, 0.0, 8.0], dtype=torch.float64)
    weights = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    grid, density = density_on_grid(nodes, weights, num_points=2001)
    sigma = 0.01 * 10.0
    assert float(grid[0]) == pytest.approx(-2.0 - 5 * sigma)
    assert float(grid[-1]) == pytest.approx(8.0 + 5 * sigma)
    peak = 1 / (sigma * math.sqrt(2 * math.pi))
    assert float(density.max()) == pytest.approx(0.5 * peak, rel=1e-3)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-5)


def test_same_seed_same_nodes() -> None:
    case = CASES_BY_NAME["mlp_tanh"]
    model, loss_fn, batch = case.build()
    first, second, other = (
        spectral_density(model, loss_fn, batch, num_steps=5, generator=make_generator(CPU, s))
        for s in (2, 2, 3)
    )
    assert torch.equal(first.nodes, second.nodes)
    assert torch.equal(first.weights, second.weights)
    assert not torch.equal(first.weights, other.weights)
