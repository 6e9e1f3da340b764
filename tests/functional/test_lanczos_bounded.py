"""Lanczos keeping only the recurrence's last rows (issue 23, 1): memory, accuracy, certificate."""

from __future__ import annotations

import pytest
import torch

from lightning_curvature.errors import CurvatureCheckError
from lightning_curvature.functional.linalg import basis
from lightning_curvature.functional.linalg.basis import ThickRestart
from lightning_curvature.functional.linalg.eigenpairs import (
    MISS_PROBABILITY,
    default_max_iter,
    lanczos_eigenpairs,
)
from lightning_curvature.functional.linalg.lanczos import LanczosProcess
from lightning_curvature.functional.linalg.sharded import VectorShards
from lightning_curvature.functional.operator.self_check import ProductCheck
from tests.functional.spectra import edge_of_stability, gaussian


def test_only_the_last_two_rows_are_held() -> None:
    size = 500
    values = torch.linspace(-1.0, 2.0, size, dtype=torch.float64)
    run = LanczosProcess(lambda v: values * v, gaussian(size, 0, torch.float64), 60, keep=2)
    while run.step():
        assert run.allocated_rows <= 2
    assert run.num_steps == 60
    with pytest.raises(ValueError, match="keeps only its last 2"):
        run.basis  # noqa: B018
    with pytest.raises(ValueError, match="keeps only its last 2"):
        run.combine(torch.ones(3, 1, dtype=torch.float64))


def test_keep_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match="`keep` must be None or >= 2"):
        LanczosProcess(lambda v: v, torch.ones(3), 3, keep=1)


def test_bounded_with_eigenvectors_is_refused() -> None:
    with pytest.raises(ValueError, match="keeps no basis to return eigenvectors"):
        lanczos_eigenpairs(lambda v: v, torch.ones(3), bounded=True, return_eigenvectors=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ratio", [0.98, 0.995, 0.999])
def test_same_products_and_values_as_the_whole_basis(dtype: torch.dtype, ratio: float) -> None:
    """At the edge of stability, cold, to ``MISS_PROBABILITY``: the same steps (±10 %), the
    same certificates, λ₁ within tol whenever certified, over 10 random starts."""
    n = 1000
    spectrum = edge_of_stability(n, ratio, dtype)
    steps = {False: 0, True: 0}
    for seed in range(10):
        start = gaussian(n, seed, dtype)
        for bounded in (False, True):
            out = lanczos_eigenpairs(
                lambda v: spectrum * v,
                start,
                max_iter=default_max_iter(1),
                miss_probability=MISS_PROBABILITY,
                bounded=bounded,
            )
            steps[bounded] += out.num_steps
            if out.converged[0]:
                assert abs(float(out.eigenvalues[0]) - 1.0) <= 1e-3 * float(out.eigenvalues[0])
    assert abs(steps[True] - steps[False]) <= 0.1 * steps[False]


def test_top_and_smallest_of_a_rotated_matrix_agree() -> None:
    n = 300
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    spectrum = torch.cat([torch.tensor([9.0, 7.0, 6.0, -5.0]), torch.rand(n - 4, generator=gen)])
    a = q @ torch.diag(spectrum.double()) @ q.T
    found = {
        bounded: lanczos_eigenpairs(
            lambda v: a @ v,
            gaussian(n, 1, torch.float64),
            tol=1e-8,
            max_iter=80,
            smallest=True,
            bounded=bounded,
        )
        for bounded in (False, True)
    }
    for out in found.values():
        assert out.converged.all()
        assert float(out.eigenvalues[0]) == pytest.approx(9.0, abs=1e-7)
        assert out.smallest is not None
        assert out.smallest.converged
        assert out.smallest.value == pytest.approx(-5.0, abs=1e-7)
    assert abs(found[True].num_steps - found[False].num_steps) <= 0.1 * found[False].num_steps


def test_more_than_the_top_one_is_refused() -> None:
    """Without full reorthogonalisation a converged θ₁ gets copies that would pass for θ₂."""
    with pytest.raises(ValueError, match="certifies only k=1"):
        lanczos_eigenpairs(lambda v: v, torch.ones(3), k=2, bounded=True)


def test_the_warm_guard_looks_past_copies_of_the_top_value() -> None:
    """From a warm start (no miss probability), a ghost of θ₁ is not the next Ritz value:
    the run waits for a distinct one, as the whole basis does."""
    n = 400
    spectrum = torch.cat([torch.tensor([10.0]), torch.linspace(0.0, 9.0, n - 1)]).double()
    warm = torch.zeros(n, dtype=torch.float64)
    warm[0], warm[1:] = 1.0, 1e-4 * gaussian(n - 1, 0, torch.float64)
    out = {
        bounded: lanczos_eigenpairs(
            lambda v: spectrum * v, warm, tol=1e-6, max_iter=150, bounded=bounded
        )
        for bounded in (False, True)
    }
    for result in out.values():
        assert result.converged.all()
        assert result.guarded
        assert float(result.eigenvalues[0]) == pytest.approx(10.0, abs=1e-6)
    assert out[True].num_steps >= 0.9 * out[False].num_steps


def test_ghosts_after_convergence_do_not_break_the_bound() -> None:
    """Run far past convergence (float32, no certificate to stop at): orthogonality is lost
    and ``T`` gets copies of converged values, yet every top Ritz value keeps an eigenvalue
    within its bound plus the resolution."""
    n = 400
    spectrum = torch.cat([torch.tensor([10.0, 9.0]), torch.linspace(0.0, 1.0, n - 2)])
    run = LanczosProcess(lambda v: spectrum * v, gaussian(n, 0, torch.float32), 120, keep=2)
    while run.step():
        pass
    values, _, residuals = run.ritz()
    reach = residuals + run.resolution(values) + 1e-5 * 10.0
    distance = (values[:, None] - spectrum.double()[None, :]).abs().min(dim=1).values
    assert (distance <= reach).all()
    assert (values > 9.99).sum() >= 2  # a ghost of 10 appeared: the test ran far enough


def test_a_breakdown_ends_the_run_without_a_restart() -> None:
    spectrum = torch.tensor([5.0, 5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    start = gaussian(5, 0, torch.float64)
    run = LanczosProcess(lambda v: spectrum * v, start, 5, generator=generator, keep=2)
    while run.step():
        pass
    assert run.num_steps == 4  # one step per distinct eigenvalue: no fresh direction drawn
    assert not run.restarts
    torch.testing.assert_close(torch.linalg.eigvalsh(run.projection())[-1], spectrum[0])


def test_the_default_bounds_large_runs_without_eigenvectors(
    monkeypatch: pytest.MonkeyPatch,
    lanczos_runs: list[LanczosProcess],
) -> None:
    monkeypatch.setattr(basis, "FULL_BASIS_ENTRIES", 40 * 11)
    d = torch.linspace(0.0, 1.0, 40, dtype=torch.float64)
    lanczos_eigenpairs(lambda v: d * v, torch.ones(40, dtype=torch.float64), max_iter=10)
    lanczos_eigenpairs(lambda v: d * v, torch.ones(40, dtype=torch.float64), max_iter=11)
    lanczos_eigenpairs(
        lambda v: d * v, torch.ones(40, dtype=torch.float64), max_iter=11, return_eigenvectors=True
    )
    lanczos_eigenpairs(lambda v: d * v, torch.ones(40, dtype=torch.float64), k=2, max_iter=11)
    # one of two processes holding 20 of 40 entries decides by the global 40, like its peer
    half = VectorShards(size=40, local_size=20, shard=0, num_shards=2)
    lanczos_eigenpairs(lambda v: d[:20] * v, torch.ones(20, dtype=torch.float64), max_iter=11,
                       shards=half)  # fmt: skip
    assert [run.keep for run in lanczos_runs] == [None, 2, None, None, 2]


def _local_orthogonality(start: torch.Tensor, spectrum: torch.Tensor, keep: int | None) -> float:
    """The largest ``|q_jᵀ q_{j+1}|`` of a 12-step run."""
    run = LanczosProcess(lambda v: spectrum * v, start, 12, keep=keep)
    worst = 0.0
    while run.step():
        rows = run.basis.unbind() if keep is None else run._basis.rows(run._basis.stored)
        worst = max(worst, abs(float(rows[-2].double() @ rows[-1].double())))
    return worst


@pytest.mark.parametrize("keep", [2, None], ids=["kept", "whole"])
def test_orthogonal_to_working_precision_whatever_cancels(keep: int | None) -> None:
    """A start 1e-4 from the top eigenvector makes ``A q₀ ≈ 10 q₀`` with a residual 10⁴ times
    smaller, and a positive operator's float32 slice sums of ``qᵀAq`` are off by 10⁻⁶: the
    second pass still leaves consecutive rows orthogonal to working precision."""
    n = 2000
    spectrum = torch.cat([torch.tensor([10.0]), torch.linspace(0.0, 1.0, n - 1)])
    noise = gaussian(n, 1, torch.float32)
    near = torch.zeros(n)
    near[0] = 1.0
    near += 1e-4 * noise / noise.norm()
    bound = 4 * torch.finfo(torch.float32).eps
    assert _local_orthogonality(near, spectrum, keep) <= bound
    assert _local_orthogonality(gaussian(n, 2, torch.float32), spectrum, keep) <= bound


def test_the_window_gives_the_whole_basis_tridiagonal_before_orthogonality_is_lost() -> None:
    """The two rows live in one ring, written in turn: its coefficients come back oldest
    first (α on the newest row, the check against β on the one before), at every wrap."""
    n = 400
    spectrum = torch.linspace(0.0, 1.0, n, dtype=torch.float64) ** 3
    runs = {
        keep: LanczosProcess(lambda v: spectrum * v, gaussian(n, 4, torch.float64), 12, keep=keep)
        for keep in (2, None)
    }
    for run in runs.values():
        while run.step():
            pass
    window, whole = runs[2], runs[None]
    assert window.num_steps == whole.num_steps == 12
    assert torch.allclose(window.projection(), whole.projection(), rtol=0, atol=1e-12)
    assert window.rounding <= 1e-14  # a swapped coefficient would show |α − β| here
    assert window.allocated_rows == 2


def test_a_window_row_is_kept_by_the_self_check_and_compared_at_every_product() -> None:
    """Each row of the ring is a tensor of its own: the operator's self-check holds the
    newest by reference (no copy) and writing the next row into the oldest one's memory
    leaves it comparable, so every product after the first is checked."""
    n = 60
    gen = torch.Generator().manual_seed(5)
    half = torch.randn(n, n, dtype=torch.float64, generator=gen)
    symmetric = half + half.T
    check = ProductCheck(VectorShards.single(n))
    check.compute_dtype = torch.float64
    judged: list[float] = []
    judge = check._judge
    check._judge = lambda discrepancy, what: (judged.append(discrepancy), judge(discrepancy, what))  # type: ignore[method-assign]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        product = _checked(symmetric, check, v)
        assert check._kept is not None
        assert check._kept[0].data_ptr() == v.data_ptr()  # no copy
        return product

    run = LanczosProcess(matvec, gaussian(n, 6, torch.float64), 20, keep=2)
    while run.step():
        pass
    assert run.num_steps == 20
    assert len(judged) == 19
    assert max(judged) < 1e-12
    skewed = symmetric.clone()
    skewed[0, 1] += 1.0  # no longer symmetric: the second product must fail its check
    check.forget()
    start = gaussian(n, 6, torch.float64)
    run = LanczosProcess(lambda v: _checked(skewed, check, v), start, 5, keep=2)
    assert run.step()  # the first product has nothing to be compared with
    with pytest.raises(CurvatureCheckError):
        run.step()


def _checked(matrix: torch.Tensor, check: ProductCheck, v: torch.Tensor) -> torch.Tensor:
    product = matrix @ v
    check.symmetric(v, product)
    return product


LAYOUTS = {"window": (2, None), "whole": (None, None), "thick": (None, ThickRestart(6, 2))}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_products_that_require_grad_are_taken_as_numbers(layout: str) -> None:
    """A matvec through a matrix that requires grad returns products in a graph: the basis
    takes their values (its rows are written with ``out=``, which autograd refuses), and the
    run is the one without grad."""
    n = 60
    diagonal = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    keep, thick = LAYOUTS[layout]
    projections = []
    for grad in (True, False):
        matrix = torch.diag(diagonal).requires_grad_(grad)
        start = gaussian(n, 7, torch.float64).requires_grad_(grad)
        run = LanczosProcess(lambda v, m=matrix: m @ v, start, 30, keep=keep, thick=thick)
        while run.step():
            pass
        projections.append(run.projection())
    assert run.num_steps == 30
    assert torch.equal(projections[0], projections[1])
