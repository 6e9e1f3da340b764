"""Stochastic Lanczos quadrature on two vectors where the whole basis is too large (issue 23)."""

from __future__ import annotations

import pytest
import torch

from lightning_curvature.functional.density import density_on_grid, spectral_density
from lightning_curvature.functional.linalg import basis
from lightning_curvature.functional.linalg.lanczos import LanczosProcess
from lightning_curvature.functional.linalg.quadrature import lanczos_quadrature
from tests.functional.cases import CASES_BY_NAME, reference


def _rotated(values: torch.Tensor, seed: int) -> torch.Tensor:
    n = values.numel()
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return (q * values.double()) @ q.T


def _l1(a: torch.Tensor, b: torch.Tensor, grid: torch.Tensor) -> float:
    return float(torch.trapezoid((a - b).abs(), grid))


def test_the_default_keeps_two_rows_only_above_the_budget(
    monkeypatch: pytest.MonkeyPatch, lanczos_runs: list[LanczosProcess]
) -> None:
    case = CASES_BY_NAME["mlp_gelu"]
    model, loss_fn, batch = case.build()
    whole = spectral_density(model, loss_fn, batch, num_steps=20, num_runs=2)
    monkeypatch.setattr(basis, "FULL_BASIS_ENTRIES", 1)
    bounded = spectral_density(model, loss_fn, batch, num_steps=20, num_runs=2)
    assert [run.keep for run in lanczos_runs] == [None, None, 2, 2]
    assert bounded.num_hvps == whole.num_hvps == 40
    torch.testing.assert_close(bounded.weights.sum(dim=1), torch.ones(2, dtype=torch.float64))
    # Twenty steps on a model of this size: no copies yet, the same quadrature.
    torch.testing.assert_close(bounded.nodes, whole.nodes, rtol=1e-4, atol=1e-6)
    _, exact = reference(case.name)
    assert float(bounded.nodes.max()) == pytest.approx(float(exact[0]), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_copies_of_converged_outliers_share_their_weight(dtype: torch.dtype) -> None:
    """Ten outliers converge long before step 120 and get copies without full
    reorthogonalisation; the smoothed density from the same start stays within 1e-4 (L1) of
    the whole basis' (its own error against the exact density is over 10x that), and the
    outliers' total weight is the same."""
    n = 600
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.logspace(1, 2, 10, dtype=torch.float64),
                        0.3 * torch.randn(n - 10, generator=gen, dtype=torch.float64)])  # fmt: skip
    matrix = _rotated(values, 1).to(dtype)
    sigma = 0.01 * float(values.max() - values.min())
    grid = torch.linspace(float(values.min()) - 5 * sigma, float(values.max()) + 5 * sigma,
                          2048, dtype=torch.float64)  # fmt: skip
    exact = density_on_grid(values, torch.full((n,), 1.0 / n, dtype=torch.float64), grid,
                            sigma=sigma)[1]  # fmt: skip
    for seed in range(3):
        start = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        found = {}
        for keep in (None, 2):
            run = LanczosProcess(lambda v: matrix @ v, start, 120, keep=keep)
            while run.step():
                pass
            nodes, vectors = torch.linalg.eigh(run.projection())
            found[keep] = (nodes, vectors[0, :] ** 2)
        whole, two = (density_on_grid(*found[keep], grid, sigma=sigma)[1] for keep in found)
        assert _l1(whole, two, grid) <= 1e-4 < 0.1 * _l1(whole, exact, grid)
        outliers = {keep: float(w[nodes > 5.0].sum()) for keep, (nodes, w) in found.items()}
        assert outliers[2] == pytest.approx(outliers[None], rel=1e-4)
        copies = {keep: int((nodes > 99.0).sum()) for keep, (nodes, _) in found.items()}
        assert copies[None] == 1
        assert copies[2] > 1  # the case the test is about happened


@pytest.mark.parametrize(("budget", "keep"), [(10 * 11, None), (10 * 11 - 1, 2)])
def test_lanczos_quadrature_keeps_the_whole_basis_while_it_fits(
    monkeypatch: pytest.MonkeyPatch,
    lanczos_runs: list[LanczosProcess],
    budget: int,
    keep: int | None,
) -> None:
    monkeypatch.setattr(basis, "FULL_BASIS_ENTRIES", budget)
    diagonal = torch.linspace(0.0, 1.0, 10, dtype=torch.float64)
    nodes, weights = lanczos_quadrature(lambda v: diagonal * v, torch.ones(10).double(), 10)
    assert [run.keep for run in lanczos_runs] == [keep]
    torch.testing.assert_close(nodes, diagonal)  # ten steps span the space either way
    torch.testing.assert_close(weights, torch.full((10,), 0.1, dtype=torch.float64))
