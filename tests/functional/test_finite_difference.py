"""The finite-difference backend against dense Hessians on the smooth cases, and its refusal."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.hvp import HessianOperator
from lightning_curvature.functional.warnings import CurvatureWarning
from tests.functional.cases import (
    CASES_BY_NAME,
    assert_unchanged,
    cross_entropy,
    dense_hessian,
    seeded,
    snapshot,
)


class GeluTransformer(nn.Module):
    """One encoder layer with GELU (softmax attention, LayerNorm), mean-pooled, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, activation="gelu",
            batch_first=True,
        )  # fmt: skip
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=1))


def _smooth_case(name: str) -> tuple[nn.Module, object, object]:
    if name == "gelu_transformer":
        with seeded(3):
            model = GeluTransformer().double().eval()
            batch = (torch.randn(3, 5, 4, dtype=torch.float64), torch.randint(0, 3, (3,)))
        return model, cross_entropy, batch
    return CASES_BY_NAME[name].build()


SMOOTH = ["mlp_tanh", "mlp_gelu", "cnn_batchnorm_eval", "frozen_and_tied", "gelu_transformer"]


def _as(dtype: torch.dtype, model: nn.Module, batch: object) -> tuple[nn.Module, object]:
    x, y = batch if isinstance(batch, tuple) else (batch["x"], batch["y"])  # type: ignore[index]
    converted = (x.to(dtype), y)
    return copy.deepcopy(model).to(dtype), (
        converted if isinstance(batch, tuple) else {"x": converted[0], "y": y}
    )


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float64, 1e-7), (torch.float32, 1e-3)])
@pytest.mark.parametrize("name", SMOOTH)
def test_products_match_the_dense_hessian(name: str, dtype: torch.dtype, bound: float) -> None:
    model, loss_fn, batch = _smooth_case(name)
    model, batch = _as(dtype, model, batch)
    reference_model, reference_batch = _as(torch.float64, model, batch)
    hessian = dense_hessian(reference_model, loss_fn, reference_batch)
    before = snapshot(model)
    generator = torch.Generator().manual_seed(0)
    with HessianOperator(model, loss_fn, batch, backend="finite_difference") as operator:
        for _ in range(3):
            v = torch.randn(operator.size, generator=generator, dtype=torch.float64)
            product = operator.matvec(v.to(dtype)).double()
            exact = hessian @ v
            assert float((product - exact).norm() / exact.norm()) <= bound
    assert operator.num_hvps == 3
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", SMOOTH)
def test_top_eigenvalue_in_float32_within_the_default_tolerance(name: str) -> None:
    model, loss_fn, batch = _smooth_case(name)
    model32, batch32 = _as(torch.float32, model, batch)
    reference_model, reference_batch = _as(torch.float64, model32, batch32)
    exact = torch.linalg.eigvalsh(dense_hessian(reference_model, loss_fn, reference_batch))[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)
        out = hessian_eigenvalues(model32, loss_fn, batch32, backend="finite_difference")
    assert abs(float(out.eigenvalues[0]) - float(exact)) <= 1e-3 * abs(float(exact))


@pytest.mark.parametrize(
    ("model", "names"),
    [
        (CASES_BY_NAME["mlp_relu"].build()[0], "'1' (ReLU)"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2)), "'2' (MaxPool2d)"),
    ],
    ids=["relu", "max_pool"],
)
def test_piecewise_linear_models_are_refused(model: nn.Module, names: str) -> None:
    with pytest.raises(ValueError, match="needs a smooth model") as error:
        HessianOperator(model, cross_entropy, (torch.zeros(1), None), backend="finite_difference")
    assert names in str(error.value)
