"""Gauss quadrature of the spectral measure seen from a start vector, by Lanczos.

The nodes and weights that stochastic Lanczos quadrature averages
(:mod:`~lightning_curvature.functional.density`).
"""

from __future__ import annotations

import torch

from lightning_curvature.functional.linalg.lanczos import LanczosProcess, Matvec
from lightning_curvature.functional.linalg.sharded import VectorShards

__all__ = ["lanczos_quadrature"]


def lanczos_quadrature(
    matvec: Matvec, start: torch.Tensor, num_steps: int, shards: VectorShards | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss quadrature nodes and weights of the spectral measure seen from ``start``.

    The weights are the squared first components of the eigenvectors of ``T`` and sum to 1
    (Golub & Meurant 2010). Stops early, with fewer nodes, if the Krylov space is invariant.

    ``shards``: the vectors' split across processes (see :class:`LanczosProcess`).

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> start = torch.ones(2, dtype=torch.float64)
        >>> nodes, weights = lanczos_quadrature(lambda v: A @ v, start, 2)
        >>> nodes.round(decimals=12), weights.round(decimals=12)
        (tensor([1., 2.], dtype=torch.float64), tensor([0.5000, 0.5000], dtype=torch.float64))
    """
    run = LanczosProcess(matvec, start, num_steps, shards=shards)
    while run.step():
        pass
    values, vectors = torch.linalg.eigh(run.projection())
    return values, vectors[0, :] ** 2
