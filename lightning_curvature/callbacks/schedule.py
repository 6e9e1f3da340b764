"""The one scheduler of the project: when a periodic callback acts, and what its probes cost.

:class:`ProbeSchedule` holds the cadence, the overhead budget and the timing that budget
reads; it knows no Trainer (the caller hands it the step, the epoch and a clock), so it is
tested on fake step times alone. Every monitor has one; ``SAM`` has one for its SAM steps
and one for its log window.

Steps are *optimizer* steps (``trainer.global_step``), so gradient accumulation gives one
probe per step. With ``max_overhead`` the interval adapts after every probe so that probe
time stays under that fraction of the training time (what the probes add to a run without
them): after a probe of ``c`` seconds with training steps of ``s`` seconds, the next comes
``c / (f s)`` steps later (never sooner than ``every_n_steps`` if the user gave one, else
as soon as the next step); monitors that share one budget each use a share ``f`` of it.
``every_n_epochs`` acts at the end of every n-th epoch, as Lightning's own callbacks do. The
decision is computed on rank zero and broadcast, so every process probes at the same steps
(a mismatch would deadlock the all-reduced products): the clock's ``broadcast``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_curvature.checks import check_flag, check_integer, check_real

__all__ = ["EveryNSteps", "ProbeSchedule", "Timing", "resolve_every_n_steps"]

#: ``every_n_steps`` as a monitor takes it: ``"auto"`` is the monitor's own default cadence.
EveryNSteps = int | None | Literal["auto"]


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


def resolve_every_n_steps(
    every_n_steps: EveryNSteps,
    default: int,
    every_n_epochs: int | None = None,
    max_overhead: float | None = None,
) -> int | None:
    """The step interval a monitor uses: ``"auto"`` means ``default`` unless another trigger is set.

    With ``every_n_epochs`` or ``max_overhead`` given, ``"auto"`` adds no step cadence of its
    own: epochs alone, or the budget alone with no floor (it may probe at every step if the
    probes are that cheap). A number or ``None`` is kept as given.

    Example:
        >>> resolve_every_n_steps("auto", 500)
        500
        >>> resolve_every_n_steps("auto", 500, max_overhead=0.05) is None  # budget only
        True
        >>> resolve_every_n_steps(20, 500, max_overhead=0.05)  # the user's floor
        20
    """
    if every_n_steps != "auto":
        return every_n_steps
    if every_n_epochs is not None or max_overhead is not None:
        return None
    return default


class ProbeSchedule:
    """Decides at which optimizer steps (and epochs) a callback acts, within a time budget.

    The caller asks :meth:`is_due` (or :meth:`is_due_at_epoch_end`) and, after acting, tells
    :meth:`probed` how long it took (or :meth:`record` that it acted, untimed). Under
    ``max_overhead`` both read the ``clock`` they are given (default: ``time.perf_counter``
    and this schedule's own probes) to space the next probe; the schedule keeps no reference
    to it. The position (:meth:`state_dict`) is plain integers for a checkpoint.

    Args:
        every_n_steps: act when ``global_step`` is a multiple of it (step 0 included).
        every_n_epochs: act at the end of every n-th epoch (:meth:`is_due_at_epoch_end`;
            :meth:`is_due` tells a caller that can only act on a step the first step of one).
        on_train_end: also act once when training ends.
        max_overhead: time the probes may add, as a fraction of the training time (e.g.
            ``0.05``); the interval then adapts, with ``every_n_steps`` (default 1) as the
            shortest one.
        once_per_window: with ``every_n_steps``, act at the first step asked in each window
            ``[j n, (j + 1) n)`` instead of at the multiples of ``n`` only: for a caller that
            does not ask at every step (``SAM`` logs at SAM steps with finite values).

    Raises:
        MisconfigurationException: on invalid values, or when no trigger is given.

    Example:
        >>> schedule = ProbeSchedule(every_n_steps=10)
        >>> [step for step in range(25) if schedule.is_due(step, epoch=0, epoch_start=False)]
        [0, 10, 20]

        A budget of 25% with 1 s probes and 0.125 s steps, on a fake clock: a probe every
        ``1 / (0.25 · 0.125) = 32`` steps (step 1 times a step and spaces the step-0 probe).

        >>> now = [0.0]
        >>> budgeted = ProbeSchedule(max_overhead=0.25)
        >>> def clock():
        ...     return Timing(now[0], budgeted.probe_seconds)
        >>> probed = []
        >>> for step in range(70):
        ...     if budgeted.is_due(step, clock=clock):
        ...         now[0] += 1.0
        ...         budgeted.probed(step, seconds=1.0, clock=clock)
        ...         probed.append(step)
        ...     now[0] += 0.125
        >>> probed
        [0, 32, 64]
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        on_train_end: bool = False,
        max_overhead: float | None = None,
        once_per_window: bool = False,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            check_integer(name, value, allow_none=True, error=MisconfigurationException)
        check_real(
            "max_overhead",
            max_overhead,
            0,
            1,
            low_open=True,
            high_open=True,
            allow_none=True,
            error=MisconfigurationException,
        )
        check_flag("on_train_end", on_train_end, error=MisconfigurationException)
        if (
            every_n_steps is None
            and every_n_epochs is None
            and max_overhead is None
            and not on_train_end
        ):
            raise MisconfigurationException(
                "Give at least one of `every_n_steps`, `every_n_epochs`, `max_overhead` or "
                "`on_train_end=True`: otherwise the callback never acts."
            )
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.on_train_end = on_train_end
        self.max_overhead = max_overhead
        self.once_per_window = once_per_window
        self.next_step = 0  # adaptive mode only
        self.last_step = -1
        #: Seconds spent in the probes of this fit (:meth:`probed`).
        self.probe_seconds = 0.0
        # End of the last timed probe, its step, and the budget's probe seconds by then.
        self._timer: tuple[float, int, float] | None = None
        self._unbudgeted: float | None = None  # cost of a probe made before any step time

    def _own_clock(self) -> Timing:
        return Timing(time.perf_counter(), self.probe_seconds)

    def start(self) -> None:
        """Begin a fit: no probe time spent, no step timed (the position is kept)."""
        self._timer, self._unbudgeted = None, None
        self.probe_seconds = 0.0

    def is_due(
        self,
        global_step: int,
        epoch: int = 0,
        epoch_start: bool = False,
        clock: Callable[[], Timing] | None = None,
    ) -> bool:
        """Whether to act at the start of optimizer step ``global_step``.

        Under ``max_overhead`` the first probe has no step time to be budgeted against; the
        first call at a later step times one on ``clock`` and spaces that probe then
        (instead of probing again). A Trainer's monitors pass a clock that sums all their
        probes.
        """
        if self._unbudgeted is not None and global_step > self.last_step:
            timing = (clock or self._own_clock)()
            self._space(self.last_step, global_step, self._unbudgeted, timing)
            self._unbudgeted = None
        return self.due_by_cadence(global_step, epoch, epoch_start)

    def due_by_cadence(self, global_step: int, epoch: int = 0, epoch_start: bool = False) -> bool:
        """Whether step ``global_step`` is due by the cadence as it stands, changing nothing.

        :meth:`is_due` without the budget's spacing of a first probe: a look ahead (e.g. to
        copy the weights on the step before a probe).

        Example:
            >>> schedule = ProbeSchedule(every_n_steps=5)
            >>> [step for step in range(12) if schedule.due_by_cadence(step)]
            [0, 5, 10]
        """
        if global_step == self.last_step:
            return False  # already acted at this step (e.g. another micro-batch of it)
        if self.max_overhead is not None:
            return global_step >= self.next_step
        if self.every_n_steps is not None and self.once_per_window:
            return global_step // self.every_n_steps > self.last_step // self.every_n_steps
        if self.every_n_steps is not None and global_step % self.every_n_steps == 0:
            return True
        return bool(
            epoch_start and self.every_n_epochs is not None and epoch % self.every_n_epochs == 0
        )

    def is_due_at_epoch_end(self, global_step: int, epoch: int) -> bool:
        """Whether to act at the end of epoch ``epoch`` (``global_step`` optimizer steps done).

        Example:
            >>> schedule = ProbeSchedule(every_n_epochs=2)
            >>> [epoch for epoch in range(5) if schedule.is_due_at_epoch_end(4 * epoch, epoch)]
            [1, 3]
        """
        if global_step == self.last_step or self.every_n_epochs is None:
            return False
        return (epoch + 1) % self.every_n_epochs == 0

    def next_interval(
        self, probe_seconds: float, step_seconds: float, budget: float | None = None
    ) -> int:
        """Steps until the next probe under the budget (rank zero computes it).

        Args:
            probe_seconds: what the last probe took.
            step_seconds: a training step's time (without any probe).
            budget: the fraction of time the probes may take (default ``max_overhead``; a
                share of it when several monitors split one budget).
        """
        assert self.max_overhead is not None
        shortest = self.every_n_steps or 1
        if not step_seconds > 0 or not math.isfinite(probe_seconds):
            return shortest
        f = self.max_overhead if budget is None else budget
        return max(shortest, math.ceil(probe_seconds / (f * step_seconds)))

    def record(self, global_step: int, interval: int | None = None) -> None:
        """Note that the callback acted at ``global_step`` (and the adaptive interval)."""
        self.last_step = global_step
        if interval is not None:
            self.next_step = global_step + interval

    def probed(
        self, global_step: int, seconds: float, clock: Callable[[], Timing] | None = None
    ) -> None:
        """Note a probe of ``seconds`` at ``global_step``, and space the next one to the budget.

        ``clock`` as for :meth:`is_due`.

        Example:
            >>> schedule = ProbeSchedule(every_n_steps=5)
            >>> schedule.probed(5, seconds=0.25)
            >>> schedule.last_step, schedule.probe_seconds
            (5, 0.25)
        """
        self.probe_seconds += seconds
        if self.max_overhead is None:
            self.record(global_step)
            return
        read = clock or self._own_clock
        if self._timer is None:  # no training step timed yet: space this probe at the next
            self._unbudgeted = seconds
            self.record(global_step, 1)
        else:
            self._space(global_step, global_step, seconds, read())
        timing = read()
        self._timer = (timing.now, global_step, timing.probe_seconds)

    def _space(self, probe_step: int, step: int, seconds: float, timing: Timing) -> None:
        """Space the probe after the one at ``probe_step`` (``seconds`` long) to the budget.

        The training time per step comes from the last timed probe up to now (``step``): the
        time passed less every sharer's probes by then (this one's included), so that no
        schedule counts another's probes as training it may spend a part of.
        """
        assert self._timer is not None
        assert self.max_overhead is not None
        last_end, last_step, last_spent = self._timer
        elapsed = timing.now - last_end - (timing.probe_seconds - last_spent)
        step_seconds = elapsed / max(step - last_step, 1)
        share = self.max_overhead / max(timing.sharers, 1)
        interval = timing.broadcast(self.next_interval(seconds, step_seconds, share))
        self.record(probe_step, interval)

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state for checkpoints."""
        return {"next_step": self.next_step, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys keep their defaults)."""
        self.next_step = int(state.get("next_step", self.next_step))
        self.last_step = int(state.get("last_step", self.last_step))
