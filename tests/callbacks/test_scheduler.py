"""The scheduler alone, without a Trainer: the cadence it picks from fake step and probe times.

``ProbeSchedule`` reads time only through the clock it is given (:class:`Timing`), so a
fake clock that advances by a fixed step time and a fixed probe time makes every interval
exact: with probes of ``c`` seconds, steps of ``s`` seconds and a budget ``f`` shared by
``n`` schedules, the interval is ``ceil(c / ((f / n) s))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from lightning_curvature.callbacks.schedule import ProbeSchedule, Timing


class FakeRun:
    """Steps of ``step_seconds`` on a fake clock; each due schedule probes ``probe_seconds``.

    The schedules share one budget, as the monitors of one Trainer do.
    """

    def __init__(
        self,
        schedules: Sequence[ProbeSchedule],
        step_seconds: float,
        probe_seconds: float,
        broadcast: Callable[[int], int] | None = None,
    ) -> None:
        self.schedules = list(schedules)
        self.step_seconds, self.probe_seconds = step_seconds, probe_seconds
        self.broadcast = broadcast
        self.now = 0.0
        for schedule in self.schedules:
            schedule.start()

    def timing(self) -> Timing:
        spent = sum(schedule.probe_seconds for schedule in self.schedules)
        sharers = sum(schedule.max_overhead is not None for schedule in self.schedules)
        if self.broadcast is None:
            return Timing(self.now, spent, sharers)
        return Timing(self.now, spent, sharers, self.broadcast)

    def run(self, steps: range) -> list[list[int]]:
        """The steps at which each schedule probed."""
        probed: list[list[int]] = [[] for _ in self.schedules]
        for step in steps:
            for schedule, steps_probed in zip(self.schedules, probed, strict=True):
                if schedule.is_due(step, clock=self.timing):
                    self.now += self.probe_seconds
                    schedule.probed(step, self.probe_seconds, clock=self.timing)
                    steps_probed.append(step)
            self.now += self.step_seconds
        return probed


def test_the_budget_spaces_probes_by_probe_and_step_time() -> None:
    # 1 s probes, 0.125 s steps, 25 %: 1 / (0.25 · 0.125) = 32 steps apart. Step 0 has no step
    # time yet: step 1 times one and spaces the step-0 probe (instead of probing again).
    schedule = ProbeSchedule(max_overhead=0.25)
    assert FakeRun([schedule], 0.125, 1.0).run(range(100)) == [[0, 32, 64, 96]]
    assert (schedule.next_step, schedule.last_step) == (128, 96)
    assert schedule.probe_seconds == 4.0


def test_the_budget_keeps_every_n_steps_as_the_shortest_interval() -> None:
    floor = ProbeSchedule(every_n_steps=40, max_overhead=0.25)  # 32 < 40
    assert FakeRun([floor], 0.125, 1.0).run(range(100)) == [[0, 40, 80]]
    wider = ProbeSchedule(every_n_steps=20, max_overhead=0.25)  # 32 > 20
    assert FakeRun([wider], 0.125, 1.0).run(range(100)) == [[0, 32, 64, 96]]


def test_cheap_probes_run_at_every_step() -> None:
    # ceil(0.01 / (0.25 · 0.125)) = 1
    schedule = ProbeSchedule(max_overhead=0.25)
    assert FakeRun([schedule], 0.125, 0.01).run(range(12)) == [list(range(12))]


def test_schedules_share_the_budget_and_never_count_each_others_probes_as_training() -> None:
    # Two schedules at 25 % keep to 12.5 % each: 1 / (0.125 · 0.125) = 64 steps apart. Had
    # one counted the other's 1 s probe as training, its step time would be 8x as long.
    schedules = [ProbeSchedule(max_overhead=0.25) for _ in range(2)]
    assert FakeRun(schedules, 0.125, 1.0).run(range(100)) == [[0, 64], [0, 64]]
    assert [s.next_step for s in schedules] == [128, 128]
    # A schedule without a budget shares none of it, but its probes are not training either.
    fixed = ProbeSchedule(every_n_steps=10)
    budgeted = ProbeSchedule(max_overhead=0.25)
    probed = FakeRun([fixed, budgeted], 0.125, 1.0).run(range(100))
    assert probed == [list(range(0, 100, 10)), [0, 32, 64, 96]]


def test_every_process_takes_rank_zeros_interval() -> None:
    asked: list[int] = []

    def rank_zero(interval: int) -> int:
        asked.append(interval)
        return 7

    schedule = ProbeSchedule(max_overhead=0.25)
    assert FakeRun([schedule], 0.125, 1.0, rank_zero).run(range(30)) == [[0, 7, 14, 21, 28]]
    assert asked[0] == 32  # what this process computed, replaced by rank zero's


def test_the_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    uninterrupted = ProbeSchedule(max_overhead=0.25)
    assert FakeRun([uninterrupted], 0.125, 1.0).run(range(130)) == [[0, 32, 64, 96, 128]]

    first = ProbeSchedule(max_overhead=0.25)
    assert FakeRun([first], 0.125, 1.0).run(range(40)) == [[0, 32]]
    state = first.state_dict()
    assert state == {"next_step": 64, "last_step": 32}
    assert all(type(value) is int for value in state.values())
    torch.save(state, tmp_path / "schedule.pt")

    resumed = ProbeSchedule(max_overhead=0.25)
    resumed.load_state_dict(torch.load(tmp_path / "schedule.pt", weights_only=True))
    # A resumed fit has timed no step yet: the probe at 64 is spaced at step 65, to the
    # same 32 steps, so the run goes on at the uninterrupted run's steps.
    assert FakeRun([resumed], 0.125, 1.0).run(range(40, 130)) == [[64, 96, 128]]
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_a_fixed_cadence_state_round_trips_and_resumes_at_the_next_multiple() -> None:
    schedule = ProbeSchedule(every_n_steps=5)
    assert FakeRun([schedule], 0.125, 1.0).run(range(12)) == [[0, 5, 10]]
    assert schedule.state_dict() == {"next_step": 0, "last_step": 10}
    resumed = ProbeSchedule(every_n_steps=5)
    resumed.load_state_dict(schedule.state_dict())
    assert not resumed.is_due(10)  # acted there before the checkpoint
    assert FakeRun([resumed], 0.125, 1.0).run(range(10, 21)) == [[15, 20]]


@pytest.mark.parametrize(
    ("recorded", "expected"),
    [
        # SAM steps every 3 steps, logged once per window of 5 steps: the first in each
        ({0, 3, 6, 9, 12, 15, 18}, [0, 6, 12, 15]),
        # step 0's values were not finite (not recorded): step 3 is its window's first
        ({3, 6, 9, 12, 15, 18}, [3, 6, 12, 15]),
    ],
)
def test_once_per_window_acts_at_the_first_step_asked_in_each_window(
    recorded: set[int], expected: list[int]
) -> None:
    logs = ProbeSchedule(every_n_steps=5, once_per_window=True)
    acted = []
    for step in range(0, 20, 3):
        if logs.is_due(step) and step in recorded:
            logs.record(step)
            acted.append(step)
    assert acted == expected
    assert logs.state_dict() == {"next_step": 0, "last_step": expected[-1]}


def test_a_new_fit_starts_with_no_probe_time_and_no_timed_step() -> None:
    schedule = ProbeSchedule(max_overhead=0.25)
    FakeRun([schedule], 0.125, 1.0).run(range(40))
    assert schedule.probe_seconds == 2.0
    schedule.start()
    assert schedule.probe_seconds == 0.0
    assert schedule.next_step == 64  # the position is kept (it is what a checkpoint holds)
