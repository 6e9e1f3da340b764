"""Stochastic trace estimators over any symmetric ``matvec``, with standard errors.

* Hutchinson (1989) with Rademacher probes: ``tr(A) ≈ (1/m) Σ zᵢᵀ A zᵢ``; the standard error is
  the sample standard deviation over ``√m``. Traces of diagonal blocks come free from the same
  probes: ``(zᵢ)_B · (A zᵢ)_B`` is unbiased for ``tr(A_BB)`` (Bekas, Kokiopoulou & Saad 2007), and
  the blocks sum exactly to the total.
* Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): a third of the products find a basis
  ``Q`` of ``A S``, a third give ``tr(QᵀAQ)`` exactly, a third run Hutchinson on the
  deflated ``(I−QQᵀ) A (I−QQᵀ)``. Exact when ``A`` has rank at most ``m/3``; its standard error
  is that of the deflated part. On neural-network Hessians, whose Frobenius mass sits in the
  bulk, plain Hutchinson is as good or better below about 80 products (ALGORITHMS.md §3.2).
  Block traces use ``tr(P_B A) = tr(P_B A QQᵀ) + tr(P_B A (I−QQᵀ))``, each part estimated
  without bias; they sum to the total only in expectation.

With ``shards`` (:class:`~lightning_curvature.functional.linalg.sharded.VectorShards`) each process
holds its shard of every probe and product: the local parts of all samples are summed across
processes in one collective at the end (Hutchinson), and Hutch++'s basis comes from a
Gram-Schmidt with summed inner products; every process returns the same estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lightning_curvature.functional.linalg.sharded import VectorShards

__all__ = ["MIN_MATVECS", "TraceSamples", "hutch_plus_plus", "hutchinson"]

#: Fewest products that give a finite standard error: two samples for Hutchinson; for
#: Hutch++ a sketch of one column, its exact part, and two deflated samples (with 3 products
#: the deflated part would have one sample and its standard error would be infinite).
MIN_MATVECS = {"hutchinson": 2, "hutch++": 4}

Matvec = Callable[[torch.Tensor], torch.Tensor]
Blocks = Mapping[str, Sequence[slice]]


def _summed(
    shards: VectorShards, samples: list[torch.Tensor], blocks: dict[str, list[torch.Tensor]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The samples (and block samples) summed across processes, float64 on the CPU."""
    rows = [torch.stack(samples).double(), *(torch.stack(v).double() for v in blocks.values())]
    total = shards.all_sum(torch.stack(rows)).to("cpu")
    return total[0], {name: total[i + 1] for i, name in enumerate(blocks)}


def _shards(shards: VectorShards | None, size: int) -> VectorShards:
    shards = shards or VectorShards.single(size)
    if shards.local_size != size:
        raise ValueError(f"`size` ({size}) must be this process's shard ({shards.local_size}).")
    return shards


def _block_dot(a: torch.Tensor, b: torch.Tensor, slices: Sequence[slice]) -> torch.Tensor:
    return sum(
        (torch.dot(a[s], b[s]) for s in slices), torch.zeros((), dtype=a.dtype, device=a.device)
    )


@dataclass(frozen=True)
class TraceSamples:
    """A trace estimate built from independent samples (float64, on the CPU).

    Attributes:
        offset: the exactly computed part (Hutch++'s ``tr(QᵀAQ)``; 0 for Hutchinson).
        samples: the random part's samples; the estimate is ``offset + samples.mean()``.
        block_offsets: ``offset`` per block.
        block_samples: ``samples`` per block.
        num_matvecs: products used.
    """

    offset: float
    samples: torch.Tensor
    num_matvecs: int
    block_offsets: dict[str, float] = field(default_factory=dict)
    block_samples: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def _mean_and_error(offset: float, samples: torch.Tensor) -> tuple[float, float]:
        m = samples.numel()
        error = float(samples.std() / m**0.5) if m > 1 else float("inf")
        return offset + float(samples.mean()), error

    @property
    def estimate(self) -> float:
        """The trace estimate."""
        return self._mean_and_error(self.offset, self.samples)[0]

    @property
    def std_error(self) -> float:
        """Standard error of :attr:`estimate` (``inf`` from a single sample)."""
        return self._mean_and_error(self.offset, self.samples)[1]

    def block(self, name: str) -> tuple[float, float]:
        """Estimate and standard error of one block's trace."""
        return self._mean_and_error(self.block_offsets[name], self.block_samples[name])


def hutchinson(
    matvec: Matvec,
    size: int,
    num_matvecs: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    blocks: Blocks | None = None,
    shards: VectorShards | None = None,
) -> TraceSamples:
    """Hutchinson's estimator with Rademacher probes.

    ``size`` is the length of the vectors ``matvec`` takes (this process's shard with
    ``shards``); ``blocks`` slice those vectors.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> probes = torch.Generator().manual_seed(0)
        >>> out = hutchinson(lambda v: A @ v, 3, 4, probes, dtype=torch.float64)
        >>> out.estimate, out.std_error  # exact for a diagonal matrix, whatever the probes
        (6.0, 0.0)
    """
    device = device or torch.device("cpu")
    blocks = blocks or {}
    shards = _shards(shards, size)
    samples: list[torch.Tensor] = []
    block_samples: dict[str, list[torch.Tensor]] = {name: [] for name in blocks}
    for _ in range(num_matvecs):
        z = shards.rademacher(generator, dtype, device)
        az = matvec(z)
        samples.append(torch.dot(z, az))
        for name, slices in blocks.items():
            block_samples[name].append(_block_dot(z, az, slices))
    total, per_block = _summed(shards, samples, block_samples)
    return TraceSamples(
        offset=0.0,
        samples=total,
        num_matvecs=num_matvecs,
        block_offsets={name: 0.0 for name in blocks},
        block_samples=per_block,
    )


def hutch_plus_plus(
    matvec: Matvec,
    size: int,
    num_matvecs: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    blocks: Blocks | None = None,
    shards: VectorShards | None = None,
) -> TraceSamples:
    """Hutch++ with ``num_matvecs`` products (at least 4, see :data:`MIN_MATVECS`).

    ``m // 3`` products sketch ``Q``, ``m // 3`` give ``tr(QᵀAQ)`` and the remaining
    ``m − 2·(m // 3)`` (at least 2) are the deflated Hutchinson samples.

    Raises:
        ValueError: if ``num_matvecs < 4``.

    Example:
        >>> u = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        >>> A = u @ u.T  # rank 2, PSD: exact with 6 products
        >>> probes = torch.Generator().manual_seed(0)
        >>> out = hutch_plus_plus(lambda v: A @ v, 50, 6, probes, dtype=torch.float64)
        >>> abs(out.estimate - float(A.trace())) < 1e-9
        True
    """
    if num_matvecs < MIN_MATVECS["hutch++"]:
        raise ValueError(
            f"Hutch++ needs `num_hvps` >= {MIN_MATVECS['hutch++']} (a standard error needs two "
            f"deflated samples besides the sketch and its exact part), got {num_matvecs}."
        )
    device = device or torch.device("cpu")
    blocks = blocks or {}
    shards = _shards(shards, size)
    sketch = num_matvecs // 3
    residual_probes = num_matvecs - 2 * sketch
    s = torch.stack([shards.rademacher(generator, dtype, device) for _ in range(sketch)], dim=1)
    q = shards.orthonormal_columns(torch.stack([matvec(col) for col in s.T], dim=1))
    aq = torch.stack([matvec(col) for col in q.T], dim=1)
    exact = [(q * aq).sum()] + [
        sum(((q[sl] * aq[sl]).sum() for sl in slices), q.new_zeros(()))
        for slices in blocks.values()
    ]
    exact_total = shards.all_sum(torch.stack(exact).double()).tolist()
    block_offsets = dict(zip(blocks, exact_total[1:], strict=True))
    samples: list[torch.Tensor] = []
    block_samples: dict[str, list[torch.Tensor]] = {name: [] for name in blocks}
    for _ in range(residual_probes):
        g = shards.rademacher(generator, dtype, device)
        deflated = g - q @ shards.all_sum(q.T @ g)
        a_deflated = matvec(deflated)
        samples.append(torch.dot(deflated, a_deflated))
        for name, slices in blocks.items():
            block_samples[name].append(_block_dot(g, a_deflated, slices))
    total, per_block = _summed(shards, samples, block_samples)
    return TraceSamples(
        offset=exact_total[0],
        samples=total,
        num_matvecs=num_matvecs,
        block_offsets=block_offsets,
        block_samples=per_block,
    )
