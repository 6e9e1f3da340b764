"""Inner products and norms of long vectors: slices in the vectors' dtype, summed in float64.

A float32 dot product over ``P`` entries accumulated whole loses up to ``P·eps`` of its value
in the worst case and about ``√P·eps`` typically; at ``P = 10⁷`` a whole-vector float32 dot
was off by 2.5e-7 of ``‖a‖‖b‖`` and a norm by 3.3e-5, and Lanczos' λ₁ by up to 7.5e-3,
beyond the ``tol = 1e-3`` its flags certify (``benchmarks/bench_float32_scale.py``). So the
vectors are reduced a slice of :data:`CHUNK` entries at a time, each slice's dot product
taken in the vectors' own dtype (BLAS, which accumulates a slice in blocks) and the slices'
sums added in float64: at ``P = 10⁷``, 1.3e-9 of ``‖a‖‖b‖`` off and 1.2e-8 on a norm of
Gaussian vectors, 2e-8 on the squared norm of uniform ones; entries that all round alike
are the worst case (``3·2¹⁶`` copies of 0.1: 1.4e-5), still far below ``tol``. A float64
reduction (4.5e-17) costs 3.3x the time: each slice converted to float64 first, which was
the largest part of a Lanczos step's own cost. Nothing of ``P`` entries is converted or
allocated: the only float64 numbers are one per slice. Lanczos takes its ``α`` from both
of its orthogonalisation passes, the second correcting the first's rounding.
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK", "all_finite", "inner_products", "norm"]

CHUNK = 1 << 16  # entries per slice: its float32 dot is off by ~1e-9 of ‖a‖‖b‖ (measured)


def inner_products(rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``rows @ vector`` as a float64 tensor on ``vector``'s device (see the module doc).

    Vectors of at most :data:`CHUNK` entries, and float64 ones, are reduced in float64.

    Args:
        rows: ``(m, P)`` matrix (e.g. a Lanczos basis), or one ``(P,)`` vector.
        vector: ``(P,)`` vector of the same dtype.

    Example:
        >>> a = torch.ones(3, 4)
        >>> inner_products(a, torch.arange(4.0))
        tensor([6., 6., 6.], dtype=torch.float64)
        >>> x = torch.rand(3 * CHUNK, generator=torch.Generator().manual_seed(0))
        >>> exact = float(x.double() @ x.double())
        >>> abs(float(inner_products(x, x)) - exact) / exact < 1e-7
        True
    """
    if rows.dtype == torch.float64 or rows.shape[-1] <= CHUNK:
        return (rows.to(torch.float64) @ vector.to(torch.float64)).to(torch.float64)
    slices = [
        rows[..., start : start + CHUNK] @ vector[start : start + CHUNK]
        for start in range(0, rows.shape[-1], CHUNK)
    ]
    return torch.stack(slices).to(torch.float64).sum(dim=0)


def norm(vector: torch.Tensor) -> float:
    """Euclidean norm of ``vector`` (see :func:`inner_products`).

    Example:
        >>> norm(torch.tensor([3.0, 4.0]))
        5.0
    """
    return float(inner_products(vector, vector).sqrt())


def all_finite(vector: torch.Tensor) -> bool:
    """Whether every entry of ``vector`` is finite, from one sum (no mask of ``P`` entries).

    A NaN or an infinity makes the sum NaN or infinite; finite entries only where their sum
    overflows the dtype (entries near ``3e38 / P`` in float32: a product that large
    overflows the self-check's inner products anyway). ``torch.isfinite(v).all()`` allocates
    a mask of ``P`` bytes and reads ``v`` and the mask: at ``P = 10⁶`` on one CPU thread
    2.8 ms against 0.25 ms for the sum, at ``10⁷`` up to 84 ms (a third of the product it
    checked); ``benchmarks/bench_product_cost.py``.

    Example:
        >>> all_finite(torch.ones(3)), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
        >>> all_finite(torch.tensor([float("inf"), -float("inf")]))
        False
    """
    return bool(torch.isfinite(vector.sum()))
