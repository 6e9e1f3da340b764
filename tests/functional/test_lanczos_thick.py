"""Thick-restarted Lanczos (issue 23, point 1): rows held, the projection, the certificates."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_curvature.functional.linalg import basis
from lightning_curvature.functional.linalg.basis import ThickRestart, thick_restart
from lightning_curvature.functional.linalg.eigenpairs import (
    MISS_PROBABILITY,
    default_max_iter,
    lanczos_eigenpairs,
)
from lightning_curvature.functional.linalg.lanczos import LanczosProcess
from lightning_curvature.functional.linalg.missed import _first_block, miss_probabilities
from tests.functional.spectra import edge_of_stability, gaussian


def _rotated(n: int, values: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return (q * values) @ q.T


@pytest.mark.parametrize(("rows", "top", "bottom"), [(5, 2, 0), (8, 4, 0), (9, 3, 1)])
def test_never_more_rows_than_asked_and_the_projection_is_qtaq(
    rows: int, top: int, bottom: int
) -> None:
    n = 120
    matrix = _rotated(n, torch.linspace(-1.0, 3.0, n, dtype=torch.float64), seed=rows)
    run = LanczosProcess(
        lambda v: matrix @ v,
        gaussian(n, 0, torch.float64),
        70,
        thick=ThickRestart(rows=rows, top=top, bottom=bottom),
    )
    while run.step():
        assert run.allocated_rows <= rows
        basis = run.basis
        assert torch.allclose(
            basis @ basis.T, torch.eye(len(basis), dtype=torch.float64), atol=1e-12
        )
        multiplied = basis[: run.order]
        assert torch.allclose(multiplied @ matrix @ multiplied.T, run.projection(), atol=1e-12)
    assert run.num_steps == 70
    assert len(run.dropped) > 0
    assert run.order < run.num_steps


@pytest.mark.parametrize("rows", [None, 5, 7, 12])
def test_the_polynomial_norm_is_the_product_of_every_normalisation(rows: int | None) -> None:
    """``‖Π(A) b‖`` with ``Π``'s roots the Ritz values and the dropped ones, computed directly
    on a diagonal ``A``, equals ``exp(log_norm())``: the miss bound's one input from the run."""
    n = 80
    diagonal = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    start = gaussian(n, 1, torch.float64)
    for steps in (9, 17, 30):
        thick = None if rows is None else ThickRestart(rows=rows, top=2)
        run = LanczosProcess(lambda v: diagonal * v, start, steps, thick=thick)
        while run.step():
            pass
        roots, log_norm = _first_block(run)
        assert roots.numel() == run.num_steps == steps
        direct = (diagonal[:, None] - roots[None, :]).prod(dim=1) * start / start.norm()
        assert log_norm == pytest.approx(math.log(float(direct.norm())), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ratio", [0.98, 0.995])
@pytest.mark.parametrize("k", [1, 3])
def test_cold_certificates_survive_restarts_at_theedge_of_stability(
    dtype: torch.dtype, ratio: float, k: int
) -> None:
    """To ``MISS_PROBABILITY`` from random starts: all certified, every one within tol of the
    truth, with at most 1.3x the products of the whole basis (20 starts)."""
    n = 1000
    spectrum = edge_of_stability(n, ratio, dtype)
    truth = spectrum.double().sort(descending=True).values[:k]
    products = {None: 0, 2 * (k + 1) + basis.THICK_ROOM: 0}
    for seed in range(20):
        for rows in products:
            out = lanczos_eigenpairs(
                lambda v: spectrum * v,
                gaussian(n, seed, dtype),
                k=k,
                max_iter=default_max_iter(k),
                miss_probability=MISS_PROBABILITY,
                return_eigenvectors=True,
                rows=rows,
            )
            products[rows] += out.num_steps
            assert bool(out.converged.all())
            assert bool(((out.eigenvalues - truth).abs() <= 1e-3 * truth).all())
            assert bool((out.misses <= MISS_PROBABILITY).all())
    whole, thick = products.values()
    assert whole < thick <= 1.3 * whole


def test_a_restart_keeps_missing_eigenvalues_improbable() -> None:
    """The miss bound still counts the dropped Ritz values: with them left out of the roots
    it would claim a far smaller chance than the polynomial gives."""
    n = 500
    spectrum = edge_of_stability(n, 0.98, torch.float64)
    run = LanczosProcess(
        lambda v: spectrum * v, gaussian(n, 3, torch.float64), 30, thick=ThickRestart(8, 4)
    )
    while run.step():
        pass
    values = run.ritz()[0]
    (with_dropped,), _ = miss_probabilities(run, values, 1, 1e-3)
    dropped, run.dropped = run.dropped, []
    (without,), _ = miss_probabilities(run, values, 1, 1e-3)
    assert len(dropped) > 0
    assert with_dropped > 1e3 * without


@pytest.mark.parametrize("ends", ["separated", "dense"])
def test_the_smallest_is_kept_and_certified_too(ends: str) -> None:
    """At the default rows for k = 2 with the smallest (12: three kept at each end), from a
    random start: the smallest of a separated end to 1e-6, of a dense end (a spacing of
    10⁻²) to 1e-3, where keeping one of the bottom left it uncertified after 200 products."""
    n = 300
    bulk = torch.linspace(-2.0, 1.0, n - 3 if ends == "separated" else n - 2)
    low = torch.tensor([-3.0] if ends == "separated" else [])
    spectrum = torch.cat([low, bulk, torch.tensor([3.0, 4.0])]).double()
    matrix = _rotated(n, spectrum, 5)
    tol = 1e-6 if ends == "separated" else 1e-3
    rows = 2 * (2 + 1 + 1) + basis.THICK_ROOM
    out = lanczos_eigenpairs(
        lambda v: matrix @ v,
        gaussian(n, 0, torch.float64),
        k=2,
        smallest=True,
        tol=tol,
        max_iter=200,
        miss_probability=MISS_PROBABILITY,
        return_eigenvectors=True,
        rows=rows,
    )
    assert thick_restart(2, True, n, rows).bottom == 3
    assert out.converged.tolist() == [True, True]
    assert out.smallest is not None
    assert out.smallest.converged
    assert out.num_steps > rows
    assert out.smallest.value == pytest.approx(float(spectrum.min()), rel=tol)
    assert torch.allclose(out.eigenvalues, torch.tensor([4.0, 3.0]).double(), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eigenvectors_and_warm_start_from_a_thick_run(dtype: torch.dtype) -> None:
    """The Ritz vectors satisfy the eigen equation to their residual bound, and a warm start
    from them converges within the rows of one restart."""
    n = 400
    matrix = _rotated(n, edge_of_stability(n, 0.9, torch.float64), 7).to(dtype)
    cold = lanczos_eigenpairs(
        lambda v: matrix @ v,
        gaussian(n, 0, dtype),
        k=2,
        max_iter=default_max_iter(2),
        miss_probability=MISS_PROBABILITY,
        return_eigenvectors=True,
        rows=9,
    )
    assert cold.eigenvectors is not None
    assert cold.warm_start is not None
    assert cold.warm_start.shape == (3, n)
    assert cold.num_steps > 9
    for value, vector, residual in zip(
        cold.eigenvalues, cold.eigenvectors, cold.residuals, strict=True
    ):
        assert float(vector.double().norm()) == pytest.approx(1.0, abs=1e-5)
        actual = float((matrix @ vector - value.to(dtype) * vector).double().norm())
        assert actual <= float(residual) + 1e-5
    warm = lanczos_eigenpairs(
        lambda v: matrix @ v, cold.warm_start.sum(0), k=2, return_eigenvectors=True, rows=9
    )
    assert warm.converged.tolist() == [True, True]
    assert warm.num_steps <= 6
    assert torch.allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-3)


def test_large_runs_that_need_ritz_vectors_restart_by_default(
    monkeypatch: pytest.MonkeyPatch,
    lanczos_runs: list[LanczosProcess],
) -> None:
    """Above ``FULL_BASIS_ENTRIES``: k = 1 without vectors keeps two rows, with vectors (or
    k > 1) at most ``thick_restart``'s rows; below, the whole basis."""
    n = 300
    spectrum = edge_of_stability(n, 0.9, torch.float64)
    monkeypatch.setattr(basis, "FULL_BASIS_ENTRIES", n * 10)
    for k, vectors in [(1, False), (1, True), (2, False)]:
        lanczos_eigenpairs(
            lambda v: spectrum * v, gaussian(n, 0, torch.float64), k=k, max_iter=50,
            return_eigenvectors=vectors,
        )  # fmt: skip
    assert [(run.keep, run.thick) for run in lanczos_runs] == [
        (2, None),
        (None, thick_restart(1, False, n)),
        (None, thick_restart(2, False, n)),
    ]
    assert thick_restart(1, False, n).rows == 10  # FULL_BASIS_ENTRIES // n
    monkeypatch.setattr(basis, "FULL_BASIS_ENTRIES", 1 << 24)
    lanczos_eigenpairs(lambda v: spectrum * v, gaussian(n, 0, torch.float64), k=2, max_iter=50)
    assert lanczos_runs[-1].thick is None


def test_a_breakdown_ends_a_thick_run() -> None:
    """No fresh direction after a breakdown: it would have to be orthogonal to the dropped
    vectors too. Four distinct eigenvalues: the Krylov space is invariant after four."""
    n = 40
    diagonal = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(10).double()
    run = LanczosProcess(
        lambda v: diagonal * v,
        gaussian(n, 0, torch.float64),
        30,
        generator=torch.Generator().manual_seed(1),
        thick=ThickRestart(rows=6, top=2),
    )
    while run.step():
        pass
    assert run.num_steps == 4
    assert not run.restarts
    assert torch.allclose(
        torch.linalg.eigvalsh(run.projection()), torch.arange(1.0, 5.0).double(), atol=1e-12
    )


def test_rows_that_leave_no_room_are_refused() -> None:
    with pytest.raises(ValueError, match=r"`rows` must be >= top \+ bottom \+ 3 \(6\), got 5"):
        ThickRestart(rows=5, top=2, bottom=1)
    with pytest.raises(ValueError, match="`top` must be >= 1"):
        ThickRestart(rows=5, top=0)
    with pytest.raises(ValueError, match="`keep` and `thick`"):
        LanczosProcess(lambda v: v, torch.ones(9), 5, keep=2, thick=ThickRestart(5, 2))
    with pytest.raises(ValueError, match="`bounded=True` keeps two rows"):
        lanczos_eigenpairs(lambda v: v, torch.ones(9), bounded=True, rows=6)
    with pytest.raises(ValueError, match=r"`rows` must be >= top \+ bottom \+ 3"):
        lanczos_eigenpairs(lambda v: v, torch.ones(9), k=3, rows=6)


@pytest.mark.parametrize(
    ("keywords", "budget"),
    [({}, 50), ({"return_eigenvectors": True}, 65), ({"k": 2}, 78), ({"max_iter": 40, "k": 2}, 40)],
)
def test_a_held_basis_gets_a_larger_default_budget(
    monkeypatch: pytest.MonkeyPatch,
    lanczos_runs: list[LanczosProcess],
    keywords: dict[str, object],
    budget: int,
) -> None:
    """Thick restarts cost up to 1.26x the products: ``hessian_eigenvalues``' default budget
    is 1.3x there; a two-row λ₁ (no restarts) and a budget given keep theirs."""
    from torch import nn

    from lightning_curvature import hessian_eigenvalues

    monkeypatch.setattr(basis, "FULL_BASIS_ENTRIES", 1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 1))  # 169 parameters
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(1))
    hessian_eigenvalues(net, lambda m, b: m(b).pow(2).mean(), x, **keywords)  # type: ignore[arg-type]
    assert [run.max_iter for run in lanczos_runs] == [budget]
