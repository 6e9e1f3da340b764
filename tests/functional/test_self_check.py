"""The operator's other checks: wrong double backwards, dropout, dependence, fallbacks.

* a double backward that is wrong: a custom Function whose backward's own derivative is
  off (asymmetric products), found by the symmetry self-check of the exact backends;
  ``torch.nn.utils.weight_norm`` (torch's double backward of ``WeightNormInterfaceBackward0``
  is wrong, in float64 too), known: ``"auto"`` measures it by finite differences, the
  exact backends refuse it;
* ``dropout=True``: one set of masks per probe, so every backend's products are symmetric
  to rounding, repeatable, and equal across backends;
* a loss that does not reach the measured parameters is refused, naming them;
* every fallback of ``"auto"`` is said once and kept in the result;
* where Lanczos cannot certify finite-difference products, the warning names their error,
  not the dtype's rounding.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_curvature.errors import CurvatureCheckError, CurvatureWarning
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.operator.backends import BACKENDS
from lightning_curvature.functional.operator.operator import HessianOperator
from lightning_curvature.functional.operator.self_check import tolerance
from lightning_curvature.functional.trace import hessian_trace
from tests.functional.cases import CASES_BY_NAME, cross_entropy, dense_hessian, seeded

DTYPE = torch.float64
EXACT = ["retained_graph", "double_backward", "forward_over_reverse"]


def _vectors(size: int, count: int = 2, dtype: torch.dtype = DTYPE) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(size, generator=generator, dtype=dtype) for _ in range(count)]


def test_tolerances_are_those_of_the_dtype_the_model_computes_in() -> None:
    assert tolerance(torch.float32) == pytest.approx(9.7e-3, rel=1e-2)
    assert tolerance(torch.float64) == pytest.approx(1.47e-8, rel=1e-2)
    assert tolerance(torch.bfloat16) == 0.25  # capped


# -- a wrong double backward ------------------------------------------------------------------
class CubeGradient(torch.autograd.Function):
    """``3x²·g``, whose own backward is wrong in ``g`` (twice what it should be)."""

    @staticmethod
    def forward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return 3 * x**2 * grad

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, grad = ctx.saved_tensors
        return 6 * x * grad * g, 2 * 3 * x**2 * g


class Cube(torch.autograd.Function):
    """``x³`` with a backward that is differentiable, but wrongly so."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return CubeGradient.apply(x, g)  # type: ignore[no-any-return]


class CubeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.head = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(Cube.apply(self.first(x)))


def _cube_case() -> tuple[nn.Module, Any, Any]:
    with seeded(0):
        model = CubeNet().to(DTYPE)
        batch = (torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 1, dtype=DTYPE))

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        return F.mse_loss(m(b[0]), b[1])

    return model, loss_fn, batch


@pytest.mark.parametrize("backend", ["auto", "retained_graph", "double_backward"])
def test_a_wrong_double_backward_fails_the_symmetry_self_check(backend: str) -> None:
    """Its products are 18% asymmetric: refused at the second product, naming the custom
    Functions of the graph as suspects and finite differences as the way out."""
    model, loss_fn, batch = _cube_case()
    u, v = _vectors(sum(p.numel() for p in model.parameters()))
    with HessianOperator(model, loss_fn, batch, backend=backend) as operator:  # type: ignore[arg-type]
        operator.matvec(u)
        with pytest.raises(CurvatureCheckError, match="symmetry self-check") as refusal:
            operator.matvec(v)
    assert "Cube" in str(refusal.value)
    assert "backend='finite_difference'" in str(refusal.value)


def _weight_norm_case(dtype: torch.dtype) -> tuple[nn.Module, Any]:
    with seeded(4), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))
        batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    return model.to(dtype), (batch[0].to(dtype), batch[1])


def _weight_norm_hessian() -> torch.Tensor:
    """The Hessian of the same function with the weight written out as g·v/‖v‖ (float64)."""
    model, (x, y) = _weight_norm_case(DTYPE)
    point = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    sizes = [p.numel() for p in model.parameters()]  # bias, weight_g, weight_v, head

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        bias, gain, direction, weight, head_bias = torch.split(flat, sizes)
        v = direction.view(5, 4)
        first = gain.view(5, 1) * v / v.norm(dim=1, keepdim=True)
        hidden = torch.tanh(x @ first.T + bias)
        return F.cross_entropy(hidden @ weight.view(3, 5).T + head_bias, y)

    return torch.func.jacrev(torch.func.grad(loss_of))(point).detach()


@pytest.mark.parametrize("dtype", [torch.float32, DTYPE])
def test_weight_norm_is_measured_by_finite_differences_and_said_so(dtype: torch.dtype) -> None:
    model, batch = _weight_norm_case(dtype)
    hessian = _weight_norm_hessian()
    with pytest.warns(CurvatureWarning, match="runs 'finite_difference'.*WeightNormInterface"):
        out = hessian_eigenvalues(model, cross_entropy, batch, k=2)
    assert out.backend == "finite_difference"
    assert "weight_norm" in out.fallback
    exact = torch.linalg.eigvalsh((hessian + hessian.T) / 2).flip(0)[:2]
    torch.testing.assert_close(out.eigenvalues.double(), exact, rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", ["retained_graph", "double_backward"])
def test_weight_norm_is_refused_by_the_exact_backends(backend: str) -> None:
    model, batch = _weight_norm_case(DTYPE)
    with pytest.raises(RuntimeError, match="WeightNormInterfaceBackward0") as refusal:
        hessian_eigenvalues(model, cross_entropy, batch, backend=backend)  # type: ignore[arg-type]
    assert "backend='finite_difference'" in str(refusal.value)


# -- dropout kept on --------------------------------------------------------------------------
class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.drop, self.head = nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.first(x))))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "auto"])
def test_dropout_kept_on_is_one_fixed_operator(backend: str) -> None:
    """One set of masks per probe: uᵀHv = vᵀHu to rounding, a product repeats exactly, and
    every backend measures the same operator (the masks drawn from the probe's start)."""
    with seeded(2):
        model = DropoutNet().to(DTYPE).train()
        batch = (torch.randn(16, 4, dtype=DTYPE), torch.randint(0, 3, (16,)))
    u, v = _vectors(sum(p.numel() for p in model.parameters()))

    def products(backend: str) -> tuple[torch.Tensor, ...]:
        with (
            seeded(11),
            HessianOperator(model, cross_entropy, batch, backend=backend, dropout=True) as op,  # type: ignore[arg-type]
        ):
            return op.matvec(u), op.matvec(v), op.matvec(u)

    hu, hv, again = products(backend)
    assert float((u @ hv - v @ hu).abs()) <= 1e-9 * float(u.norm() * hv.norm())
    rtol = 1e-6 if backend == "finite_difference" else 1e-12
    torch.testing.assert_close(again, hu, rtol=rtol, atol=0)
    torch.testing.assert_close(hv, products("double_backward")[1], rtol=1e-6, atol=1e-9)
    # the masks are on: the operator differs from the eval-mode one
    with HessianOperator(model, cross_entropy, batch, backend=backend) as off:  # type: ignore[arg-type]
        assert float((off.matvec(v) - hv).norm()) > 0.1 * float(hv.norm())


# -- a loss that does not depend on the measured parameters -----------------------------------
class UnusedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loss_without_the_measured_parameters_is_refused_naming_them(backend: str) -> None:
    """Three backends raised autograd's raw error, forward-over-reverse returned λ = 0
    marked converged."""
    with seeded(3):
        model = UnusedHead().to(DTYPE)
        batch = (torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,)))
    with pytest.raises(ValueError, match=r"does not depend on the measured parameters \(head"):
        hessian_eigenvalues(model, cross_entropy, batch, parameters="head.*", backend=backend)  # type: ignore[arg-type]


# -- fallbacks and results --------------------------------------------------------------------
def test_results_say_which_backend_ran() -> None:
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    out = hessian_trace(model, loss_fn, batch, num_hvps=4)
    assert (out.backend, out.fallback) == ("retained_graph", "")
    out = hessian_trace(model, loss_fn, batch, num_hvps=4, backend="finite_difference")
    assert (out.backend, out.fallback) == ("finite_difference", "")


def test_an_uncertified_finite_difference_names_its_own_error_not_the_dtype() -> None:
    """tol far below what float32 finite differences resolve: the warning says so, and
    advises an exact backend (float64 would not remove a kink)."""
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    model32, batch32 = model.float(), (batch[0].float(), batch[1])
    with pytest.warns(CurvatureWarning, match="the finite difference's own error") as said:
        hessian_eigenvalues(model32, loss_fn, batch32, tol=1e-7, backend="finite_difference")
    message = str(said[0].message)
    assert "rounding of the dtype" not in message
    assert "use an exact backend" in message


def test_the_exact_backends_pass_their_self_check_on_the_dense_cases() -> None:
    """Symmetric to rounding: the self-check sees nothing on the smooth cases (float64)."""
    for name in ["mlp_tanh", "cnn_batchnorm_eval", "frozen_and_tied", "transformer_layer"]:
        model, loss_fn, batch = CASES_BY_NAME[name].build()
        hessian = dense_hessian(model, loss_fn, batch)
        for backend in EXACT:
            with HessianOperator(model, loss_fn, batch, backend=backend) as operator:  # type: ignore[arg-type]
                products = [operator.matvec(v) for v in _vectors(operator.size, 3)]
                assert operator._self_check.largest < 1e-2  # of its tolerance
            for v, product in zip(_vectors(hessian.shape[0], 3), products, strict=True):
                torch.testing.assert_close(product, hessian @ v, rtol=1e-9, atol=1e-9)


def test_tf32_on_cuda_counts_as_a_ten_bit_mantissa() -> None:
    """Exact float32 products under TF32 are ~1e-3 asymmetric: the tolerance is taken for
    float16's rounding there (checked with the flags alone: no GPU here)."""
    from lightning_curvature.functional.operator.self_check import rounding_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    linear, conv = nn.Linear(2, 2), nn.Sequential(nn.Conv2d(1, 1, 1))
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert rounding_dtype(torch.float32, cuda, linear) == torch.float32
        assert rounding_dtype(torch.float32, cuda, conv) == (
            torch.float16 if torch.backends.cudnn.allow_tf32 else torch.float32
        )
        torch.set_float32_matmul_precision("high")
        assert rounding_dtype(torch.float32, cuda, linear) == torch.float16
        assert rounding_dtype(torch.float32, cpu, linear) == torch.float32
        assert rounding_dtype(torch.float64, cuda, linear) == torch.float64
        torch.set_float32_matmul_precision("medium")
        assert rounding_dtype(torch.float32, cuda, linear) == torch.bfloat16
    finally:
        torch.set_float32_matmul_precision(precision)
