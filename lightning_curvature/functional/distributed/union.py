"""The mean over the union of the processes' examples: each process weighted by its share.

Under DDP every process holds its own probe batch of ``n_r`` examples and the operator of
the union batch is ``H = Σ_r n_r H_r / N`` (``N = Σ_r n_r``), where ``H_r`` is the mean
Hessian of process ``r``'s batch. The plain mean over processes, ``Σ_r H_r / R``, equals it
only when every ``n_r`` is the same; with 16 and 5 examples the top eigenvalue of a small
regressor came out 5 % low, with 16 and 1 7 % low (the trace 4 % and 10 %). A
:class:`UnionMean` multiplies each process's tensor by its share ``n_r / n̄``
(``n̄ = N / R``) before the mean, so the mean is ``Σ_r n_r x_r / N``; equal sizes give the
share 1 exactly, and the plain mean bit for bit. Where a process cannot tell its number of
examples (a batch without a leading dimension), every share is 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["UnionMean"]


@dataclass(frozen=True)
class UnionMean:
    """The union batch's mean of a tensor each process computed on its own batch.

    Attributes:
        mean: the plain mean over the processes (an all-reduce).
        share: this process's examples over the mean number per process.

    Example:
        Two processes with 3 and 1 examples, simulated: the mean of ``(3·x₀ + 1·x₁) / 4``.

        >>> sizes, values = [3, 1], [torch.tensor(1.0), torch.tensor(5.0)]
        >>> plain_mean = lambda t: t  # each process's share is applied before the mean
        >>> shares = [UnionMean.share_of(n, sum(sizes) / 2) for n in sizes]
        >>> float(sum(s * v for s, v in zip(shares, values)) / 2)  # (3 + 5) / 4
        2.0
    """

    mean: Callable[[torch.Tensor], torch.Tensor]
    share: float = 1.0

    @classmethod
    def of(
        cls, mean: Callable[[torch.Tensor], torch.Tensor], size: int | None, device: torch.device
    ) -> UnionMean:
        """The union mean of processes holding ``size`` examples each (one collective).

        Example:
            >>> union = UnionMean.of(lambda t: t, 8, torch.device("cpu"))  # one process
            >>> union.share, union(torch.tensor([2.0]))
            (1.0, tensor([2.]))
        """
        local = torch.tensor(
            [float(size or 0), float(size is None)], dtype=torch.float64, device=device
        )
        per_process, unknown = mean(local).tolist()
        if unknown > 0 or per_process <= 0 or size is None:
            return cls(mean)
        return cls(mean, cls.share_of(size, per_process))

    @staticmethod
    def share_of(size: int, per_process: float) -> float:
        """``size / per_process``: 1 exactly when every process holds the same number."""
        return 1.0 if size == per_process else size / per_process

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """The union batch's value of ``tensor`` (this process's batch's)."""
        return self.mean(tensor if self.share == 1.0 else tensor * self.share)
