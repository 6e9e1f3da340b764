"""Critical sharpness and its line search against closed forms.

On a quadratic ``L(w − ηu) − L(w) = −η gᵀu + ½η² uᵀHu``, so ``2/η_c = uᵀHu / gᵀu`` exactly:
the curvature along ``u`` when ``u = g``. The line search is checked on plain predicates
(where its cost is exact), the functional on the quadratic ``half_least_squares`` case
(dense Hessian) in float64 and float32 and on a non-quadratic model against a brute-force
scan of the loss.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_curvature import CriticalSharpness, NonFiniteCurvatureError, critical_sharpness
from lightning_curvature.functional.linalg.line_search import critical_step
from tests.functional.cases import CASES_BY_NAME, assert_unchanged, flat_loss, snapshot
from tests.functional.test_float32 import _to
from tests.functional.test_landscape import _reference

# -- the line search on plain predicates ----------------------------------------------------


@pytest.mark.parametrize("start", [1e-3, 0.05, 0.29, 0.31, 1.0, 40.0])
@pytest.mark.parametrize("rtol", [1e-2, 1e-4])
def test_the_bracket_holds_the_crossing_within_rtol(start: float, rtol: float) -> None:
    crossing = 0.3
    found = critical_step(lambda eta: eta > crossing, start, rtol=rtol, max_evals=60)
    assert found.converged
    assert found.lower <= crossing < found.upper <= found.lower * (1 + rtol)
    assert abs(found.step / crossing - 1) <= rtol


def test_a_warm_start_within_ten_percent_costs_six_evaluations() -> None:
    for start in (0.275, 0.29, 0.31, 0.325):
        seen: list[float] = []

        def rises(eta: float, seen: list[float] = seen) -> bool:
            seen.append(eta)
            return eta > 0.3

        assert critical_step(rises, start).num_evals == len(seen) <= 6


def test_open_brackets_are_not_converged() -> None:
    rose = critical_step(lambda eta: True, 1.0)  # the loss rises at once: no descent
    assert (rose.lower, rose.converged) == (0.0, False)
    assert 0 < rose.upper <= 1e-10  # it searched down to 1e-12 of the start
    assert rose.step == rose.upper
    never = critical_step(lambda eta: False, 1.0)
    assert (never.upper, never.converged, never.step) == (math.inf, False, math.inf)
    assert never.lower >= 1e10
    budget = critical_step(lambda eta: eta > 0.3, 100.0, max_evals=3)
    assert not budget.converged
    assert budget.num_evals == 3


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("start", 0.0, "`start` must be a finite number > 0, got 0.0"),
        ("start", math.inf, "`start` must be a finite number > 0, got inf"),
        ("rtol", -1.0, "`rtol` must be a finite number > 0, got -1.0"),
        ("growth", True, "`growth` must be a finite number > 0, got True"),
        ("max_evals", 1, "`max_evals` must be an integer >= 2, got 1"),
    ],
)
def test_search_settings_are_checked(name: str, value: Any, message: str) -> None:
    kwargs: dict[str, Any] = {"start": 1.0, name: value}
    start = kwargs.pop("start")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        critical_step(lambda eta: eta > 1, start, **kwargs)


# -- critical sharpness of a model -----------------------------------------------------------


def _quadratic(dtype: torch.dtype) -> tuple[nn.Module, Any, Any]:
    model, loss_fn, batch = CASES_BY_NAME["half_least_squares"].build()
    return copy.deepcopy(model).to(dtype), loss_fn, _to(batch, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("rtol", [1e-2, 1e-4])
def test_on_a_quadratic_it_is_the_curvature_along_the_gradient(
    dtype: torch.dtype, rtol: float
) -> None:
    model, loss_fn, batch = _quadratic(dtype)
    _, _, gradient, hessian = _reference(model, loss_fn, batch)
    exact = float(gradient @ hessian @ gradient / (gradient @ gradient))
    before = snapshot(model)
    out = critical_sharpness(model, loss_fn, batch, lambda g: g, rtol=rtol, max_evals=60)
    assert_unchanged(model, before)
    assert out.converged
    assert 2 / out.upper <= exact * (1 + 1e-6)
    assert exact <= 2 / out.lower * (1 + 1e-6)
    assert float(out.value) == pytest.approx(exact, rel=rtol)
    assert float(out.slope) == pytest.approx(float(gradient @ gradient), rel=1e-5)
    assert out.relative_to(2 / exact) == pytest.approx(1.0, rel=rtol)


def test_along_any_descent_direction_it_is_uHu_over_gu() -> None:
    model, loss_fn, batch = _quadratic(torch.float64)
    _, _, gradient, hessian = _reference(model, loss_fn, batch)
    adam_like = gradient / (gradient.abs() + 1e-3)  # a preconditioned (sign-like) update
    noise = torch.randn(
        gradient.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    tilted = gradient + 0.3 * noise * gradient.norm() / noise.norm()
    for update in (adam_like, tilted):
        exact = float(update @ hessian @ update / (gradient @ update))
        out = critical_sharpness(model, loss_fn, batch, update, rtol=1e-3)
        assert float(out.value) == pytest.approx(exact, rel=1e-3)
        assert math.isnan(float(out.slope))  # no gradient was computed for a given vector
        warm = critical_sharpness(model, loss_fn, batch, update, init=1.05 * out.step_size)
        assert warm.num_forwards <= 1 + 6  # L(w), then six points
        assert float(warm.value) == pytest.approx(exact, rel=1e-2)


def test_on_a_network_it_is_where_the_loss_along_the_update_crosses_its_start() -> None:
    """No closed form: the crossing is found by brute force on a fine scan of the same loss."""
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    loss_of, point = flat_loss(model, loss_fn, batch)
    gradient = torch.func.grad(loss_of)(point)
    out = critical_sharpness(model, loss_fn, batch, lambda g: g, init=0.5, rtol=1e-3)
    start = loss_of(point)
    assert loss_of(point - out.lower * gradient) <= start < loss_of(point - out.upper * gradient)
    scan = torch.linspace(0, out.upper, 2001, dtype=torch.float64)[1:]
    rose = [float(eta) for eta in scan if loss_of(point - eta * gradient) > start]
    assert rose
    assert rose[0] == pytest.approx(out.step_size, rel=2e-3)


def test_a_non_descent_update_and_a_loss_that_never_rises() -> None:
    model, loss_fn, batch = _quadratic(torch.float64)
    uphill = critical_sharpness(model, loss_fn, batch, lambda g: -g)
    assert float(uphill.slope) < 0
    assert not uphill.converged
    assert uphill.lower == 0.0
    assert float(uphill.value) > 1e10  # 2/upper: a lower bound, the loss rose at once

    class Line(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2, dtype=torch.float64))

    linear = critical_sharpness(Line(), lambda m, _: m.w.sum(), torch.zeros(1), lambda g: g)
    assert not linear.converged
    assert linear.upper == math.inf
    assert float(linear.value) == 0.0


def test_a_step_that_makes_the_loss_nan_counts_as_risen() -> None:
    """``(w − ½)²`` for w < 0.8, NaN beyond: from w = 0 along u = −1 it never rises, then NaN."""

    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def loss_fn(m: nn.Module, _: Any) -> torch.Tensor:
        w = m.w.sum()
        return torch.where(w < 0.8, (w - 0.5) ** 2, torch.full_like(w, math.nan))

    out = critical_sharpness(Scalar(), loss_fn, torch.zeros(1), -torch.ones(1), rtol=1e-4)
    assert out.converged
    assert out.step_size == pytest.approx(0.8, rel=1e-4)


def test_bad_luck_and_bad_input() -> None:
    net = nn.Linear(2, 1)
    with pytest.raises(NonFiniteCurvatureError, match="probe loss is not finite"):
        critical_sharpness(net, lambda m, b: m(b).sum() * math.inf, torch.ones(3, 2),
                           torch.ones(3))  # fmt: skip
    with pytest.raises(ValueError, match=r"`update` must be a flat vector of shape \(3,\)"):
        critical_sharpness(net, lambda m, b: m(b).sum(), torch.ones(3, 2), torch.ones(4))
    with pytest.raises(ValueError, match="`init` must be a finite number > 0"):
        critical_sharpness(net, lambda m, b: m(b).sum(), torch.ones(3, 2), torch.ones(3), init=0)


def test_the_result_is_a_frozen_dataclass() -> None:
    assert CriticalSharpness.__dataclass_params__.frozen  # type: ignore[attr-defined]
