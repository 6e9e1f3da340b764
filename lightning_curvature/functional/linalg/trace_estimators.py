"""Stochastic trace estimators over any symmetric ``matvec``, with standard errors.

* Hutchinson (1989) with Rademacher probes: ``tr(A) ≈ (1/m) Σ zᵢᵀ A zᵢ``; the standard error is
  the sample standard deviation over ``√m``. Traces of diagonal blocks come free from the same
  probes: ``(zᵢ)_B · (A zᵢ)_B`` is unbiased for ``tr(A_BB)`` (Bekas, Kokiopoulou & Saad 2007), and
  the blocks sum exactly to the total.
* Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): a third of the products find a basis
  ``Q`` of ``A S``, a third give ``tr(QᵀAQ)`` exactly, a third run Hutchinson on the
  deflated ``(I−QQᵀ) A (I−QQᵀ)``. Exact when ``A`` has rank at most ``m/3``; its standard error
  is that of the deflated part, from few samples (4 of 10 products, 12 of 32): it is scaled
  by ``t_{0.975, r−1}/1.96`` so that ``estimate ± 1.96·std_error`` is the Student-t 95 %
  interval of its ``r`` samples. The plain ``std/√r`` band covered the exact trace of three
  small networks 83-92 % of the time at 10-16 products (91.6 % over 10-100); the scaled one
  93-98.5 % (95.5 % over 10-100; ``benchmarks/bench_trace_coverage.py``). On neural-network
  Hessians, whose Frobenius mass sits in the bulk, plain Hutchinson is as good or better
  below about 80 products (ALGORITHMS.md §3.2).
  Block traces use ``tr(P_B A) = tr(P_B A QQᵀ) + tr(P_B A (I−QQᵀ))``, each part estimated
  without bias; they sum to the total only in expectation.

With ``shards`` (:class:`~lightning_curvature.functional.linalg.sharded.VectorShards`) each process
holds its shard of every probe and product: the local parts of all samples are summed across
processes in one collective at the end (Hutchinson), and Hutch++'s basis comes from a
Gram-Schmidt with summed inner products; every process returns the same estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lightning_curvature.functional.linalg.product_batches import grouped, product_groups
from lightning_curvature.functional.linalg.sharded import VectorShards

__all__ = [
    "MIN_MATVECS",
    "TraceSamples",
    "hutch_plus_plus",
    "hutchinson",
    "student_t_975",
]

#: Fewest products that give a finite standard error: two samples for Hutchinson; for
#: Hutch++ a sketch of one column, its exact part, and two deflated samples (with 3 products
#: the deflated part would have one sample and its standard error would be infinite).
MIN_MATVECS = {"hutchinson": 2, "hutch++": 4}

Matvec = Callable[[torch.Tensor], torch.Tensor]

Blocks = Mapping[str, Sequence[slice]]


_Z975 = 1.959963984540054  # the standard normal's 97.5 % quantile


def student_t_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom.

    Exact for one and two degrees of freedom, Hill's (1970) Cornish–Fisher expansion in
    ``1/df`` (six terms) above: within 0.03 % at ``df = 3``, and closer as ``df`` grows.

    Example:
        >>> [round(student_t_975(df), 3) for df in (1, 2, 3, 11, 33, 1000)]
        [12.706, 4.303, 3.182, 2.201, 2.035, 1.962]
    """
    if df < 1:
        raise ValueError(f"`df` must be >= 1, got {df}.")
    if df == 1:
        return math.tan(math.pi * 0.475)
    if df == 2:
        return 0.95 / math.sqrt(2 * 0.975 * 0.025)
    z = _Z975
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
        (27 * z**11 + 339 * z**9 + 930 * z**7 - 1782 * z**5 - 765 * z**3 + 17955 * z) / 368640,
    )
    return z + sum(term / float(df) ** (i + 1) for i, term in enumerate(terms))


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
        student: scale the standard error by ``t_{0.975, r−1}/1.96`` (``r`` samples), so
            that ``± 1.96`` standard errors is the Student-t 95 % interval (Hutch++, whose
            few deflated samples make the plain ``std/√r`` too short a yardstick).
    """

    offset: float
    samples: torch.Tensor
    num_matvecs: int
    block_offsets: dict[str, float] = field(default_factory=dict)
    block_samples: dict[str, torch.Tensor] = field(default_factory=dict)
    student: bool = False

    def _mean_and_error(self, offset: float, samples: torch.Tensor) -> tuple[float, float]:
        m = samples.numel()
        if m < 2:
            return offset + float(samples.mean()), float("inf")
        error = float(samples.std() / m**0.5)
        if self.student:
            error *= student_t_975(m - 1) / _Z975
        return offset + float(samples.mean()), error

    @property
    def estimate(self) -> float:
        """The trace estimate."""
        return self._mean_and_error(self.offset, self.samples)[0]

    @property
    def std_error(self) -> float:
        """Standard error of :attr:`estimate` (``inf`` from a single sample).

        The sample standard deviation over ``√r``; with :attr:`student`, times
        ``t_{0.975, r−1}/1.96`` (Hutch++: ×1.62 at 10 products, ×1.11 at 32, ×1.04 at 100).
        """
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
    matmat: Matvec | None = None,
) -> TraceSamples:
    """Hutchinson's estimator with Rademacher probes.

    ``size`` is the length of the vectors ``matvec`` takes (this process's shard with
    ``shards``); ``blocks`` slice those vectors. With ``matmat`` (the products of the rows of
    a matrix) the probes go in groups
    (:func:`~lightning_curvature.functional.linalg.product_batches.product_groups`), each
    group one by one or batched, whichever
    :class:`~lightning_curvature.functional.linalg.product_batches.ProductBatches` found
    faster; the probes and the samples are the same either way.

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
    products, group = product_groups(matvec, matmat, size, device)
    for first in range(0, num_matvecs, group):
        count = min(group, num_matvecs - first)
        drawn = [shards.rademacher(generator, dtype, device) for _ in range(count)]
        zs = drawn[0].unsqueeze(0) if count == 1 else torch.stack(drawn)  # (one: no copy)
        _sample(zs, products(zs), blocks, samples, block_samples)
    total, per_block = _summed(shards, samples, block_samples)
    return TraceSamples(
        offset=0.0,
        samples=total,
        num_matvecs=num_matvecs,
        block_offsets={name: 0.0 for name in blocks},
        block_samples=per_block,
    )


def _sample(
    zs: torch.Tensor,
    products: torch.Tensor,
    blocks: Blocks,
    samples: list[torch.Tensor],
    block_samples: dict[str, list[torch.Tensor]],
) -> None:
    """Append each probe's ``zᵀAz`` (and each block's part) to the samples.

    A function of its own so that no loop variable holds the last product through the next
    group's products (the operator's self-check lets go of it too): one vector less at a
    trace's peak.
    """
    for z, az in zip(zs, products, strict=True):
        samples.append(torch.dot(z, az))
        for name, slices in blocks.items():
            block_samples[name].append(_block_dot(z, az, slices))


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
    matmat: Matvec | None = None,
) -> TraceSamples:
    """Hutch++ with ``num_matvecs`` products (at least 4, see :data:`MIN_MATVECS`).

    ``m // 3`` products sketch ``Q``, ``m // 3`` give ``tr(QᵀAQ)`` and the remaining
    ``m − 2·(m // 3)`` (at least 2) are the deflated Hutchinson samples. The standard error
    is theirs, scaled to the Student-t interval (:attr:`TraceSamples.student`). With
    ``matmat``, each of the three parts takes its products in groups as :func:`hutchinson`
    does; the draws are the same either way.

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
    products, group = product_groups(matvec, matmat, size, device)
    sketch = num_matvecs // 3
    residual_probes = num_matvecs - 2 * sketch
    s = torch.stack([shards.rademacher(generator, dtype, device) for _ in range(sketch)])
    q = shards.orthonormal_columns(grouped(products, s, group).T)
    aq = grouped(products, q.T, group).T
    exact = [(q * aq).sum()] + [
        sum(((q[sl] * aq[sl]).sum() for sl in slices), q.new_zeros(()))
        for slices in blocks.values()
    ]
    exact_total = shards.all_sum(torch.stack(exact).double()).tolist()
    block_offsets = dict(zip(blocks, exact_total[1:], strict=True))
    samples: list[torch.Tensor] = []
    block_samples: dict[str, list[torch.Tensor]] = {name: [] for name in blocks}
    for first in range(0, residual_probes, group):
        count = min(group, residual_probes - first)
        gs = torch.stack([shards.rademacher(generator, dtype, device) for _ in range(count)])
        deflated = gs - shards.all_sum(gs @ q) @ q.T
        for g, d, a_d in zip(gs, deflated, products(deflated), strict=True):
            samples.append(torch.dot(d, a_d))
            for name, slices in blocks.items():
                block_samples[name].append(_block_dot(g, a_d, slices))
    total, per_block = _summed(shards, samples, block_samples)
    return TraceSamples(
        offset=exact_total[0],
        samples=total,
        num_matvecs=num_matvecs,
        block_offsets=block_offsets,
        block_samples=per_block,
        student=True,
    )
