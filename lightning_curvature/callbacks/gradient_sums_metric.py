"""Gradient sums as a torchmetrics ``Metric``: the cross-process sum without a hand-made collective.

Every statistic of :mod:`~lightning_curvature.functional.gradient_statistics` is a function of
sums over gradient samples, so the samples of all processes combine by adding their sums:
each tensor of :class:`~lightning_curvature.functional.gradient_statistics.GradientSums` is a
state with ``dist_reduce_fx="sum"``, and ``compute()`` returns the sums over every process
(torchmetrics syncs when a process group is initialised, as under DDP; alone it is the
identity). The sync all-reduces each state instead of all-gathering it (torchmetrics'
default), so a gradient-sized state costs one vector of memory per process, not one per rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from lightning_curvature.functional.gradient_statistics import GradientSums

__all__ = ["GradientSumsMetric"]


def _all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Sum over processes, returned as torchmetrics' ``dist_sync_fn`` returns (a list)."""
    reduced = tensor.clone()
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM, group=group)
    return [reduced]


class GradientSumsMetric(Metric):
    """Accumulates :class:`GradientSums` of one layout; ``compute()`` sums over processes.

    Args:
        template: empty sums giving the layout (size, blocks, which states, dtype, device).

    Example:
        >>> metric = GradientSumsMetric(GradientSums.zeros(2))
        >>> sums = GradientSums.zeros(2)
        >>> sums.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> metric.update(sums)
        >>> metric.summed().compute().coherence
        tensor(1.)
    """

    full_state_update = False

    def __init__(self, template: GradientSums) -> None:
        super().__init__(dist_sync_fn=_all_reduce_sum)
        for name, value in template.states().items():
            self.add_state(name, default=torch.zeros_like(value), dist_reduce_fx="sum")
        # The layout alone: meta tensors hold no memory (a state may be gradient-sized).
        self._layout = template.with_states(
            {name: value.to("meta") for name, value in template.states().items()}
        )

    def update(self, sums: GradientSums) -> None:
        """Add the states of ``sums`` (same layout as the template)."""
        for name, value in sums.states().items():
            getattr(self, name).add_(value.to(getattr(self, name)))

    def compute(self) -> GradientSums:
        """The sums over everything added, on every process."""
        return self._layout.with_states(
            {name: getattr(self, name) for name in self._layout.states()}
        )

    def summed(self) -> GradientSums:
        """:meth:`compute`, with every state in its own shape.

        torchmetrics squeezes one-element tensors of a result (a state of one block comes
        back 0-d); this puts the layout's shapes back.
        """
        shapes = {name: value.shape for name, value in self._layout.states().items()}
        return self._layout.with_states(
            {name: value.reshape(shapes[name]) for name, value in self.compute().states().items()}
        )
