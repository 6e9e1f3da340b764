"""The self-check keeps the previous vector without a copy where it can (issue 23, 1)."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from lightning_curvature.errors import CurvatureCheckError, CurvatureWarning
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.linalg import basis
from lightning_curvature.functional.linalg.sharded import VectorShards
from lightning_curvature.functional.operator.dispatch import BackendDispatch
from lightning_curvature.functional.operator.operator import HessianOperator
from lightning_curvature.functional.operator.self_check import ProductCheck
from lightning_curvature.functional.trace import hessian_trace

N = 50


def _asymmetric() -> torch.Tensor:
    a = torch.randn(N, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return a  # a random matrix, far from symmetric: every compared pair fails


def _check() -> ProductCheck:
    check = ProductCheck(VectorShards.single(N))
    check.compute_dtype = torch.float64
    return check


def _vector(seed: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_a_vector_of_its_own_is_kept_by_reference_and_compared() -> None:
    a, check, u = _asymmetric(), _check(), _vector(1)
    check.symmetric(u, a @ u)
    assert check._kept is not None
    assert check._kept[0].data_ptr() == u.data_ptr()  # no copy of P entries
    with pytest.raises(CurvatureCheckError):
        check.symmetric(_vector(2), a @ _vector(2))


def test_a_vector_changed_in_place_after_its_product_is_not_compared() -> None:
    a, check, u = _asymmetric(), _check(), _vector(1)
    check.symmetric(u, a @ u)
    u.mul_(2.0)  # the pair (u, Au) no longer holds: skipped, neither passed nor failed
    check.symmetric(_vector(2), a @ _vector(2))
    assert check.largest == 0.0


def test_a_row_of_a_larger_tensor_is_copied_and_still_compared() -> None:
    """A Lanczos basis writes its next row into the same storage as the last one."""
    a, check = _asymmetric(), _check()
    rows = torch.zeros(2, N, dtype=torch.float64)
    rows[0] = _vector(1)
    check.symmetric(rows[0], a @ rows[0])
    assert check._kept is not None
    assert check._kept[0].data_ptr() != rows.data_ptr()
    rows[1] = _vector(2)  # bumps the version of every view of `rows`
    with pytest.raises(CurvatureCheckError):
        check.symmetric(rows[1], a @ rows[1])


def test_prepare_lets_go_of_the_previous_product_and_still_compares() -> None:
    a, check, u, v = _asymmetric(), _check(), _vector(1), _vector(2)
    check.symmetric(u, a @ u)
    check.prepare(v)
    assert check._product is None  # vᵀ(Au) taken: Au is no longer held
    with pytest.raises(CurvatureCheckError):
        check.symmetric(v, a @ v)


def test_the_operator_lets_go_of_the_previous_product_before_the_next() -> None:
    """A λ₁ probe's peak is a product's backward: the previous product, which the
    self-check compares with, is not alive then (one vector less), and the pair is
    still compared."""
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    with HessianOperator(net, lambda m, b: m(b).pow(2).mean(), x) as operator:
        first = operator.matvec(torch.ones(operator.size))
        previous = weakref.ref(first)
        del first
        alive: list[bool] = []
        product = operator._dispatch.product

        def spied(*args: Any, **kwargs: Any) -> torch.Tensor:
            alive.append(previous() is not None)
            return product(*args, **kwargs)

        judged: list[float] = []
        check = operator._self_check
        judge = check._judge
        check._judge = lambda found, what: (judged.append(found), judge(found, what))  # type: ignore[method-assign]
        operator._dispatch.product = spied  # type: ignore[method-assign]
        operator.matvec(torch.arange(float(operator.size)))
        assert alive == [False]
        assert len(judged) == 1  # the pair was compared


@pytest.mark.parametrize("probe", ["two-row λ₁", "trace"])
def test_no_earlier_product_is_alive_through_a_probe_s_next_product(
    probe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a product's backward runs, nothing holds an earlier product: not the
    self-check, not Lanczos, not the trace's loop (each would be one vector more at the
    probe's peak)."""
    products: list[weakref.ref[torch.Tensor]] = []
    alive: list[int] = []
    matvec, product = HessianOperator.matvec, BackendDispatch.product

    def recorded(self: HessianOperator, vector: torch.Tensor) -> torch.Tensor:
        out = matvec(self, vector)
        products.append(weakref.ref(out))
        return out

    def counted(self: BackendDispatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        alive.append(sum(ref() is not None for ref in products))
        return product(self, *args, **kwargs)

    monkeypatch.setattr(HessianOperator, "matvec", recorded)
    monkeypatch.setattr(BackendDispatch, "product", counted)
    monkeypatch.setattr(basis, "FULL_BASIS_ENTRIES", 1)  # λ₁ on two rows
    net = nn.Linear(300, 240)  # 72,240 parameters: the trace's products go one by one
    x = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    loss = lambda m, b: m(b).tanh().pow(2).mean()  # noqa: E731
    generator = torch.Generator().manual_seed(1)
    if probe == "trace":
        hessian_trace(net, loss, x, num_hvps=6, generator=generator)
    else:
        with warnings.catch_warnings():  # uncertified in 8 products: not what is tested
            warnings.simplefilter("ignore", CurvatureWarning)
            hessian_eigenvalues(net, loss, x, max_iter=8, generator=generator)
    assert len(alive) >= 6
    assert alive == [0] * len(alive)
