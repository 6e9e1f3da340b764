"""``hessian_eigenvalues`` against the exact spectrum of every tiny case."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.linalg.sampling import make_generator
from tests.functional.cases import CASES, CASES_BY_NAME, Case, reference, seeded

CPU = torch.device("cpu")


def _relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((estimate - exact).abs() / exact.abs()).max())


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_top5_at_tight_tolerance(case: Case) -> None:
    model, loss_fn, batch = case.build()
    hessian, exact = reference(case.name)
    size = hessian.shape[0]
    out = hessian_eigenvalues(
        model, loss_fn, batch, k=5, tol=1e-10, max_iter=size, return_eigenvectors=True
    )
    assert out.eigenvalues.shape == (5,)
    assert out.eigenvalues.dtype == torch.float64
    assert _relative_error(out.eigenvalues, exact[:5]) < 1e-6
    assert out.converged.all()
    assert out.num_hvps <= size
    assert out.eigenvectors is not None
    # Each Ritz pair satisfies H y = θ y up to its reported residual.
    residuals = (out.eigenvectors @ hessian - out.eigenvalues[:, None] * out.eigenvectors).norm(
        dim=1
    )
    torch.testing.assert_close(residuals, out.residuals, atol=1e-10, rtol=1e-6)
    assert (residuals <= 1e-4 * exact[0].abs()).all()


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_top5_at_default_tolerance(case: Case) -> None:
    model, loss_fn, batch = case.build()
    _, exact = reference(case.name)
    out = hessian_eigenvalues(model, loss_fn, batch, k=5)
    assert out.converged.all()
    assert _relative_error(out.eigenvalues, exact[:5]) < 1e-3


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_smallest_eigenvalue_on_request(case: Case) -> None:
    model, loss_fn, batch = case.build()
    hessian, exact = reference(case.name)
    out = hessian_eigenvalues(
        model, loss_fn, batch, tol=1e-8, max_iter=hessian.shape[0], smallest=True
    )
    assert out.smallest_converged
    assert out.smallest_eigenvalue is not None
    assert float(out.smallest_eigenvalue) == pytest.approx(
        float(exact[-1]), abs=1e-6 * float(exact.abs().max())
    )
    plain = hessian_eigenvalues(model, loss_fn, batch, tol=1e-8, max_iter=hessian.shape[0])
    assert plain.smallest_eigenvalue is None
    assert plain.smallest_converged is None


def _weighted_squares(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, a = batch
    return (a * model(x).squeeze(-1) ** 2).mean()


def test_indefinite_hessian_largest_algebraic_first() -> None:
    """H = 2 Xᵀ diag(a) X / n with one strongly negative weight: λ_min = −|λ|_max."""
    with seeded(7):
        x = torch.randn(12, 6, dtype=torch.float64)
        model = nn.Linear(6, 1, bias=False).to(torch.float64)
    a = torch.ones(12, dtype=torch.float64)
    a[0] = -40.0
    exact = torch.linalg.eigvalsh(2 * x.T @ (a[:, None] * x) / 12).flip(0)
    assert exact[-1].abs() > 2 * exact[0]  # the negative end dominates in magnitude
    out = hessian_eigenvalues(model, _weighted_squares, (x, a), k=2, tol=1e-10, smallest=True)
    torch.testing.assert_close(out.eigenvalues, exact[:2], atol=1e-9, rtol=0)
    assert out.eigenvalues[0] > 0
    assert out.smallest_eigenvalue is not None
    assert float(out.smallest_eigenvalue) == pytest.approx(float(exact[-1]), abs=1e-9)


def test_warm_start_uses_fewer_products() -> None:
    """After a small change of the weights, starting from the previous eigenvectors
    reaches the same tolerance in fewer Hessian-vector products than a cold start."""
    case = CASES[3]  # cnn_batchnorm_eval
    model, loss_fn, batch = case.build()
    first = hessian_eigenvalues(model, loss_fn, batch, k=1, tol=1e-6, return_eigenvectors=True)
    assert first.eigenvectors is not None
    with seeded(11), torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    cold = hessian_eigenvalues(model, loss_fn, batch, k=1, tol=1e-6)
    warm = hessian_eigenvalues(model, loss_fn, batch, k=1, tol=1e-6, init=first.eigenvectors)
    assert warm.converged.all()
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, atol=0, rtol=1e-5)
    assert warm.num_hvps < cold.num_hvps


def test_warm_start_from_one_vector_or_several() -> None:
    case = CASES[0]
    model, loss_fn, batch = case.build()
    _, exact = reference(case.name)
    first = hessian_eigenvalues(model, loss_fn, batch, k=3, tol=1e-8, return_eigenvectors=True)
    assert first.eigenvectors is not None
    for init in (first.eigenvectors, first.eigenvectors[0]):
        again = hessian_eigenvalues(model, loss_fn, batch, k=3, tol=1e-8, init=init)
        assert _relative_error(again.eigenvalues, exact[:3]) < 1e-6


def test_warm_start_holds_the_eigenvectors_and_the_ritz_vector_below_them() -> None:
    case = CASES[0]
    model, loss_fn, batch = case.build()
    hessian, exact = reference(case.name)
    out = hessian_eigenvalues(model, loss_fn, batch, k=2, tol=1e-6, return_eigenvectors=True)
    assert out.eigenvectors is not None
    assert out.warm_start is not None
    assert out.warm_start.shape == (3, hessian.shape[0])
    assert torch.equal(out.warm_start[:2], out.eigenvectors)
    gram = out.warm_start @ out.warm_start.T
    torch.testing.assert_close(gram, torch.eye(3, dtype=gram.dtype), atol=1e-10, rtol=0)
    # the third is λ₃'s Ritz vector: its Rayleigh quotient is λ₃ (a cold run goes on
    # until a missed eigenvalue is improbable, far past tol)
    third = out.warm_start[2]
    assert float(third @ hessian @ third) == pytest.approx(
        float(exact[2]), abs=1e-6 * float(exact[0])
    )
    assert hessian_eigenvalues(model, loss_fn, batch).warm_start is None


@pytest.mark.parametrize("name", ["cnn_batchnorm_eval", "least_squares"])
def test_warm_start_from_the_k_plus_one_ritz_vectors_beats_the_eigenvectors(name: str) -> None:
    """The guard also converges the Ritz value below the top k; a start that holds its
    vector too gets there sooner (CNN: 3 products against 5 from the eigenvector alone)."""
    model, loss_fn, batch = CASES_BY_NAME[name].build()
    first = hessian_eigenvalues(model, loss_fn, batch, return_eigenvectors=True)
    with seeded(11), torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(3e-2 * torch.randn_like(p))
    from_eigenvector = hessian_eigenvalues(model, loss_fn, batch, init=first.eigenvectors)
    from_warm_start = hessian_eigenvalues(model, loss_fn, batch, init=first.warm_start)
    assert from_warm_start.converged.all()
    torch.testing.assert_close(
        from_warm_start.eigenvalues, from_eigenvector.eigenvalues, atol=0, rtol=1e-3
    )
    assert from_warm_start.num_hvps < from_eigenvector.num_hvps


def test_preconditioned_eigenvalues_are_those_of_dhd() -> None:
    case = CASES[0]
    model, loss_fn, batch = case.build()
    hessian, _ = reference(case.name)
    scale = torch.linspace(0.5, 2.0, hessian.shape[0], dtype=torch.float64)
    exact = torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :]).flip(0)
    out = hessian_eigenvalues(
        model, loss_fn, batch, k=2, tol=1e-10, max_iter=hessian.shape[0], preconditioner=scale
    )
    assert _relative_error(out.eigenvalues, exact[:2]) < 1e-8


def test_same_generator_seed_same_result_and_global_rng_unused() -> None:
    case = CASES[0]
    model, loss_fn, batch = case.build()
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        runs.append(hessian_eigenvalues(model, loss_fn, batch, k=2, tol=1e-4))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0].eigenvalues, runs[1].eigenvalues)
    seeded_runs = [
        hessian_eigenvalues(model, loss_fn, batch, k=2, tol=1e-4, generator=make_generator(CPU, s))
        for s in (5, 5, 6)
    ]
    assert torch.equal(seeded_runs[0].eigenvalues, seeded_runs[1].eigenvalues)
    assert not torch.equal(seeded_runs[0].eigenvalues, seeded_runs[2].eigenvalues)


def test_nonconvergence_warns_and_flags() -> None:
    case = CASES[5]  # transformer_layer
    model, loss_fn, batch = case.build()
    with pytest.warns(CurvatureWarning, match="did not certify"):
        out = hessian_eigenvalues(model, loss_fn, batch, k=5, tol=1e-12, max_iter=6)
    assert out.num_hvps == 6
    assert not out.converged.all()


def _edge_of_stability_model(ratio: float) -> tuple[nn.Module, Callable[..., Tensor], Tensor]:
    """A float32 linear model whose loss ``½ mean((x·w)²)`` has the Hessian
    ``diag(1, ratio, 0.97·e^{−j/12})`` (P = 500): a top pair over a decaying cluster, the
    shape of the digits edge-of-stability Hessians."""
    j = torch.arange(498, dtype=torch.float64)
    top = torch.tensor([1.0, ratio], dtype=torch.float64)
    spectrum = torch.cat([top, 0.97 * torch.exp(-j / 12)])
    inputs = torch.diag((500 * spectrum).sqrt()).float()
    return nn.Linear(500, 1, bias=False), lambda m, x: 0.5 * m(x).pow(2).mean(), inputs


@pytest.mark.parametrize("seed", [3, 43, 87])
def test_cold_certificate_is_the_largest_eigenvalue_in_float32(seed: int) -> None:
    """λ₂/λ₁ = 0.995: from these random starts the guard certified λ₂ (0.9954, 0.9950,
    0.9950; 16 of 100 seeds did). Cold runs now go on until a missed λ₁ is improbable."""
    model, loss_fn, inputs = _edge_of_stability_model(0.995)
    generator = torch.Generator().manual_seed(seed)
    out = hessian_eigenvalues(model, loss_fn, inputs, generator=generator)
    assert out.converged.tolist() == [True]
    assert abs(float(out.eigenvalues[0]) - 1.0) <= 1e-3 * float(out.eigenvalues[0])
    assert out.num_hvps <= 30


def test_no_false_cold_certificate_in_float32_and_warm_probes_stay_cheap() -> None:
    """20 random starts in float32, λ₂/λ₁ = 0.98 and 0.995: every one certified within
    ``tol`` of λ₁ (cold: 23-24 products). A warm start from a run's ``warm_start`` keeps
    the guard, not the bound on a missed eigenvalue (no chance can be computed for it), and
    with it its cost: a handful of products."""
    for ratio in (0.98, 0.995):
        model, loss_fn, inputs = _edge_of_stability_model(ratio)
        runs = [
            hessian_eigenvalues(
                model, loss_fn, inputs, generator=torch.Generator().manual_seed(seed)
            )
            for seed in range(20)
        ]
        assert all(bool(out.converged[0]) for out in runs)
        assert max(abs(float(out.eigenvalues[0]) - 1.0) for out in runs) <= 1e-3
        first = hessian_eigenvalues(model, loss_fn, inputs, return_eigenvectors=True)
        warm = hessian_eigenvalues(model, loss_fn, inputs, init=first.warm_start)
        assert warm.converged.tolist() == [True]
        assert abs(float(warm.eigenvalues[0]) - 1.0) <= 1e-3
        assert warm.num_hvps <= 6 < min(out.num_hvps for out in runs)


def test_a_looser_miss_probability_costs_fewer_products_cold_and_nothing_warm() -> None:
    """``miss_probability`` trades confidence for products on a cold run (21, 24 and 28
    products at 10⁻¹, 10⁻³ and 10⁻⁶ here) and is ignored from ``init``."""
    model, loss_fn, inputs = _edge_of_stability_model(0.995)
    cost = {
        miss: hessian_eigenvalues(model, loss_fn, inputs, miss_probability=miss).num_hvps
        for miss in (1e-1, 1e-3, 1e-6)
    }
    assert cost[1e-1] < cost[1e-3] < cost[1e-6] <= 38
    first = hessian_eigenvalues(model, loss_fn, inputs, return_eigenvectors=True)
    warm = [
        hessian_eigenvalues(model, loss_fn, inputs, init=first.warm_start, miss_probability=m)
        for m in (1e-1, 1e-6)
    ]
    assert warm[0].num_hvps == warm[1].num_hvps
    assert torch.equal(warm[0].eigenvalues, warm[1].eigenvalues)
