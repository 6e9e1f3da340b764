"""The one Hessian-vector product against exact dense Hessians, for every case and backend."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_curvature.functional.operator.hvp import hessian_vector_product
from lightning_curvature.functional.operator.operator import HessianOperator
from tests.functional.cases import CASES, Case, flat_loss, reference, trainable

EXACT_BACKENDS = ("auto", "retained_graph", "double_backward", "forward_over_reverse")
# F.mse_loss has no forward-mode derivative of its backward in torch 2.13
# ("ZeroTensors are immutable"): forward-over-reverse must fail there with a clear error.
NO_FORWARD_MODE = {"mlp_relu", "least_squares"}


def _vectors(size: int, count: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(size)
    return torch.randn(count, size, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_reference_hessian_is_exact(case: Case) -> None:
    """The torch.func reference agrees with autograd's row-by-row Hessian and is symmetric."""
    model, loss_fn, batch = case.build()
    loss_of, point = flat_loss(model, loss_fn, batch)
    hessian, _ = reference(case.name)
    with sdpa_kernel(SDPBackend.MATH):
        rows = torch.autograd.functional.hessian(loss_of, point)
    assert hessian.shape == (point.numel(), point.numel())
    torch.testing.assert_close(hessian, rows, atol=1e-12, rtol=0)
    torch.testing.assert_close(rows, rows.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c.closed_form], ids=repr)
def test_least_squares_hessian_has_closed_form(case: Case) -> None:
    _, _, batch = case.build()
    hessian, _ = reference(case.name)
    torch.testing.assert_close(hessian, case.closed_form(batch), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_hvp_equals_dense_hessian_times_vector(case: Case, backend: str) -> None:
    model, loss_fn, batch = case.build()
    hessian, _ = reference(case.name)
    vectors = _vectors(hessian.shape[0])
    if backend == "forward_over_reverse" and case.name in NO_FORWARD_MODE:
        with (
            pytest.raises(RuntimeError, match="backend='forward_over_reverse' cannot pass"),
            HessianOperator(model, loss_fn, batch, backend=backend) as operator,
        ):
            operator.matvec(vectors[0])
        return
    with HessianOperator(model, loss_fn, batch, backend=backend) as operator:
        assert operator.size == hessian.shape[0]
        assert operator.dtype == torch.float64
        products = torch.stack([operator.matvec(v) for v in vectors])
        expected_backend = "retained_graph" if backend == "auto" else backend
        assert operator.backend == expected_backend
        assert operator.num_hvps == len(vectors)
    torch.testing.assert_close(products, vectors @ hessian.T, atol=1e-10, rtol=0)


def test_per_parameter_vectors_give_per_parameter_products() -> None:
    case = CASES[0]
    model, loss_fn, batch = case.build()
    hessian, _ = reference(case.name)
    flat = _vectors(hessian.shape[0], 1)[0]
    shapes = [p.shape for _, p in trainable(model)]
    pieces = list(torch.split(flat, [s.numel() for s in shapes]))
    product = hessian_vector_product(
        model, loss_fn, batch, [x.view(s) for x, s in zip(pieces, shapes, strict=True)]
    )
    assert [t.shape for t in product] == shapes
    torch.testing.assert_close(
        torch.cat([t.reshape(-1) for t in product]), hessian @ flat, atol=1e-10, rtol=0
    )
    torch.testing.assert_close(
        hessian_vector_product(model, loss_fn, batch, flat), hessian @ flat, atol=1e-10, rtol=0
    )


def test_parameter_subset_gives_the_diagonal_block() -> None:
    case = CASES[0]  # mlp_tanh: 0.weight, 0.bias, 2.weight, 2.bias
    model, loss_fn, batch = case.build()
    hessian, _ = reference(case.name)
    sizes = [p.numel() for name, p in trainable(model)]
    start = sum(sizes[:2])  # after 0.weight and 0.bias
    block = slice(start, sum(sizes))
    vector = _vectors(block.stop - start, 1)[0]
    product = hessian_vector_product(model, loss_fn, batch, vector, parameters="2.*")
    torch.testing.assert_close(product, hessian[block, block] @ vector, atol=1e-10, rtol=0)


def test_matvec_outside_the_context_is_an_error() -> None:
    model, loss_fn, batch = CASES[0].build()
    operator = HessianOperator(model, loss_fn, batch)
    with pytest.raises(RuntimeError, match="inside `with HessianOperator"):
        operator.matvec(torch.zeros(operator.size, dtype=torch.float64))
