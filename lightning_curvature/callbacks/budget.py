"""The overhead budget's arithmetic: how many probes a run affords, and how far apart.

Pure functions of numbers, in units of *training steps* (a probe's seconds over the mean
seconds of a training step of the run, its probes left out), so that a plan made before any
clock was read (from a prior cost) and one made from measured seconds read alike.
:class:`~lightning_curvature.callbacks.schedule.ProbeSchedule` calls them; nothing here
reads a clock or knows a Trainer.

A monitor with a share ``f`` of the budget may spend ``f · T`` steps' time on a run of ``T``
steps, every probe counted (the first one, at step 0, too). Measured on the digits CNN of
``examples/digits_cnn.py`` (2-core CPU): a training step (two micro-batches of 32, AdamW,
bf16-mixed) takes about 7 ms and one Hessian-vector product on a batch of 32 about 4.4 ms,
so its eigenvalue probe (two Lanczos runs for AdamW) costs about 17 steps, its trace (32
products) about 20 and its spectral density (80) about 80: at 5 % shared by five monitors,
each may spend 1 % of the run, 5 steps of a 500-step run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "AUTO_OVERHEAD",
    "AUTO_POINTS",
    "READABLE_POINTS",
    "Shortfall",
    "Timing",
    "affordable",
    "spacing",
]

#: What ``every_n_steps="auto"`` aims for: this many probes over the run Lightning expects…
AUTO_POINTS = 25
#: … within this fraction of its time (the budget every budgeted monitor of a Trainer shares).
AUTO_OVERHEAD = 0.05
#: Fewer probes than this over a run make a chart nobody can read: the shortfall is said.
READABLE_POINTS = 10
_UNLIMITED = 10**9  # probes that cost nothing


def _unchanged(interval: int) -> int:
    return interval


@dataclass(frozen=True)
class Timing:
    """What the overhead budget reads from the run when it spaces a probe.

    Attributes:
        now: the time, in seconds of a monotonic clock (``time.perf_counter()``).
        probe_seconds: seconds spent probing so far by every schedule sharing the budget,
            this one's included, so that none counts another's probes as training time.
        sharers: how many schedules share the budget (each keeps to a 1/sharers part of it).
        broadcast: rank zero's interval on every process (on one process: as it is).

    Example:
        >>> Timing(now=12.5, probe_seconds=1.0).sharers
        1
    """

    now: float
    probe_seconds: float
    sharers: int = 1
    broadcast: Callable[[int], int] = _unchanged


def affordable(allowance: float, spent: float, cost: float) -> int:
    """How many more probes of ``cost`` fit in what is left of ``allowance`` (``spent`` of it).

    Example:
        >>> affordable(allowance=5.0, spent=1.5, cost=1.0)
        3
        >>> affordable(allowance=5.0, spent=6.0, cost=1.0)  # overspent: none
        0
    """
    if allowance <= spent:
        return 0
    if not cost > 0:
        return _UNLIMITED
    return max(0, math.floor((allowance - spent) / cost + 1e-9))


def spacing(steps_left: int, probes: int) -> int:
    """The shortest interval that puts at most ``probes`` probes in the next ``steps_left``.

    The probes after one at step ``k`` fall at ``k + d, k + 2d, …`` up to ``k + steps_left``:
    ``steps_left // d`` of them. No probe fits: one past the end.

    Example:
        >>> spacing(100, 4), spacing(100, 0), spacing(100, 1000)
        (21, 101, 1)
    """
    if probes <= 0:
        return steps_left + 1
    return steps_left // (probes + 1) + 1


@dataclass(frozen=True)
class Shortfall:
    """A run too short for the budget: fewer than :data:`READABLE_POINTS` probes fit in it.

    Attributes:
        points: the probes the run gets (made and planned).
        cost: one probe, in training steps (measured, or the monitor's prior before any).
        run_steps: the optimizer steps of the run Lightning expects.
        budget: the fraction of the run's time the probes may take (this monitor's share).
        sharers: the monitors that share the budget.
        measured: whether ``cost`` was measured (else it is the monitor's estimate).

    Example:
        >>> short = Shortfall(points=1, cost=17.0, run_steps=500, budget=0.05, sharers=5)
        >>> round(short.overhead_needed, 2), short.every_n_steps, round(short.time_added, 2)
        (1.7, 50, 0.34)
    """

    points: int
    cost: float
    run_steps: int
    budget: float
    sharers: int = 1
    measured: bool = True

    @property
    def overhead_needed(self) -> float:
        """The ``max_overhead`` (shared as this one is) that affords :data:`READABLE_POINTS`."""
        return self.sharers * READABLE_POINTS * self.cost / max(self.run_steps, 1)

    @property
    def every_n_steps(self) -> int:
        """The fixed cadence that gives :data:`READABLE_POINTS` probes over the run."""
        return max(1, self.run_steps // READABLE_POINTS)

    @property
    def time_added(self) -> float:
        """What that cadence adds to the run's time, as a fraction (this monitor alone)."""
        probes = math.ceil(self.run_steps / self.every_n_steps)
        return probes * self.cost / max(self.run_steps, 1)

    def message(self, monitor: str) -> str:
        """What the user reads, once per run and monitor (one line).

        Example:
            >>> import textwrap
            >>> short = Shortfall(1, 17.0, 500, 0.05, 5)
            >>> print(textwrap.fill(short.message("HessianEigenvalueMonitor"), 88))
            HessianEigenvalueMonitor: this run of 500 steps is too short for a readable chart within
            its share of the overhead budget (max_overhead=0.05 shared by 5 monitors): a probe costs
            about 17 training steps, so it gets 1 probe(s) where 10 make a chart. For 10, pass
            every_n_steps=50 (about +34% time) or max_overhead=1.7, or train longer.
        """
        # (an estimate from the probe's products and the batches a step accumulates is an upper
        # bound: a small model's step is mostly Lightning's own overhead, a probe's is not)
        cost = "about" if self.measured else "up to about"
        estimated = "" if self.measured else " (estimated from its products)"
        shared = f" shared by {self.sharers} monitors" if self.sharers > 1 else ""
        return (
            f"{monitor}: this run of {self.run_steps} steps is too short for a readable chart "
            f"within its share of the overhead budget (max_overhead={self.budget:g}{shared}): "
            f"a probe costs {cost} {self.cost:.3g} training steps{estimated}, so it gets "
            f"{self.points} probe(s) where {READABLE_POINTS} make a chart. For "
            f"{READABLE_POINTS}, pass every_n_steps={self.every_n_steps} (about "
            f"+{100 * self.time_added:.0f}% time) or max_overhead={self.overhead_needed:.2g}, "
            "or train longer."
        )
