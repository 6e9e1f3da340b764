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
Where the run's length is known (:meth:`ProbeSchedule.start`, from Lightning's
``estimated_stepping_batches``) the budget is a plan for the whole run: a monitor with a share
``f`` may spend ``f · T`` steps' time on a run of ``T`` steps, every probe counted (the
first, at step 0, too), and the probes it affords are spread over the steps left. Before any
probe is measured a monitor's estimate of its cost decides whether even the first fits
(:mod:`~lightning_curvature.callbacks.budget` holds the arithmetic). ``every_n_steps="auto"``
is such a plan: about 25 probes over the run within 5 % of its time (shared), and a run too
short for 10 of them within the budget is said once (:attr:`ProbeSchedule.shortfall`).
``every_n_epochs`` acts at the end of every n-th epoch, as Lightning's own callbacks do. The
decision is computed on rank zero and broadcast, so every process probes at the same steps
(a mismatch would deadlock the all-reduced products): the clock's ``broadcast``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_curvature.callbacks.budget import (
    AUTO_OVERHEAD,
    AUTO_POINTS,
    READABLE_POINTS,
    Shortfall,
    Timing,
    affordable,
    spacing,
)
from lightning_curvature.checks import check_flag, check_integer, check_real

__all__ = ["EveryNSteps", "ProbeSchedule", "Timing", "resolve_every_n_steps"]

#: ``every_n_steps`` as a monitor takes it: ``"auto"`` is the monitor's own default cadence.
EveryNSteps = int | None | Literal["auto"]


def resolve_every_n_steps(
    every_n_steps: EveryNSteps,
    default: int,
    every_n_epochs: int | None = None,
    max_overhead: float | None = None,
) -> int | None:
    """The step interval a monitor uses: ``"auto"`` means ``default`` unless another trigger is set.

    With ``every_n_epochs`` or ``max_overhead`` given, ``"auto"`` adds no step cadence of its
    own: epochs alone, or the budget alone with no floor (it may probe at every step if the
    probes are that cheap). A number or ``None`` is kept as given. Without ``every_n_epochs``
    ``"auto"`` is also a budget (``ProbeSchedule(auto=True)``): ``default`` is then the
    cadence only where the run's length is unknown.

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
        auto: ``every_n_steps="auto"``: a budget of ``max_overhead`` (default 5 %) aiming at
            about :data:`~lightning_curvature.callbacks.budget.AUTO_POINTS` probes over the
            run :meth:`start` is told of; ``every_n_steps`` is then the shortest interval only
            where the run's length is unknown.

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
        auto: bool = False,
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
        self.auto = auto
        self.next_step = 0  # adaptive mode only
        self.last_step = -1
        #: Seconds spent in the probes of this fit (:meth:`probed`).
        self.probe_seconds = 0.0
        #: Probes made in this fit.
        self.probes = 0
        #: Set when the run is too short for :data:`READABLE_POINTS` probes within the budget.
        self.shortfall: Shortfall | None = None
        # The fit's first step asked about: its time, the step, and the budget's probe seconds
        # by then (the mean training step is timed from there).
        self._fit_start: tuple[float, int, float] | None = None
        self._unbudgeted: float | None = None  # cost of a probe made before any step time
        self._end: int | None = None  # the step the run Lightning expects ends before
        self._first_step = 0  # the fit's first step

    @property
    def budget(self) -> float | None:
        """The fraction of training time the probes may take (``None``: a fixed cadence).

        Example:
            >>> ProbeSchedule(auto=True, every_n_steps=500).budget
            0.05
            >>> ProbeSchedule(every_n_steps=500).budget is None
            True
        """
        if self.max_overhead is not None:
            return self.max_overhead
        return AUTO_OVERHEAD if self.auto else None

    def _own_clock(self) -> Timing:
        return Timing(time.perf_counter(), self.probe_seconds)

    def start(
        self,
        global_step: int = 0,
        run_steps: float | None = None,
        prior: float | None = None,
        sharers: int = 1,
    ) -> None:
        """Begin a fit: no probe time spent, no step timed (the position is kept).

        Args:
            global_step: the fit's first optimizer step (a resumed fit's is not 0).
            run_steps: the optimizer steps of the whole run (Lightning's
                ``estimated_stepping_batches``; ``None`` or infinite: unknown), which a
                budget is planned over.
            prior: the cost of one probe in training steps, estimated before any is measured
                (``None``: unknown, the first probe is made and measured).
            sharers: how many schedules share the budget.

        Example:
            A first probe of about 30 steps does not fit 1 % of a 500-step run (5 steps):

            >>> schedule = ProbeSchedule(auto=True, every_n_steps=500)
            >>> schedule.start(run_steps=500, prior=30.0, sharers=5)
            >>> schedule.is_due(0), schedule.shortfall.points
            (False, 0)
        """
        self._fit_start, self._unbudgeted = None, None
        self.probe_seconds, self.probes, self.shortfall = 0.0, 0, None
        self._first_step = global_step
        finite = run_steps is not None and math.isfinite(run_steps)
        self._end = int(run_steps) if finite else None  # type: ignore[arg-type]
        budget = self.budget
        if budget is None or self._end is None or prior is None or not prior > 0:
            return
        run = self._end - global_step
        fits = affordable(budget / max(sharers, 1) * run, 0.0, prior)
        if fits < READABLE_POINTS:
            self.shortfall = Shortfall(fits, prior, run, budget, sharers, measured=False)
        if fits == 0:
            self.next_step = max(self.next_step, self._end)  # none in this run

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
        if self.budget is not None and self._fit_start is None:
            timing = (clock or self._own_clock)()
            self._fit_start = (timing.now, global_step, timing.probe_seconds)
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
        if self.budget is not None:
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
        shortest = self._shortest()
        if not step_seconds > 0 or not math.isfinite(probe_seconds):
            return shortest
        f = budget if budget is not None else self.budget
        assert f is not None
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
        self.probes += 1
        if self.budget is None:
            self.record(global_step)
            return
        if self._fit_start is None or self._fit_start[1] >= global_step:
            # no training step timed yet: space this probe at the next step
            self._unbudgeted = seconds
            self.record(global_step, 1)
        else:
            self._space(global_step, global_step, seconds, (clock or self._own_clock)())

    def _shortest(self) -> int:
        """The shortest interval: the user's ``every_n_steps``, or auto's share of the run."""
        if self.auto and self._end is not None:
            return max(1, math.ceil((self._end - self._first_step) / AUTO_POINTS))
        return self.every_n_steps or 1

    def _space(self, probe_step: int, step: int, seconds: float, timing: Timing) -> None:
        """Space the probe after the one at ``probe_step`` (``seconds`` long) to the budget.

        The training time of a step is the fit's mean up to now (``step``): the time passed
        less every sharer's probes (this one's included), so that no schedule counts
        another's probes as training it may spend a part of. With the run's length known,
        the probes still affordable (this fit's spent) are spread over the steps left.
        """
        budget = self.budget
        assert budget is not None
        assert self._fit_start is not None
        began, first, spent_before = self._fit_start
        elapsed = timing.now - began - (timing.probe_seconds - spent_before)
        step_seconds = elapsed / max(step - first, 1)
        sharers = max(timing.sharers, 1)
        share = budget / sharers
        if self._end is None or not step_seconds > 0 or not math.isfinite(seconds):
            interval = self.next_interval(seconds, step_seconds, share)
        else:
            cost, run = seconds / step_seconds, self._end - self._first_step
            fits = affordable(share * run, self.probe_seconds / step_seconds, cost)
            steps_left = self._end - 1 - probe_step
            interval = max(self._shortest(), spacing(steps_left, fits))
            points = self.probes + min(fits, steps_left // interval)
            short = points < READABLE_POINTS and interval > self._shortest()
            self.shortfall = Shortfall(points, cost, run, budget, sharers) if short else None
        self.record(probe_step, timing.broadcast(interval))

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state for checkpoints."""
        return {"next_step": self.next_step, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys keep their defaults)."""
        self.next_step = int(state.get("next_step", self.next_step))
        self.last_step = int(state.get("last_step", self.last_step))
