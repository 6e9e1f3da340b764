"""What one probe of a monitor returns, and the names of the cost tags it is logged with.

A monitor's :meth:`~lightning_curvature.callbacks.monitor.CurvatureMonitor.measure` returns a
:class:`Measurement` (or ``None``: nothing to log this time); the base class adds what the
probe cost under the tags :func:`cost_tag` names, ``probe_cost/<monitor>_hvps`` and
``probe_cost/<monitor>_seconds`` (and ``probe_cost/<monitor>_forwards`` for a monitor that
evaluates the loss by forward passes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["CostQuantity", "Measurement", "cost_tag"]

#: What a probe's cost is counted in.
CostQuantity = Literal["hvps", "seconds", "forwards"]


def cost_tag(monitor: str, quantity: CostQuantity) -> str:
    """The tag of a probe's cost: ``probe_cost/<monitor>_<quantity>``.

    ``monitor`` is the monitor kind's ``cost_name`` (``""`` for a monitor of one's own:
    ``probe_cost/<quantity>``).

    Example:
        >>> cost_tag("eigenvalue", "hvps")
        'probe_cost/eigenvalue_hvps'
        >>> cost_tag("", "seconds")
        'probe_cost/seconds'
    """
    return f"probe_cost/{monitor}_{quantity}" if monitor else f"probe_cost/{quantity}"


@dataclass(frozen=True)
class Measurement:
    """What one probe measured.

    Attributes:
        metrics: tag to value, tensors included (converted to floats once, when logged).
        hvps: Hessian-vector products the probe used; ``None``: it computes none (no
            ``hvps`` cost tag).
        forwards: forward passes of the probe batch it used beyond its products (loss
            slices, line searches); ``None``: no ``forwards`` cost tag.

    Example:
        >>> measured = Measurement({"curvature/trace": torch.tensor(3.5)}, hvps=32)
        >>> measured.cost("trace", seconds=0.25)
        {'probe_cost/trace_seconds': 0.25, 'probe_cost/trace_hvps': 32.0}
    """

    metrics: Mapping[str, float | torch.Tensor]
    hvps: int | None = None
    forwards: int | None = None

    def cost(self, monitor: str, seconds: float) -> dict[str, float]:
        """The cost tags of this probe of ``monitor`` (see :func:`cost_tag`), ``seconds`` long."""
        cost = {cost_tag(monitor, "seconds"): seconds}
        if self.hvps is not None:
            cost[cost_tag(monitor, "hvps")] = float(self.hvps)
        if self.forwards is not None:
            cost[cost_tag(monitor, "forwards")] = float(self.forwards)
        return cost
