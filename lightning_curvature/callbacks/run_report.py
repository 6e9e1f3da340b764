"""A monitor's account of its fit: the budget's plan, a line per probe, the table at the end.

Every monitor holds a :class:`RunReport`. At the start of training it plans the monitor's
schedule over the run Lightning expects (``estimated_stepping_batches``) with the monitor's
estimate of a probe's cost, and says once if that run is too short for a readable chart
within the overhead budget (in the log, and in TensorBoard's Text tab as ``curvature/notes``);
after each probe it keeps what was logged
(:class:`~lightning_curvature.callbacks.reporting.summary.ProbeHistory`) and writes one line
(:mod:`~lightning_curvature.callbacks.reporting.progress`); at the end of ``fit`` the first
monitor of the Trainer prints the table of them all. Lines and table go to the
``lightning_curvature`` logger on rank zero only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import lightning.pytorch as pl

from lightning_curvature.callbacks.reporting.logging import tensorboard_writers
from lightning_curvature.callbacks.reporting.progress import LOGGER, probe_line
from lightning_curvature.callbacks.reporting.summary import ProbeHistory, summary_table
from lightning_curvature.callbacks.schedule import ProbeSchedule
from lightning_curvature.callbacks.trainer import run_steps

__all__ = ["NOTES_TAG", "RunReport"]

#: TensorBoard's Text tab: why a chart has fewer points than a reader expects.
NOTES_TAG = "curvature/notes"


class RunReport:
    """The plan, the progress lines and the history of one monitor's fit.

    Args:
        owner: the monitor as the lines name it (its class, and its ``name`` if any).

    Example:
        >>> report = RunReport("HessianTraceMonitor")
        >>> report.history.probes
        0
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        #: What the monitor logged in this fit.
        self.history = ProbeHistory(owner)
        self._said: set[str] = set()
        self._started: float | None = None
        self._run_steps: int | None = None

    def start(
        self,
        trainer: pl.Trainer,
        schedule: ProbeSchedule,
        expected_cost: float | None,
        schedules: Sequence[ProbeSchedule],
    ) -> None:
        """At ``on_train_start``: plan ``schedule`` over the run, say a shortfall once.

        Args:
            trainer: the trainer.
            schedule: the monitor's schedule.
            expected_cost: a probe's estimated cost in gradients of a training batch
                (``None``: unknown).
            schedules: the schedules of every monitor of the Trainer (those with a budget
                share it).
        """
        self.history.clear()
        self._said.clear()
        self._started = time.perf_counter()
        self._run_steps = run_steps(trainer)
        accumulate = max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)
        prior = None if expected_cost is None else expected_cost / accumulate
        sharers = sum(s.budget is not None for s in schedules)
        schedule.start(trainer.global_step, self._run_steps, prior, sharers)
        self._say_shortfall(trainer, schedule)

    def probed(
        self,
        trainer: pl.Trainer,
        schedule: ProbeSchedule,
        step: int,
        seconds: float,
        values: Mapping[str, float] | None,
        hvps: float | None = None,
    ) -> None:
        """After a probe: keep what it logged (``None``: skipped), write its line."""
        self.history.record(step, values, seconds)
        if trainer.is_global_zero:
            elapsed = None if self._started is None else time.perf_counter() - self._started
            share = schedule.probe_seconds / elapsed if elapsed else None
            LOGGER.info(probe_line(self.owner, step, self._run_steps, values, seconds, hvps, share))
        self._say_shortfall(trainer, schedule)

    def note_once(self, trainer: pl.Trainer, key: str, message: str) -> None:
        """Say ``message`` once per fit (rank zero, ``INFO``), after the monitor's name."""
        if key in self._said:
            return
        self._said.add(key)
        if trainer.is_global_zero:
            LOGGER.info(f"{self.owner}: {message}")

    def _say_shortfall(self, trainer: pl.Trainer, schedule: ProbeSchedule) -> None:
        """Once: in the log, and in TensorBoard's Text tab (where the empty charts are)."""
        if schedule.shortfall is None or "shortfall" in self._said:
            return
        self._said.add("shortfall")
        if trainer.is_global_zero:
            message = schedule.shortfall.message(self.owner)
            LOGGER.warning(message)
            for writer in tensorboard_writers(trainer):
                writer.add_text(NOTES_TAG, message, global_step=trainer.global_step)

    def fit_seconds(self) -> float | None:
        """Seconds from the start of training to now (``None`` before it started)."""
        return None if self._started is None else time.perf_counter() - self._started

    @staticmethod
    def summarize(trainer: pl.Trainer, reports: Iterable[RunReport]) -> None:
        """At the end of ``fit`` (the first monitor's): the table of every monitor's history."""
        reports = list(reports)
        if not reports or not trainer.is_global_zero:
            return
        table = summary_table([r.history for r in reports], reports[0].fit_seconds())
        LOGGER.info(f"Curvature monitors, from the start of training to the end of fit:\n{table}")
