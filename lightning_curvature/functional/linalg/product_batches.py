"""Products of a few vectors at a time: one by one, or in one batched call, whichever is faster.

Several Hessian-vector products through one vectorised backward
(``torch.autograd.grad(..., is_grads_batched=True)``) are not faster everywhere: measured on
one CPU thread for 8 vectors, a batched backward took 0.25x the time of 8 single ones on a
small GPT-2, 0.65x on a CNN with BatchNorm in eval mode, 0.89x on an MLP, and 1.48x on the
same CNN with BatchNorm in training mode (``benchmarks/README.md``). :class:`ProductBatches`
therefore takes a run's first group one by one (a warm-up, untimed: it holds the operator's
first product), times the batched way on the second and the single way on the third, and
keeps the faster one for the rest; where a batched call runs out of memory it goes on one by
one. Which way ran changes no value beyond rounding: the same products of the same vectors.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["BATCHED_ENTRIES", "GROUP", "ProductBatches", "grouped", "product_groups"]

Matvec = Callable[[torch.Tensor], torch.Tensor]

#: Probes per group where the products may be batched (Hutchinson with ``matmat``): each
#: batched group holds this many products' worth of backward intermediates at once.
GROUP = 8
#: Batched groups only while a group's probes and products hold at most this many entries
#: (``2 × GROUP × size``; 4 MiB in float32, ``size`` up to 65k): above, where memory is what
#: decides whether a model can be probed at all, products go one by one (on the CPU batching
#: paid only on small models anyway, ``benchmarks/bench_trace_batches.py``). A batched group
#: holds every product's backward intermediates too: at ``2²⁴`` entries a 16-product trace of
#: the 10⁶-parameter MLP of ``benchmarks/bench_probe_memory.py`` peaked at 278 MiB (73
#: vectors, 31x a gradient) in 0.98 s, one by one at 47 MiB (12 vectors) in 0.74 s.
BATCHED_ENTRIES = 1 << 20


class ProductBatches:
    """``A`` times the rows of a matrix, by ``matvec`` row by row or by ``matmat`` at once.

    Args:
        matvec: ``v -> A v``.
        matmat: ``V -> (A V)`` row-wise for a ``count × size`` matrix, or ``None`` (always
            one by one).
        device: where the vectors live (CUDA work is synchronised before it is timed).

    Attributes:
        seconds: the time per product each way took when it was timed (``"single"``,
            ``"batched"``).

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> products = ProductBatches(lambda v: A @ v, lambda V: V @ A.T, torch.device("cpu"))
        >>> for _ in range(4):
        ...     out = products(torch.eye(3))
        >>> out.diagonal(), sorted(products.seconds)
        (tensor([1., 2., 3.]), ['batched', 'single'])
    """

    def __init__(self, matvec: Matvec, matmat: Matvec | None, device: torch.device) -> None:
        self._matvec, self._matmat, self._device = matvec, matmat, device
        self.seconds: dict[str, float] = {}
        self._calls = 0

    def _way(self) -> str:
        """Single (a warm-up), batched, single (both timed), then the faster per product."""
        if self._matmat is None or self._calls == 0:
            return "single"
        if "batched" not in self.seconds:
            return "batched"
        if "single" not in self.seconds:
            return "single"
        return min(self.seconds, key=self.seconds.__getitem__)

    def _synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """``A`` times each row of ``vectors``."""
        way = self._way()
        timed = self._calls > 0 and way not in self.seconds and len(vectors) > 1
        self._calls += 1
        if timed:
            self._synchronize()
        start = time.perf_counter()
        if way == "batched":
            assert self._matmat is not None
            try:
                products = self._matmat(vectors)
            except torch.cuda.OutOfMemoryError:
                self._matmat = None  # where memory does not allow, one at a time from now on
                return self(vectors)
        else:
            singles = [self._matvec(v) for v in vectors]
            products = singles[0].unsqueeze(0) if len(singles) == 1 else torch.stack(singles)
        if timed:
            self._synchronize()
            self.seconds[way] = (time.perf_counter() - start) / len(vectors)
        return products


def product_groups(
    matvec: Matvec, matmat: Matvec | None, size: int, device: torch.device
) -> tuple[ProductBatches, int]:
    """The products' way and the group size: :data:`GROUP` where batching may pay, else 1.

    Example:
        >>> cpu = torch.device("cpu")
        >>> products, group = product_groups(lambda v: 2 * v, lambda V: 2 * V, 10, cpu)
        >>> group, product_groups(lambda v: 2 * v, None, 10, cpu)[1]
        (8, 1)
    """
    if 2 * GROUP * size > BATCHED_ENTRIES:
        matmat = None
    return ProductBatches(matvec, matmat, device), GROUP if matmat is not None else 1


def grouped(products: ProductBatches, rows: torch.Tensor, group: int) -> torch.Tensor:
    """``A`` times each row of ``rows``, ``group`` rows a call (one row: a view, no copy).

    Example:
        >>> products = ProductBatches(lambda v: 2 * v, None, torch.device("cpu"))
        >>> grouped(products, torch.ones(3, 2), 2)
        tensor([[2., 2.],
                [2., 2.],
                [2., 2.]])
    """
    parts = [products(rows[first : first + group]) for first in range(0, len(rows), group)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
