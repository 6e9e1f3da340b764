"""Inner products and norms of long vectors, accumulated in float64.

A float32 dot product over ``P`` entries loses up to ``P·eps`` of its value in the worst case
and about ``√P·eps`` typically; at ``P = 10⁷`` that is already ``4e-4`` (typical) and can reach
the ``tol = 1e-3`` the Lanczos flags certify. Lanczos takes its ``α``, ``β`` and the
reorthogonalisation coefficients from these reductions, so they are accumulated in float64,
a slice of at most :data:`CHUNK` entries at a time: the extra memory stays at one float64
slice of the basis, whatever ``P``.
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK", "inner_products", "norm"]

CHUNK = 1 << 16  # entries per float64 slice: (m + 1) · 2¹⁶ · 8 bytes, 16 MiB at m = 31


def inner_products(rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``rows @ vector`` with float64 accumulation (a float64 tensor on ``vector``'s device).

    Args:
        rows: ``(m, P)`` matrix (e.g. a Lanczos basis), or one ``(P,)`` vector.
        vector: ``(P,)`` vector of the same dtype.

    Example:
        >>> a = torch.ones(3, 4)
        >>> inner_products(a, torch.arange(4.0))
        tensor([6., 6., 6.], dtype=torch.float64)
    """
    if rows.dtype == torch.float64 or rows.shape[-1] <= 1:
        return (rows.to(torch.float64) @ vector.to(torch.float64)).to(torch.float64)
    total = torch.zeros(rows.shape[:-1], dtype=torch.float64, device=vector.device)
    for start in range(0, rows.shape[-1], CHUNK):
        stop = start + CHUNK
        total += rows[..., start:stop].to(torch.float64) @ vector[start:stop].to(torch.float64)
    return total


def norm(vector: torch.Tensor) -> float:
    """Euclidean norm of ``vector``, accumulated in float64.

    Example:
        >>> norm(torch.tensor([3.0, 4.0]))
        5.0
    """
    return float(inner_products(vector, vector).sqrt())
