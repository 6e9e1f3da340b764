"""The exact products go straight into one flat buffer (issue 23): same values, nothing leaks.

:func:`pullback_into` lets autograd accumulate each parameter's piece into a view of one
buffer through the leaves' ``.grad``; the leaves are the probe's own aliases of the
parameters, so the user's ``.grad`` and the aliases' must be as they were after every product.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_curvature.functional.operator.autodiff import pullback, pullback_into
from lightning_curvature.functional.operator.operator import HessianOperator
from tests.functional.cases import dense_hessian

EXACT = ["retained_graph", "double_backward"]


def _model(dtype: torch.dtype) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    x = torch.randn(8, 4, generator=generator, dtype=dtype)
    return model, (x, torch.randint(0, 3, (8,), generator=generator))


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _dense(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The float64 Hessian of the float64 copy of the model (``torch.func``)."""
    return dense_hessian(copy.deepcopy(model).double(), _loss, (batch[0].double(), batch[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_into_one_buffer_is_bitwise_the_concatenated_pieces(dtype: torch.dtype) -> None:
    model, batch = _model(dtype)
    leaves = [p.detach().requires_grad_(True) for p in model.parameters()]
    params = dict(zip([n for n, _ in model.named_parameters()], leaves, strict=True))
    loss = _loss(lambda x: torch.func.functional_call(model, params, (x,)), batch)  # type: ignore[arg-type]
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    size = sum(leaf.numel() for leaf in leaves)
    v = torch.randn(size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    chunks = torch.split(v, [leaf.numel() for leaf in leaves])
    vs = [c.view_as(leaf) for c, leaf in zip(chunks, leaves, strict=True)]
    pieces = torch.cat([g.reshape(-1) for g in pullback(grads, leaves, vs)])
    flat = pullback_into(torch.zeros(size, dtype=dtype), grads, leaves, vs)
    assert torch.equal(flat, pieces)
    assert all(leaf.grad is None for leaf in leaves)
    again = pullback_into(torch.zeros(size, dtype=dtype), grads, leaves, vs)  # graph kept
    assert torch.equal(again, flat)


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_equal_the_dense_hessian(backend: str, dtype: torch.dtype) -> None:
    model, batch = _model(dtype)
    hessian = _dense(model, batch)
    vectors = torch.randn(3, len(hessian), generator=torch.Generator().manual_seed(2))
    with HessianOperator(model, _loss, batch, backend=backend) as operator:  # type: ignore[arg-type]
        products = torch.stack([operator.matvec(v.to(dtype)) for v in vectors])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    expected = vectors.double() @ hessian.T
    assert products.dtype == dtype
    torch.testing.assert_close(products.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", EXACT)
def test_the_users_grad_and_the_aliases_grad_are_untouched(backend: str) -> None:
    model, batch = _model(torch.float32)
    first, *rest = model.parameters()
    first.grad = torch.full_like(first, 7.0)
    kept, weights = first.grad, [p.detach().clone() for p in model.parameters()]
    with HessianOperator(model, _loss, batch, backend=backend) as operator:  # type: ignore[arg-type]
        for seed in range(3):
            operator.matvec(
                torch.randn(operator.size, generator=torch.Generator().manual_seed(seed))
            )
            leaves = operator._dispatch.autodiff.losses.leaves  # type: ignore[union-attr]
            assert all(leaf.grad is None for leaf in leaves)
    assert first.grad is kept
    assert torch.equal(kept, torch.full_like(first, 7.0))
    assert all(p.grad is None for p in rest)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


class _Scaled(nn.Module):
    """A float32 layer times a float64 scalar: a measured leaf wider than the probe's float32."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) * self.scale


def test_a_wider_leaf_is_joined_from_pieces() -> None:
    torch.manual_seed(0)
    model, (x, y) = _Scaled(), _model(torch.float32)[1]
    hessian = _dense(model, (x, y))
    v = torch.randn(len(hessian), generator=torch.Generator().manual_seed(3))
    with HessianOperator(model, _loss, (x, y), backend="retained_graph") as operator:
        product = operator.matvec(v)
    torch.testing.assert_close(product.double(), hessian @ v.double(), rtol=1e-5, atol=1e-5)
