"""Lanczos over plain symmetric matrices, where every eigenvalue is known."""

from __future__ import annotations

import pytest
import torch

from lightning_curvature.functional.linalg.eigenpairs import (
    MISS_PROBABILITY,
    LanczosResult,
    default_max_iter,
    lanczos_eigenpairs,
)
from lightning_curvature.functional.linalg.lanczos import LanczosProcess
from lightning_curvature.functional.linalg.missed import miss_probabilities
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
    torch.testing.assert_close(run.projection(), q @ a @ q.T, atol=1e-12, rtol=0)


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


def _edge_of_stability(ratio: float, n: int = 500) -> torch.Tensor:
    """A top pair ``1, ratio`` over a smoothly decaying cluster, shaped like the Hessians of
    the digits edge-of-stability run (λ₃/λ₁ ≈ 0.97, then about 5 % less per eigenvalue)."""
    j = torch.arange(n - 2, dtype=D)
    return torch.cat([torch.tensor([1.0, ratio], dtype=D), 0.97 * torch.exp(-j / 12) - 0.02])


def _cold(spectrum: torch.Tensor, seed: int, miss: float | None, k: int = 1) -> LanczosResult:
    """``lanczos_eigenpairs`` at ``tol=1e-3`` and the default budget from a Gaussian start."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(spectrum.numel(), generator=generator, dtype=D)
    return lanczos_eigenpairs(
        lambda v: spectrum * v,
        start,
        k=k,
        tol=1e-3,
        max_iter=default_max_iter(k),
        generator=generator,
        miss_probability=miss,
    )


def _wrong(out: LanczosResult, truth: list[float]) -> int:
    """How many values are certified more than ``tol`` off the true i-th largest."""
    values = out.eigenvalues.tolist()
    pairs = zip(values, truth, out.converged.tolist(), strict=False)
    return sum(ok and abs(v - t) > 1e-3 * abs(v) for v, t, ok in pairs)


@pytest.mark.parametrize("seed", [23, 46, 98, 112, 156])
def test_a_random_start_no_longer_certifies_the_second_eigenvalue_as_the_first(
    seed: int,
) -> None:
    """λ₂/λ₁ = 0.995 over a cluster: from these starts the guard (the next Ritz value
    converged too) certified λ₂ = 0.995 as λ₁ (19 of 200 seeds did); the bound on a missed
    eigenvalue keeps the run going until λ₁ = 1 is found."""
    spectrum = _edge_of_stability(0.995)
    old = _cold(spectrum, seed, miss=None)
    assert old.converged.tolist() == [True]
    assert abs(float(old.eigenvalues[0]) - 0.995) < 1e-3
    new = _cold(spectrum, seed, miss=MISS_PROBABILITY)
    assert new.converged.tolist() == [True]
    assert abs(float(new.eigenvalues[0]) - 1.0) <= 1e-3 * float(new.eigenvalues[0])
    assert new.misses is not None
    assert float(new.misses[0]) <= MISS_PROBABILITY
    assert new.num_steps <= 30


@pytest.mark.parametrize("ratio", [0.98, 0.995, 0.999])
def test_no_false_certificate_from_random_starts_at_the_edge_of_stability(ratio: float) -> None:
    """40 random starts per ratio (the guard certified λ₂ for 1, 19 and 5 of 200): every
    run is certified, and within ``tol`` of λ₁, in at most 30 products."""
    spectrum = _edge_of_stability(ratio)
    runs = [_cold(spectrum, seed, miss=MISS_PROBABILITY) for seed in range(40)]
    assert all(out.converged.tolist() == [True] for out in runs)
    assert sum(_wrong(out, [1.0]) for out in runs) == 0
    assert max(out.num_steps for out in runs) <= 30


def test_the_miss_probability_bounds_the_rate_of_false_certificates() -> None:
    """The guarantee itself, at a loose ``miss_probability`` where failures are frequent
    enough to count: λ₂/λ₁ = 0.9985 (1.5 tol apart) lets a run that has not resolved the
    pair pass for λ₁. The rate stays below the bound, and the bound is not vacuous (it
    lets some through: about 13 % at 0.3)."""
    spectrum = _edge_of_stability(0.9985)
    wrong = sum(_wrong(_cold(spectrum, seed, miss=0.3), [1.0]) for seed in range(100))
    assert 0 < wrong <= 30


@pytest.mark.parametrize("seed", range(10))
def test_top_two_a_pair_apart_are_both_certified_right(seed: int) -> None:
    """λ₁ − λ₂ = 4 tol (more than the 2 tol a single Krylov space cannot split): the second
    is certified only once it is the second, not the cluster's next eigenvalue."""
    spectrum = _edge_of_stability(0.996)
    out = _cold(spectrum, seed, miss=MISS_PROBABILITY, k=2)
    assert out.converged.tolist() == [True, True]
    assert _wrong(out, [1.0, 0.996]) == 0


def test_a_start_orthogonal_to_the_top_eigenvector_is_why_warm_starts_claim_no_chance() -> None:
    """The bound holds over *random* starts: a start with no component along v₁ (the worst
    warm start) never sees λ₁, and its certificate is wrong. ``hessian_eigenvalues`` gives
    a warm start the guard and no probability (and adds a little noise)."""
    spectrum = _edge_of_stability(0.98)
    start = torch.randn(500, generator=torch.Generator().manual_seed(0), dtype=D)
    start[0] = 0.0
    out = lanczos_eigenpairs(lambda v: spectrum * v, start, max_iter=50, miss_probability=1e-3)
    assert out.converged.tolist() == [True]
    assert float(out.eigenvalues[0]) == pytest.approx(0.98, abs=1e-6)


def test_an_invariant_start_leaves_nothing_to_miss() -> None:
    """A Krylov space that became invariant holds the start exactly: the bound is 0 (a
    random start lies in such a space only when the operator has that few distinct
    eigenvalues, all of which it then holds)."""
    spectrum = torch.tensor([3.0, 2.0, 1.0] * 10, dtype=D)
    run = LanczosProcess(lambda v: spectrum * v, _random_start(30), max_iter=3)
    while run.step():
        pass
    top, bottom = miss_probabilities(run, run.ritz()[0], 2, 1e-3)
    assert max(top) < 1e-6
    assert bottom < 1e-6
