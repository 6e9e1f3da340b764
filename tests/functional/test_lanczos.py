"""Lanczos over plain symmetric matrices, where every eigenvalue is known."""

from __future__ import annotations

import pytest
import torch

from lightning_curvature.functional.linalg.eigenpairs import lanczos_eigenpairs
from lightning_curvature.functional.linalg.lanczos import LanczosProcess
from lightning_curvature.functional.linalg.quadrature import lanczos_quadrature

TOP_TWO = torch.tensor([45.0, 50.0], dtype=torch.float64)

D = torch.float64


def _random_start(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dtype=D, generator=torch.Generator().manual_seed(seed))


def _rotated(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix with the given spectrum in a random orthonormal basis."""
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(
        torch.randn(n, n, dtype=D, generator=torch.Generator().manual_seed(seed))
    )
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=D)) @ q.T


REPEATED_SPECTRA = [
    [5.0, 5.0, 3.0, 2.0, 1.0],
    [5.0, 5.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2],
    [4.0, 4.0, -9.0, 1.0, 1.0, 0.0, 0.0, 0.0],
    [5.0, 5.0, 5.0, *[-float(i) for i in range(1, 21)]],
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spectrum", REPEATED_SPECTRA, ids=lambda s: f"n{len(s)}")
@pytest.mark.parametrize("rotate", [False, True], ids=["diagonal", "rotated"])
def test_repeated_eigenvalues_are_found_with_their_multiplicity(
    spectrum: list[float], seed: int, rotate: bool
) -> None:
    n = len(spectrum)
    a = _rotated(spectrum, seed) if rotate else torch.diag(torch.tensor(spectrum, dtype=D))
    k = 4
    out = lanczos_eigenpairs(
        lambda v: a @ v,
        _random_start(n, seed),
        k=k,
        tol=1e-10,
        max_iter=n,
        smallest=True,
        generator=torch.Generator().manual_seed(seed),
    )
    expected = torch.tensor(sorted(spectrum, reverse=True)[:k], dtype=D)
    torch.testing.assert_close(out.eigenvalues, expected, atol=1e-9, rtol=0)
    assert out.converged.all()
    assert out.smallest is not None
    assert out.smallest[0] == pytest.approx(min(spectrum), abs=1e-9)
    assert out.smallest[2]


def test_one_krylov_space_holds_one_copy_of_each_eigenvalue() -> None:
    """Without a restart generator the run ends at the invariant subspace (the reason for
    restarts): one step per distinct eigenvalue, each seen once."""
    spectrum = [5.0, 5.0, 3.0, 2.0, 1.0]
    a = torch.diag(torch.tensor(spectrum, dtype=D))
    out = lanczos_eigenpairs(lambda v: a @ v, _random_start(5), k=2, tol=1e-10, max_iter=5)
    assert out.num_steps == 4
    torch.testing.assert_close(out.eigenvalues, torch.tensor([5.0, 3.0], dtype=D))


def test_null_space_after_breakdown_costs_one_product() -> None:
    """A rank-2 matrix: the run stops at the invariant subspace plus one restarted product
    that finds only zeros, not after all n products."""
    a = torch.diag(torch.tensor([3.0, 1.0] + [0.0] * 10, dtype=D))
    out = lanczos_eigenpairs(
        lambda v: a @ v, _random_start(12), k=2, tol=1e-10, max_iter=12,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    torch.testing.assert_close(out.eigenvalues, torch.tensor([3.0, 1.0], dtype=D))
    assert out.num_steps <= 4  # eigenvalues 3, 1, 0 seen, then one product in the complement


@pytest.mark.parametrize("seed", range(5))
def test_indefinite_order_is_algebraic(seed: int) -> None:
    """The most negative eigenvalue is the largest in magnitude; it must not come first."""
    spectrum = [-10.0, 3.0, 2.5, 2.0, 1.0, 0.5, -0.5, -1.0, -2.0, 0.1]
    a = _rotated(spectrum, seed)
    out = lanczos_eigenpairs(
        lambda v: a @ v, _random_start(10, seed), k=3, tol=1e-10, max_iter=10, smallest=True,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    torch.testing.assert_close(out.eigenvalues, torch.tensor([3.0, 2.5, 2.0], dtype=D))
    assert out.smallest is not None
    assert out.smallest[0] == pytest.approx(-10.0, abs=1e-9)


def test_eigenvectors_satisfy_the_eigen_equation() -> None:
    """The free residuals |β s| are the true ‖A y − θ y‖; the vectors are the eigenvectors
    up to the angle r / gap (tol bounds the eigenvalue error min(r, r²/gap), not r)."""
    spectrum = torch.linspace(-2.0, 6.0, 40, dtype=D).tolist()
    a = _rotated(spectrum)
    out = lanczos_eigenpairs(
        lambda v: a @ v, _random_start(40), k=3, tol=1e-10, max_iter=40, return_eigenvectors=True
    )
    assert out.eigenvectors is not None
    assert out.eigenvectors.shape == (3, 40)
    torch.testing.assert_close(out.eigenvectors.norm(dim=1), torch.ones(3, dtype=D))
    residuals = (out.eigenvectors @ a - out.eigenvalues[:, None] * out.eigenvectors).norm(dim=1)
    torch.testing.assert_close(residuals, out.residuals, atol=1e-12, rtol=1e-6)
    _, exact = torch.linalg.eigh(a)
    gap = spectrum[1] - spectrum[0]
    for y, e, r in zip(out.eigenvectors, exact[:, [-1, -2, -3]].T, residuals, strict=True):
        sine = torch.linalg.vector_norm(y - (y @ e) * e)
        assert float(sine) <= float(r) / gap + 1e-12


def test_stopping_test_bounds_the_error_and_reports_nonconvergence() -> None:
    spectrum = torch.linspace(0.0, 1.0, 200, dtype=D).tolist()
    a = _rotated(spectrum)
    top = max(spectrum)
    for tol in (1e-2, 1e-4, 1e-8):
        out = lanczos_eigenpairs(lambda v: a @ v, _random_start(200), tol=tol, max_iter=200)
        assert out.converged.all()
        assert abs(float(out.eigenvalues[0]) - top) / top <= tol
    short = lanczos_eigenpairs(lambda v: a @ v, _random_start(200), tol=1e-12, max_iter=5)
    assert short.num_steps == 5
    assert not short.converged.any()


def test_tridiagonal_holds_the_projected_matrix() -> None:
    a = _rotated([4.0, 3.0, 1.0, -1.0, -2.0, 0.5])
    run = LanczosProcess(lambda v: a @ v, _random_start(6), max_iter=4)
    while run.step():
        pass
    q = run.basis[: run.num_steps]
    torch.testing.assert_close(q @ q.T, torch.eye(4, dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(run.tridiagonal(), q @ a @ q.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("steps", [1, 3, 6])
def test_quadrature_is_gauss_quadrature_of_the_spectral_measure(steps: int) -> None:
    """Weights sum to 1 and the rule integrates t^j exactly for j <= 2·steps − 1:
    Σ w θ^j = uᵀ A^j u for the unit start vector u."""
    a = _rotated([3.0, 2.0, 1.5, 0.2, -0.7, -1.0, 0.9, 2.4, -2.2, 1.1, 0.0, 0.3], seed=4)
    start = _random_start(12, 4)
    nodes, weights = lanczos_quadrature(lambda v: a @ v, start, steps)
    assert nodes.shape == weights.shape == (steps,)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (weights >= 0).all()
    u = start / start.norm()
    for power in range(2 * steps):
        moment = u @ torch.linalg.matrix_power(a, power) @ u
        assert float((weights * nodes**power).sum()) == pytest.approx(float(moment), abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_a_top_eigenvalue_the_start_vector_barely_sees_is_not_missed(seed: int) -> None:
    """A start vector almost along the *second* eigenvector (a warm start after the top
    direction changed): θ₁ converges to λ₂ first with a small residual. The stopping test
    must not accept it (it used to, after 3 products, flagged converged)."""
    n = 1000
    spectrum = torch.cat([torch.tensor([2.0, 1.0]), torch.linspace(0.0, 0.5, n - 2)]).to(D)
    start = torch.zeros(n, dtype=D)
    start[1] = 1.0
    start += 1e-3 * torch.nn.functional.normalize(_random_start(n, seed), dim=0)
    out = lanczos_eigenpairs(
        lambda v: spectrum * v,
        start,
        tol=1e-3,
        generator=torch.Generator().manual_seed(seed),
    )
    assert out.converged.all()
    assert abs(float(out.eigenvalues[0]) - 2.0) <= 1e-3 * 2.0


@pytest.mark.parametrize("seed", [18, 28, 32])
def test_a_bound_at_the_floor_keeps_going_while_the_floor_is_within_reach(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """A floor of 0.7·tol·|θ| leaves room for a certificate: a run whose bound has just
    reached the floor, but not yet ``tol·|θ|`` less the floor, must not stop uncertified
    (these seeds stopped there, converged=False, when reaching the floor ended the run)."""
    monkeypatch.setattr(LanczosProcess, "resolution", lambda self, values: 0.7e-3 * values.abs())
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.cat([torch.rand(18, generator=g, dtype=torch.float64) * 30, TOP_TWO])
    start = torch.randn(20, generator=g, dtype=torch.float64)
    out = lanczos_eigenpairs(lambda v: spectrum * v, start, k=1, tol=1e-3, max_iter=100)
    assert out.converged.tolist() == [True]
    assert abs(float(out.eigenvalues[0]) - 50.0) <= 1e-3 * 50.0


def test_a_floor_beyond_reach_still_stops_at_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the floor above ``tol·|θ|`` nothing can be certified: the run stops once the
    bound is at the floor instead of spending the whole budget."""
    monkeypatch.setattr(LanczosProcess, "resolution", lambda self, values: 2e-3 * values.abs())
    g = torch.Generator().manual_seed(18)
    spectrum = torch.cat([torch.rand(18, generator=g, dtype=torch.float64) * 30, TOP_TWO])
    start = torch.randn(20, generator=g, dtype=torch.float64)
    out = lanczos_eigenpairs(lambda v: spectrum * v, start, k=1, tol=1e-3, max_iter=100)
    assert out.converged.tolist() == [False]
    assert out.num_steps < 20
