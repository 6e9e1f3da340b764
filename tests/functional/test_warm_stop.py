"""Where a warm Lanczos run stops, and what its ``converged=True`` does and does not prove.

A warm start is a unit vector ``u`` (the previous probe's Ritz vectors summed) plus ``10⁻³``
of a random unit vector, as ``hessian_eigenvalues(init=...)`` builds it. Spectra of n = 500:
"cluster" is the edge-of-stability shape of ``benchmarks/bench_certificate.py`` (a top pair
over ``0.97·e^{−j/12} − 0.02``), "apart" the pair over a bulk in [0, 0.5].
"""

from __future__ import annotations

import pytest
import torch

from lightning_curvature.functional.eigenvalues import WARM_NOISE
from lightning_curvature.functional.linalg.eigenpairs import lanczos_eigenpairs
from lightning_curvature.functional.linalg.lanczos import LanczosProcess
from lightning_curvature.functional.linalg.missed import miss_probabilities

D = torch.float64
N = 500


def _cluster(ratio: float) -> torch.Tensor:
    j = torch.arange(N - 2, dtype=D)
    return torch.cat([torch.tensor([1.0, ratio], dtype=D), 0.97 * torch.exp(-j / 12) - 0.02])


def _apart(ratio: float) -> torch.Tensor:
    return torch.cat([torch.tensor([1.0, ratio], dtype=D), torch.linspace(0.0, 0.5, N - 2)])


def _warm(weights: list[float], seed: int) -> torch.Tensor:
    """``weights`` along the first eigenvectors, normalised, plus the library's noise."""
    start = torch.zeros(N, dtype=D)
    start[: len(weights)] = torch.tensor(weights, dtype=D)
    noise = torch.randn(N, dtype=D, generator=torch.Generator().manual_seed(seed))
    return start / start.norm() + WARM_NOISE * noise / noise.norm()


def _run(spectrum: torch.Tensor, start: torch.Tensor, seed: int) -> tuple[int, float, bool]:
    out = lanczos_eigenpairs(
        lambda v: spectrum * v,
        start,
        tol=1e-3,
        max_iter=50,
        generator=torch.Generator().manual_seed(seed),
    )
    return out.num_steps, float(out.eigenvalues[0]), bool(out.converged[0])


@pytest.mark.parametrize("seed", range(20))
def test_a_warm_start_at_the_second_of_a_close_pair_is_not_certified_as_the_first(
    seed: int,
) -> None:
    """λ₂/λ₁ = 0.98 in a cluster, the start along v₂: θ₁ sits on λ₂ with a tiny residual
    after one product. The guard waits for the Ritz value below it, which the noise drives
    up to λ₁: every seed returns λ₁, after 13 to 19 products."""
    steps, value, converged = _run(_cluster(0.98), _warm([0.0, 1.0], seed), seed)
    assert converged
    assert abs(value - 1.0) <= 1e-3 * value
    assert 13 <= steps <= 19


@pytest.mark.parametrize("seed", range(5))
def test_a_warm_start_at_the_second_of_a_separated_pair_finds_the_first(seed: int) -> None:
    """λ₂/λ₁ = 0.9 over a bulk in [0, 0.5], the start along v₂: λ₁ appears within 9."""
    steps, value, converged = _run(_apart(0.9), _warm([0.0, 1.0], seed), seed)
    assert converged
    assert abs(value - 1.0) <= 1e-3 * value
    assert steps <= 9


@pytest.mark.parametrize("spectrum", [_cluster(0.98), _apart(0.5)], ids=["cluster", "apart"])
def test_a_warm_start_holding_the_top_pair_stops_after_three_products(
    spectrum: torch.Tensor,
) -> None:
    """The monitor's start (the top two Ritz vectors summed), here exact: three products,
    the fewest the rule trusts (``min_iter``)."""
    for seed in range(5):
        steps, value, converged = _run(spectrum, _warm([1.0, 1.0], seed), seed)
        assert (steps, converged) == (3, True)
        assert value == pytest.approx(1.0, rel=1e-5)


def test_the_guard_is_no_proof_a_start_at_v2_of_a_tighter_pair_can_be_certified_wrong() -> None:
    """At λ₂/λ₁ = 0.995 one seed in 20 (seed 7) certifies λ₂ after 14 products: a root of
    the Krylov polynomial on λ₂ nearly vanishes on λ₁ too, so the noise's λ₁ part stays
    hidden while the Ritz value below converges to λ₃. This is why a warm ``converged``
    claims no probability. The provable bound its random part would give (the random-start
    bound of ``missed.py`` times ``(1 + ε)/ε`` for a start ``u + ε·ĝ``) is 0.99 there: no
    certificate at all."""
    spectrum, start = _cluster(0.995), _warm([0.0, 1.0], 7)
    steps, value, converged = _run(spectrum, start, 7)
    assert (steps, converged) == (14, True)
    assert value == pytest.approx(0.995, abs=1e-9)
    run = LanczosProcess(lambda v: spectrum * v, start, steps)
    while run.step():
        pass
    (bound,), _ = miss_probabilities(run, run.ritz()[0], 1, 1e-3)
    provable = bound * (1 + WARM_NOISE) / WARM_NOISE
    assert provable == pytest.approx(0.994, abs=1e-3)
