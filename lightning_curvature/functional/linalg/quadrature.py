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

from collections.abc import Callable

import torch

from lightning_curvature.functional.linalg.basis import basis_layout
from lightning_curvature.functional.linalg.lanczos import LanczosProcess, Matvec
from lightning_curvature.functional.linalg.sharded import VectorShards

__all__ = ["lanczos_quadrature", "lanczos_quadratures"]


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
    return lanczos_quadratures(matvec, start.unsqueeze(0), num_steps, shards)[0]


def lanczos_quadratures(
    matvec: Matvec,
    starts: torch.Tensor,
    num_steps: int,
    shards: VectorShards | None = None,
    products: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`lanczos_quadrature` from each row of ``starts``, the runs in lockstep.

    Each step multiplies every run's next vector in one call of ``products`` (``A`` times
    each row of a matrix: a batched backward, see
    :class:`~lightning_curvature.functional.linalg.product_batches.ProductBatches`);
    ``None``: ``matvec`` one at a time. The runs are independent: the same nodes and weights
    as one run after another, up to the products' rounding. A run that ends early (an
    invariant Krylov space) leaves the others going.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> starts = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
        >>> [nodes.round(decimals=12).tolist() for nodes, _ in
        ...  lanczos_quadratures(lambda v: A @ v, starts, 3, products=lambda V: V @ A)]
        [[1.0, 2.0, 4.0], [1.0, 4.0]]
    """
    size = starts.shape[1] if shards is None else shards.size  # global: every process alike
    keep, _ = basis_layout(size, num_steps)  # no Ritz vector: two rows above the budget
    runs = [LanczosProcess(matvec, start, num_steps, shards=shards, keep=keep) for start in starts]
    active = runs
    while active:
        nexts = [run.next_vector() for run in active]
        active = [run for run, vector in zip(active, nexts, strict=True) if vector is not None]
        vectors = [vector for vector in nexts if vector is not None]
        if products is None or len(vectors) <= 1:
            images = [matvec(vector) for vector in vectors]
        else:
            images = list(products(torch.stack(vectors)))
        active = [run for run, image in zip(active, images, strict=True) if run.step(image)]
    quadratures = []
    for run in runs:
        values, vectors = torch.linalg.eigh(run.projection())
        quadratures.append((values, vectors[0, :] ** 2))
    return quadratures
