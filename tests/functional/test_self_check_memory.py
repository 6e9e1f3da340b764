"""The self-check keeps the previous vector without a copy where it can (issue 23, 1)."""

from __future__ import annotations

import pytest
import torch

from lightning_curvature.errors import CurvatureCheckError
from lightning_curvature.functional.linalg.sharded import VectorShards
from lightning_curvature.functional.operator.self_check import ProductCheck

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
