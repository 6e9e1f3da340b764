"""transformers GPT-2 through the fused CPU attention kernel, which has no second derivative.

``F.scaled_dot_product_attention`` on the CPU runs ``_scaled_dot_product_flash_attention_for_cpu``
when it may choose (float32, float64 and bfloat16 alike): its backward has no derivative and
it has no forward-mode derivative, so neither double backward nor forward-over-reverse can
pass through it. The finite-difference backend needs only its (first) backward: it runs the
kernels the caller allows, and ``backend="auto"`` falls back to it where a model forces the
fused kernel. Each λ₁ is checked against the math-kernel double-backward λ₁ of the same
float32 model (and both against the float64 reference).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional import hessian_eigenvalues
from lightning_curvature.functional.operator.operator import HessianOperator
from tests.zoo import zoo
from tests.zoo.reference import Reference

FLASH = "aten._scaled_dot_product_flash_attention_for_cpu.default"
TOL = 1e-5  # Lanczos' own tolerance, far below the 1e-3 compared (fp32 FD: ~1e-4 relative)


class _Ops(TorchDispatchMode):
    """Records the names of the aten ops run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


class ForcedFlash(nn.Module):
    """A model that insists on the fused kernel (an ``sdpa_kernel`` in its own forward)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs: Any) -> Any:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return self.inner(**kwargs)


def _forced_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return zoo.next_token_loss(model(input_ids=ids).logits, ids)


@functools.cache
def _gpt2() -> zoo.ZooCase:
    return zoo.gpt2("sdpa")


@functools.cache
def _exact_top() -> float:
    """λ₁ by double backward on the math kernel (``backend="double_backward"``), float32."""
    case = _gpt2()
    out = hessian_eigenvalues(case.model, case.loss_fn, case.batch, tol=TOL, max_iter=200,
                              backend="double_backward")  # fmt: skip
    assert bool(out.converged[0])
    return float(out.eigenvalues[0])


def _quiet_top(model: nn.Module, loss_fn: zoo.LossFn, batch: Any, backend: str) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)  # FD cannot certify TOL
        out = hessian_eigenvalues(model, loss_fn, batch, tol=TOL, max_iter=200,
                                  backend=backend)  # type: ignore[arg-type]  # fmt: skip
    return float(out.eigenvalues[0])


def test_the_cpu_flash_kernel_has_no_second_derivative() -> None:
    """What the fallback is for: both exact backends fail through the fused kernel."""
    case = _gpt2()
    with _Ops() as ops:
        loss = case.loss_fn(case.model, case.batch)
    assert FLASH in ops.names
    (gradient,) = torch.autograd.grad(loss, [case.model.transformer.h[0].attn.c_attn.weight],
                                      create_graph=True)  # fmt: skip
    with pytest.raises(RuntimeError, match="flash_attention_for_cpu_backward is not implemented"):
        torch.autograd.grad(gradient.sum(), case.model.transformer.h[0].attn.c_attn.weight)
    model = ForcedFlash(case.model)
    for backend in ("double_backward", "forward_over_reverse"):
        with (
            pytest.raises(RuntimeError, match="flash_attention_for_cpu"),
            HessianOperator(model, _forced_loss, case.batch, backend=backend) as operator,  # type: ignore[arg-type]
        ):
            operator.matvec(torch.ones(operator.size))


def test_finite_differences_run_the_fused_kernel_and_match_double_backward() -> None:
    case = _gpt2()
    exact = _exact_top()
    with _Ops() as ops:
        finite = _quiet_top(case.model, case.loss_fn, case.batch, "finite_difference")
    assert FLASH in ops.names  # the fused kernel ran (the math kernel runs no such op)
    assert finite == pytest.approx(exact, rel=1e-3)
    reference = float(Reference(case).top_eigenvalues(1)[0])
    assert exact == pytest.approx(reference, rel=1e-4)


def test_auto_falls_back_to_finite_differences_where_the_model_forces_the_fused_kernel() -> None:
    """And says so, once, naming the kernel that has neither derivative (the fallback was
    silent before); the result keeps it."""
    case = _gpt2()
    model = ForcedFlash(case.model)
    with HessianOperator(model, _forced_loss, case.batch) as operator:
        with pytest.warns(CurvatureWarning, match="runs 'finite_difference'") as said:
            operator.matvec(torch.ones(operator.size))
        assert operator.backend == "finite_difference"
    curvature = [str(w.message) for w in said if issubclass(w.category, CurvatureWarning)]
    assert len(curvature) == 1
    assert "flash_attention_for_cpu" in curvature[0]
    assert operator.fallback.startswith("finite_difference: it has neither a double backward")
    assert _quiet_top(model, _forced_loss, case.batch, "auto") == pytest.approx(
        _exact_top(), rel=1e-3
    )


class ReluAttention(nn.Module):
    """Fused attention forced, then a ReLU: no exact backend, and kinks for FD."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query(x).unsqueeze(1)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            attended = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return self.head(torch.relu(attended.squeeze(1)).mean(dim=1))


def test_auto_does_not_fall_back_to_finite_differences_through_kinks() -> None:
    with zoo.seeded(0) as generator:
        model = ReluAttention()
        batch = (torch.randn(3, 5, 4, generator=generator), torch.tensor([0, 1, 2]))

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    with (
        pytest.raises(RuntimeError, match=r"cannot fall back.*ReluBackward0"),
        HessianOperator(model, loss_fn, batch) as operator,
    ):
        operator.matvec(torch.ones(operator.size))


@pytest.mark.parametrize("name", ["gpt2_sdpa", "bert"])
def test_finite_difference_products_match_the_float64_hessian(name: str) -> None:
    """float32 products within 1e-3 of the float64 dense Hessian, random directions and the
    top eigenvector alike (the direction a Lanczos run converges to)."""
    case = zoo.BUILDERS[name]()
    hessian = Reference(case).dense()
    top = torch.linalg.eigh(hessian).eigenvectors[:, -1]
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(hessian.shape[0], generator=generator, dtype=torch.float64), top]
    with HessianOperator(case.model, case.loss_fn, case.batch,
                         backend="finite_difference") as operator:  # fmt: skip
        for v in vectors:
            exact = hessian @ v
            product = operator.matvec(v.float()).double()
            assert float((product - exact).norm() / exact.norm()) <= 1e-3
