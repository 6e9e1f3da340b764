"""Gauss quadrature of the spectral measure seen from a start vector, by Lanczos.

The nodes and weights that stochastic Lanczos quadrature averages
(:mod:`~lightning_curvature.functional.density`). Where the whole basis would exceed
:data:`~lightning_curvature.functional.linalg.basis.FULL_BASIS_ENTRIES`, the run keeps
the recurrence's last two vectors (local reorthogonalisation): a quadrature needs ``T``
alone, and finite-precision Lanczos still gives the Gauss quadrature of a measure close to
the start's (Greenbaum 1989; Meurant & Strakoš 2006): a converged eigenvalue's copies share
its weight. Measured against the whole basis from the same starts
(``benchmarks/bench_slq_memory.py``): the smoothed densities differ far less than one
run's own error does.
"""

from __future__ import annotations

import torch

from lightning_curvature.functional.linalg.basis import basis_layout
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
    size = start.numel() if shards is None else shards.size  # global: every process alike
    keep, _ = basis_layout(size, num_steps)  # one at a time, no Ritz vector: two rows above
    run = LanczosProcess(matvec, start, num_steps, shards=shards, keep=keep)
    while run.step():
        pass
    values, vectors = torch.linalg.eigh(run.projection())
    return values, vectors[0, :] ** 2
