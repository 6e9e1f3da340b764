"""The finite-difference backend against dense Hessians on the smooth cases, and its refusal."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.operator.operator import HessianOperator
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
    top = torch.linalg.eigh((hessian + hessian.T) / 2).eigenvectors[:, -1]  # where Lanczos goes
    with HessianOperator(model, loss_fn, batch, backend="finite_difference") as operator:
        for i in range(4):
            random = torch.randn(operator.size, generator=generator, dtype=torch.float64)
            v = top if i == 3 else random
            product = operator.matvec(v.to(dtype)).double()
            exact = hessian @ v
            assert float((product - exact).norm() / exact.norm()) <= bound
    assert operator.num_hvps == 5  # and the self-check: the first product at ε/2
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


class FunctionalRelu(nn.Module):
    """A tanh layer, then ``F.relu`` called in ``forward`` (no module to find)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.relu(torch.tanh(self.first(x))))


def _transformer_layer() -> tuple[nn.Module, torch.Tensor]:
    return CASES_BY_NAME["transformer_layer"].build()[0], torch.randn(3, 5, 4, dtype=torch.float64)


def _functional_relu() -> tuple[nn.Module, torch.Tensor]:
    return FunctionalRelu().double(), torch.randn(3, 4, dtype=torch.float64)


def _smooth_conv() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
    return model.double(), torch.randn(3, 1, 5, 5, dtype=torch.float64)


@pytest.mark.parametrize(
    ("build", "node"),
    [
        (_transformer_layer, "ReluBackward0"),
        (_functional_relu, "ReluBackward0"),
        (_smooth_conv, None),
    ],
    ids=["transformer_layer", "functional_relu", "smooth_conv"],
)
def test_piecewise_linear_ops_in_the_graph_are_refused(
    build: Callable[[], tuple[nn.Module, torch.Tensor]], node: str | None
) -> None:
    """Kinks no module shows (``nn.TransformerEncoderLayer``'s default ``F.relu``) are found
    in the loss's autograd graph on entering; a smooth model passes."""
    with seeded(5):
        model, x = build()
        batch = (x, torch.randint(0, 3, (3,)))
    operator = HessianOperator(model, cross_entropy, batch, backend="finite_difference")
    if node is None:
        with operator:
            assert bool(operator.matvec(torch.ones(operator.size)).isfinite().all())
        return
    before = snapshot(model)
    with pytest.raises(ValueError, match="needs a smooth model") as error, operator:
        pass
    assert node in str(error.value)
    assert_unchanged(model, before)


class ReducedPrecision(nn.Module):
    """Computes its inner model in ``dtype`` (an autocast in its own forward), float32 out."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=self.dtype):
            return self.inner(x).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["mlp_tanh", "gelu_transformer"])
def test_reduced_precision_compute_warns_and_keeps_its_stated_accuracy(
    name: str, dtype: torch.dtype
) -> None:
    """A forward in bf16/fp16 limits finite differences to about eps^(2/3): one warning
    saying so; the products are within 5·eps^(2/3) of the float64 Hessian of the float32
    model (measured: 1-10% in bf16, 0.4-2.5% in fp16), and worse than float32's 1e-3."""
    model, loss_fn, batch = _smooth_case(name)
    model32, batch32 = _as(torch.float32, model, batch)
    hessian = dense_hessian(*_as(torch.float64, model32, batch32)[:1], loss_fn,
                            _as(torch.float64, model32, batch32)[1])  # fmt: skip
    limit = torch.finfo(dtype).eps ** (2 / 3)
    generator = torch.Generator().manual_seed(0)
    wrapped = ReducedPrecision(model32, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with HessianOperator(wrapped, loss_fn, batch32, backend="finite_difference") as operator:
            errors = []
            for _ in range(3):
                v = torch.randn(operator.size, generator=generator, dtype=torch.float64)
                exact = hessian @ v
                product = operator.matvec(v.float()).double()
                errors.append(float((product - exact).norm() / exact.norm()))
    messages = [str(w.message) for w in caught if issubclass(w.category, CurvatureWarning)]
    assert len(messages) == 1
    assert f"computes in {dtype}" in messages[0]
    assert f"{limit:.0e}" in messages[0]
    assert max(errors) <= 5 * limit
    assert min(errors) > 1e-3


def test_float32_compute_does_not_warn() -> None:
    model, loss_fn, batch = _smooth_case("gelu_transformer")
    model32, batch32 = _as(torch.float32, model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureWarning)
        with HessianOperator(model32, loss_fn, batch32, backend="finite_difference") as operator:
            operator.matvec(torch.ones(operator.size))
