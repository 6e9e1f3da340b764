"""The estimators in float32, the dtype the monitors run in, against float64 dense Hessians.

Each case is built in float64, rounded to float32, and the float64 dense Hessian of the
*rounded* weights is the reference: what is measured is the float32 computation, not the
rounding of the weights. Besides the shared tiny cases there are three with an outlier far
above a bulk, the spectrum of a trained classifier (Sagun et al. 2017; Papyan 2019): the stiff
least squares of issue 10 (λ₁/λ₂ ≈ 3600), an MLP trained on scikit-learn's digits, and an MLP
with one stiff input feature (λ₁/λ₅ ≥ 10³).

Tolerances follow from the dtype: a certified (``converged``) estimate is within ``tol·|λ|``
of the truth up to a few float32 roundings of ``λ₁`` (``1e-3·|λ_i| + 64·eps·λ₁``).
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.density import spectral_density
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.linalg.eigenpairs import lanczos_eigenpairs
from lightning_curvature.functional.linalg.sampling import make_generator, rademacher
from lightning_curvature.functional.trace import hessian_trace
from tests.functional.cases import CASES, cross_entropy, dense_hessian, half_squares, seeded

CPU = torch.device("cpu")
EPS = torch.finfo(torch.float32).eps
TOL = 1e-3
Build = Callable[[], tuple[nn.Module, Callable[[nn.Module, Any], torch.Tensor], Any]]


def _stiff_least_squares() -> tuple[nn.Module, Any, Any]:
    x = torch.randn(400, 200, dtype=torch.float64) * 0.3
    x[:, 0] *= 100
    return nn.Linear(200, 1, bias=False).double(), half_squares, [x, torch.zeros(400)]


def _trained_digits_classifier() -> tuple[nn.Module, Any, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:256] / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target[:256])
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, cross_entropy, (x, y)


def _stiff_input_mlp() -> tuple[nn.Module, Any, Any]:
    """One input feature 300 times larger (its first-layer weights 300 times smaller, so
    the pre-activations stay O(1)): its 4 weights carry curvature about 300² times larger."""
    x = torch.randn(64, 6, dtype=torch.float64)
    x[:, 0] *= 300
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].weight[:, 0] /= 300
    return model, cross_entropy, (x, torch.randint(0, 3, (64,)))


OUTLIER_CASES: dict[str, Build] = {
    "stiff_least_squares": _stiff_least_squares,
    "trained_digits_classifier": _trained_digits_classifier,
    "stiff_input_mlp": _stiff_input_mlp,
}
ALL = [case.name for case in CASES] + list(OUTLIER_CASES)
BUILDERS: dict[str, Build] = {case.name: case.build for case in CASES} | {
    name: functools.partial(lambda make, seed: _seeded(make, seed), make, i)
    for i, (name, make) in enumerate(OUTLIER_CASES.items())
}


def _seeded(make: Build, seed: int) -> tuple[nn.Module, Any, Any]:
    with seeded(1000 + seed):
        return make()


def _to(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {key: _to(value, dtype) for key, value in batch.items()}
    return type(batch)(_to(item, dtype) for item in batch)


@functools.cache
def _float32_case(name: str) -> tuple[nn.Module, Any, Any, torch.Tensor, torch.Tensor]:
    """The float32 model and batch, the float64 Hessian of those very weights, its spectrum."""
    model, loss_fn, batch = BUILDERS[name]()
    model32, batch32 = copy.deepcopy(model).float(), _to(batch, torch.float32)
    model64, batch64 = copy.deepcopy(model32).double(), _to(batch32, torch.float64)
    hessian = dense_hessian(model64, loss_fn, batch64)
    hessian = (hessian + hessian.T) / 2
    return model32, loss_fn, batch32, hessian, torch.linalg.eigvalsh(hessian).flip(0)


def _slack(exact: torch.Tensor) -> float:
    return 64 * EPS * float(exact.abs().max())


def _quietly(function: Callable[[], Any]) -> Any:
    """Run a call whose non-convergence warnings are part of what is tested."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)
        return function()


@pytest.mark.parametrize("name", ALL)
def test_top5_in_float32_are_right_where_certified(name: str) -> None:
    model, loss_fn, batch, hessian, exact = _float32_case(name)
    size = hessian.shape[0]
    out = _quietly(
        lambda: hessian_eigenvalues(model, loss_fn, batch, k=5, tol=TOL, max_iter=min(size, 120))
    )
    assert out.eigenvalues.dtype == torch.float32
    assert bool(out.converged[0]), "λ₁ must be certified in float32"
    error = (out.eigenvalues.double() - exact[:5]).abs()
    allowed = TOL * exact[:5].abs() + _slack(exact)
    for i, certified in enumerate(out.converged.tolist()):
        if certified:
            assert float(error[i]) <= float(allowed[i]), (i, error.tolist(), exact[:5].tolist())


@pytest.mark.parametrize("name", list(OUTLIER_CASES))
def test_the_outlier_cases_have_an_outlier(name: str) -> None:
    *_, exact = _float32_case(name)
    if name == "trained_digits_classifier":  # about C = 10 outliers over a bulk near 0
        assert float(exact[0] / exact.abs().median()) >= 1e3
    else:
        assert float(exact[0] / exact[4].abs()) >= 1e3


def test_stiff_least_squares_bulk_is_not_thrown_away() -> None:
    """Issue 10's reproduction: float32 returned [875.76, 0.1741, 0.1008], all converged."""
    model, loss_fn, batch, _, exact = _float32_case("stiff_least_squares")
    out = _quietly(lambda: hessian_eigenvalues(model, loss_fn, batch, k=3))
    assert out.converged.all()
    relative = ((out.eigenvalues.double() - exact[:3]).abs() / exact[:3]).max()
    assert float(relative) <= TOL


@pytest.mark.parametrize("name", ALL)
def test_smallest_in_float32_is_an_upper_bound_and_right_where_certified(name: str) -> None:
    model, loss_fn, batch, hessian, exact = _float32_case(name)
    size = hessian.shape[0]
    out = _quietly(
        lambda: hessian_eigenvalues(
            model, loss_fn, batch, tol=TOL, max_iter=min(size, 120), smallest=True
        )
    )
    assert out.smallest_eigenvalue is not None
    smallest, lowest = float(out.smallest_eigenvalue), float(exact[-1])
    assert smallest >= lowest - _slack(exact)  # Ritz values interlace
    if out.smallest_converged:
        assert abs(smallest - lowest) <= TOL * abs(lowest) + _slack(exact)


@pytest.mark.parametrize("max_iter", [1, 2, 3])
@pytest.mark.parametrize("name", ALL)
def test_a_starved_budget_never_certifies_a_wrong_value(name: str, max_iter: int) -> None:
    model, loss_fn, batch, _, exact = _float32_case(name)
    for seed in range(3):
        for k in range(1, max_iter + 1):
            out = _quietly(
                lambda k=k, seed=seed: hessian_eigenvalues(
                    model, loss_fn, batch, k=k, max_iter=max_iter,
                    generator=make_generator(CPU, seed),
                )
            )  # fmt: skip
            error = (out.eigenvalues.double() - exact[:k]).abs()
            wrong = error > TOL * exact[:k].abs() + _slack(exact)
            assert not bool((wrong & out.converged).any()), (seed, k, error.tolist())


def test_one_product_is_never_certified() -> None:
    """Issue 10: max_iter=1 returned 0.0159 for 4.09 with converged=True."""
    model, loss_fn, batch, *_ = _float32_case("mlp_tanh")
    with pytest.warns(CurvatureWarning, match=r"did not certify λ1 .* error bound"):
        out = hessian_eigenvalues(model, loss_fn, batch, max_iter=1)
    assert not out.converged.any()


def test_warning_names_only_the_estimate_that_failed() -> None:
    """Top eigenvalues converged, the smallest not: the warning says λ_min, not λ1."""
    model, loss_fn, batch, *_ = _float32_case("stiff_least_squares")
    with pytest.warns(CurvatureWarning) as record:
        out = hessian_eigenvalues(model, loss_fn, batch, k=2, smallest=True)
    assert out.converged.all()
    assert not out.smallest_converged
    (message,) = [str(w.message) for w in record]
    assert "did not certify λ_min " in message
    assert "λ1" not in message
    assert "finer than its products resolve" in message or "error bound" in message


def test_tolerance_finer_than_float32_resolves_is_reported_as_such() -> None:
    model, loss_fn, batch, *_ = _float32_case("stiff_least_squares")
    with pytest.warns(CurvatureWarning, match="finer than its products resolve") as record:
        out = hessian_eigenvalues(model, loss_fn, batch, tol=1e-9)
    assert not out.converged.any()
    assert "measure in float64" in str(record[0].message)
    assert out.num_hvps < 30  # it stops once the bound reaches the rounding floor


@pytest.mark.parametrize("name", ALL)
def test_slq_in_float32_uses_every_step_and_matches_the_spectrum(name: str) -> None:
    model, loss_fn, batch, hessian, exact = _float32_case(name)
    size = hessian.shape[0]
    # A Krylov space holds one copy of each distinct eigenvalue: beyond that it is invariant.
    distinct = int(((exact[:-1] - exact[1:]) > 1e-6 * exact[0]).sum()) + 1
    steps = min(distinct - 1, 30)
    out = spectral_density(
        model, loss_fn, batch, num_steps=steps, num_runs=2, generator=make_generator(CPU, 5)
    )
    assert out.num_hvps == 2 * steps  # issue 10: float32 stopped after 3 products
    assert bool((out.weights > 0).all())  # no padding: no early stop
    spread = float(exact[0] - exact[-1])
    assert abs(float(out.nodes[:, -1].max()) - float(exact[0])) <= TOL * abs(float(exact[0]))
    assert float(out.nodes[:, 0].min()) >= float(exact[-1]) - _slack(exact)
    assert float(out.nodes[:, 0].min()) <= float(exact[-1]) + 0.2 * spread
    # The first moment of each run is exactly uᵀ H u for its unit Rademacher start u.
    generator = make_generator(CPU, 5)
    for run in range(2):
        u = rademacher((size,), generator, torch.float32, CPU).double() / math.sqrt(size)
        moment = float((out.weights[run] * out.nodes[run]).sum())
        assert moment == pytest.approx(float(u @ hessian @ u), abs=_slack(exact))


def test_slq_first_moment_estimates_trace_over_p_in_float32() -> None:
    model, loss_fn, batch, hessian, _ = _float32_case("trained_digits_classifier")
    out = spectral_density(
        model, loss_fn, batch, num_steps=20, num_runs=30, generator=make_generator(CPU, 3)
    )
    moments = (out.weights * out.nodes).sum(dim=1)
    standard_error = float(moments.std() / math.sqrt(moments.numel()))
    exact_mean = float(hessian.trace()) / hessian.shape[0]
    assert abs(float(moments.mean()) - exact_mean) <= 3 * standard_error


@pytest.mark.parametrize("name", ALL)
def test_trace_in_float32_within_three_standard_errors(name: str) -> None:
    model, loss_fn, batch, hessian, _ = _float32_case(name)
    out = hessian_trace(model, loss_fn, batch, num_hvps=40, generator=make_generator(CPU, 11))
    assert abs(float(out.estimate) - float(hessian.trace())) <= 3 * float(out.std_error)


@pytest.mark.parametrize("size", [10**5, 2 * 10**6])
def test_lanczos_keeps_its_accuracy_over_millions_of_float32_entries(size: int) -> None:
    """A diagonal operator with a known spectrum (outliers 10, 9, 8 over a bulk in [0, 1]):
    float32 reductions over millions of entries once put λ₁ 2e-3 off, marked converged."""
    generator = torch.Generator().manual_seed(0)
    diagonal = torch.rand(size, generator=generator)
    diagonal[:3] = torch.tensor([10.0, 9.0, 8.0])
    start = torch.randn(size, generator=generator)
    out = lanczos_eigenpairs(
        lambda v: diagonal * v, start, k=3, tol=TOL, max_iter=60, generator=generator
    )
    assert out.converged.all()
    torch.testing.assert_close(
        out.eigenvalues, torch.tensor([10.0, 9.0, 8.0], dtype=torch.float64), rtol=TOL, atol=0
    )
