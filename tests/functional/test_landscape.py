"""``loss_slice`` against brute force on the shared tiny cases.

The losses along a slice are compared with the loss at the same points computed
independently (the model as a pure function of one flat vector, ``cases.flat_loss``); the
quadratic model's slope and curvature with the gradient and the dense Hessian
(``torch.func``). float64: to rounding. float32: the reference is float64 at the
float32-rounded weights and data (``1e-4`` relative to the loss, ``‖H‖``).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from lightning_curvature import LossSlice, loss_slice
from lightning_curvature.errors import NonFiniteCurvatureError
from tests.functional.cases import (
    CASES,
    CASES_BY_NAME,
    assert_unchanged,
    dense_hessian,
    flat_loss,
    snapshot,
)
from tests.functional.test_float32 import _to

NAMES = [case.name for case in CASES]
DTYPES = [torch.float64, torch.float32]
OFFSETS = [-1.0, -0.5, 0.0, 0.25, 0.5, 1.0]


def _case(name: str, dtype: torch.dtype) -> tuple[nn.Module, Any, Any]:
    model, loss_fn, batch = CASES_BY_NAME[name].build()
    return copy.deepcopy(model).to(dtype), loss_fn, _to(batch, dtype)


def _reference(model: nn.Module, loss_fn: Any, batch: Any) -> tuple[Any, torch.Tensor, Any, Any]:
    """Loss of a flat vector, the point, gradient and Hessian: float64 at the same weights."""
    model64, batch64 = copy.deepcopy(model).double(), _to(batch, torch.float64)
    loss_of, point = flat_loss(model64, loss_fn, batch64)
    hessian = dense_hessian(model64, loss_fn, batch64)
    return loss_of, point, torch.func.grad(loss_of)(point), (hessian + hessian.T) / 2


def _directions(size: int, count: int, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    rows = torch.randn(count, size, generator=generator, dtype=torch.float64)
    return scale * rows / rows.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_slices_are_the_loss_at_the_points_and_the_model_is_the_dense_one(
    name: str, dtype: torch.dtype
) -> None:
    model, loss_fn, batch = _case(name, dtype)
    loss_of, point, gradient, hessian = _reference(model, loss_fn, batch)
    rows = _directions(point.numel(), 2, scale=0.3)
    before = snapshot(model)
    out = loss_slice(model, loss_fn, batch, rows.to(dtype), OFFSETS)
    assert_unchanged(model, before)
    rows = rows.to(dtype).double()  # the directions as the probe saw them
    exact = torch.stack([torch.stack([loss_of(point + t * d) for t in OFFSETS]) for d in rows])
    loss_tol = (1e-12 if dtype == torch.float64 else 1e-5) * max(1.0, float(exact.abs().max()))
    assert float((out.losses - exact).abs().max()) <= loss_tol
    assert float((out.loss - loss_of(point)).abs()) <= loss_tol
    scale = float(torch.linalg.matrix_norm(hessian, ord=2)) + float(gradient.norm())
    form_tol = (1e-10 if dtype == torch.float64 else 1e-4) * max(scale, 1.0)
    assert float((out.slopes - rows @ gradient).abs().max()) <= form_tol
    assert float((out.hessian_form - rows @ hessian @ rows.T).abs().max()) <= form_tol
    assert float((out.squared_norms - (rows * rows).sum(1)).abs().max()) <= 1e-12
    assert out.num_hvps == 2
    assert out.num_forwards == 1 + 2 * (len(OFFSETS) - 1)  # L₀, and no forward at t = 0
    assert not out.grid


@pytest.mark.parametrize("name", ["mlp_tanh", "cnn_batchnorm_eval", "half_least_squares"])
def test_a_grid_over_two_directions_and_its_cross_term(name: str) -> None:
    model, loss_fn, batch = _case(name, torch.float64)
    loss_of, point, gradient, hessian = _reference(model, loss_fn, batch)
    rows = _directions(point.numel(), 2, scale=0.5)
    grid = [-0.5, 0.0, 0.5]
    out = loss_slice(model, loss_fn, batch, rows, grid, grid=True)
    assert out.grid
    assert out.losses.shape == (3, 3)
    for i, a in enumerate(grid):
        for j, b in enumerate(grid):
            exact = loss_of(point + a * rows[0] + b * rows[1])
            assert abs(float(out.losses[i, j] - exact)) <= 1e-12 * max(1.0, abs(float(exact)))
            step = a * rows[0] + b * rows[1]
            quadratic = loss_of(point) + step @ gradient + 0.5 * step @ hessian @ step
            assert abs(float(out.quadratic_model()[i, j] - quadratic)) <= 1e-10
    assert abs(float(out.hessian_form[0, 1] - rows[0] @ hessian @ rows[1])) <= 1e-10
    assert out.num_forwards == 1 + 8


def test_along_the_top_eigenvector_of_a_quadratic_the_slice_is_its_parabola() -> None:
    """``½ mean((x·w − y)²)``: H = XᵀX/n everywhere, so every slice is an exact parabola."""
    model, loss_fn, batch = _case("half_least_squares", torch.float64)
    _, _point, gradient, hessian = _reference(model, loss_fn, batch)
    values, vectors = torch.linalg.eigh(hessian)
    top, v = float(values[-1]), vectors[:, -1]
    direction = -(gradient @ v) * v  # t is gradient descent's step size along v
    steps = [-2.0 / top, -1.0 / top, -0.3 / top, 0.0, 0.3 / top, 1.0 / top, 2.0 / top]
    out = loss_slice(model, loss_fn, batch, direction, steps)
    assert float((out.losses - out.quadratic_model()).abs().max()) <= 1e-12
    assert float(out.curvatures()[0]) == pytest.approx(top, rel=1e-12)
    for t in (0.3 / top, 1.0 / top, 2.0 / top):
        assert float(out.secant_curvatures(t)[0]) == pytest.approx(top, rel=1e-9)
        assert abs(float(out.asymmetries(t)[0])) <= 1e-9
    assert float(out.level_offsets()[0]) == pytest.approx(2.0 / top, rel=1e-12)
    # the loss is back at L₀ at the threshold step 2/λ, lowest at 1/λ
    assert float(out.losses[0, 6]) == pytest.approx(float(out.loss), rel=1e-12)
    assert float(out.losses[0, 5]) == float(out.losses[0].min())


def test_secant_and_asymmetry_see_a_cubic() -> None:
    """``L(w) = w² + w³`` at w = 0: secant curvature 2 at any t, asymmetry ``t`` (odd over even)."""

    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def loss_fn(m: nn.Module, _: Any) -> torch.Tensor:
        return (m.w**2 + m.w**3).sum()

    out = loss_slice(Scalar(), loss_fn, torch.zeros(1), torch.ones(1), [-0.5, 0.0, 0.5])
    assert out.losses.tolist() == [[0.125, 0.0, 0.375]]
    assert out.secant_curvatures(0.5).tolist() == [2.0]
    assert out.asymmetries(0.5).tolist() == [0.5]  # 2t³ / 2t²
    assert out.quadratic_model().tolist() == [[0.25, 0.0, 0.25]]


def test_a_point_that_overflows_is_kept_not_raised() -> None:
    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

    out = loss_slice(
        Scalar(), lambda m, _: torch.exp(m.w * 100).sum(), torch.zeros(1), torch.ones(1),
        [-1.0, 0.0, 1.0],
    )  # fmt: skip
    assert float(out.losses[0, 0]) < 1e-40  # e^-100, a float32 subnormal
    assert float(out.losses[0, 2]) == float("inf")


def test_every_loss_and_product_goes_through_all_reduce() -> None:
    model, loss_fn, batch = _case("mlp_tanh", torch.float64)
    seen: list[tuple[int, ...]] = []

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(tensor.shape))
        return tensor

    size = sum(p.numel() for p in model.parameters())
    out = loss_slice(model, loss_fn, batch, _directions(size, 1, 0.1), [-1.0, 0.0, 1.0],
                     all_reduce=all_reduce)  # fmt: skip
    losses = [shape for shape in seen if shape == ()]
    assert len(losses) >= out.num_forwards  # every loss of the slice (and the probe's check)
    assert seen.count((size,)) == 2  # the gradient and the one product


def test_bad_arguments_are_refused_with_their_name() -> None:
    model, loss_fn, batch = _case("mlp_tanh", torch.float64)
    size = sum(p.numel() for p in model.parameters())
    rows = _directions(size, 3, 1.0)
    with pytest.raises(ValueError, match="`directions` must be"):
        loss_slice(model, loss_fn, batch, torch.ones(size + 1), [1.0])
    with pytest.raises(ValueError, match="a grid needs exactly 2 directions, got 3"):
        loss_slice(model, loss_fn, batch, rows, [1.0], grid=True)
    with pytest.raises(ValueError, match="`offsets` must be"):
        loss_slice(model, loss_fn, batch, rows, torch.ones(2, 4))
    with pytest.raises(ValueError, match="`offsets` must be finite"):
        loss_slice(model, loss_fn, batch, rows[0], [float("nan")])
    from lightning_curvature import OperatorOptions

    with pytest.raises(ValueError, match="curvature='ggn'"):
        loss_slice(model, loss_fn, batch, rows[0], [1.0], options=OperatorOptions(curvature="ggn"))
    out = loss_slice(model, loss_fn, batch, rows[:2], [0.0, 0.5])
    with pytest.raises(ValueError, match=r"both 1.0 and -1.0 must be among the offsets"):
        out.secant_curvatures(1.0)
    grid = loss_slice(model, loss_fn, batch, rows[:2], [-0.5, 0.0, 0.5], grid=True)
    with pytest.raises(ValueError, match="of 1-D slices, not grids"):
        grid.asymmetries(0.5)


def test_a_non_finite_loss_at_w_is_bad_luck() -> None:
    net = nn.Linear(2, 1)
    with pytest.raises(NonFiniteCurvatureError):
        loss_slice(net, lambda m, b: m(b).sum() * float("nan"), torch.ones(3, 2),
                   torch.ones(3), [1.0])  # fmt: skip


def test_the_result_is_a_frozen_dataclass() -> None:
    assert LossSlice.__dataclass_params__.frozen  # type: ignore[attr-defined]
