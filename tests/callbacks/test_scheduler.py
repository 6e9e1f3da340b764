"""The scheduler alone, without a Trainer: the cadence it picks from fake step and probe times.

``ProbeSchedule`` reads time only through the clock it is given (:class:`Timing`), so a
fake clock that advances by a fixed step time and a fixed probe time makes every interval
exact: with probes of ``c`` seconds, steps of ``s`` seconds and a budget ``f`` shared by
``n`` schedules, the interval is ``ceil(c / ((f / n) s))``. Told the run's length ``T`` (as
Lightning's ``estimated_stepping_batches`` tells a monitor), a schedule plans its budget over
the whole run instead: ``(f / n) T`` steps' time, every probe counted (the first, at step 0,
too), the probes still affordable spread over the steps left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from lightning_curvature.callbacks.budget import AUTO_OVERHEAD, READABLE_POINTS
from lightning_curvature.callbacks.schedule import ProbeSchedule, Timing


class FakeRun:
    """Steps of ``step_seconds`` on a fake clock; each due schedule probes ``probe_seconds``.

    The schedules share one budget, as the monitors of one Trainer do. With ``run_steps``
    they are told the run's length (and a probe's estimated cost in steps, ``prior``), as a
    monitor is at the start of training; ``first_probe_seconds`` is a first probe's (cold)
    cost, if it differs.
    """

    def __init__(
        self,
        schedules: Sequence[ProbeSchedule],
        step_seconds: float,
        probe_seconds: float,
        broadcast: Callable[[int], int] | None = None,
        run_steps: int | None = None,
        prior: float | None = None,
        first_probe_seconds: float | None = None,
        first_step: int = 0,
    ) -> None:
        self.schedules = list(schedules)
        self.step_seconds, self.probe_seconds = step_seconds, probe_seconds
        self.first_probe_seconds = first_probe_seconds
        self.broadcast = broadcast
        self.now = 0.0
        sharers = sum(schedule.budget is not None for schedule in self.schedules)
        for schedule in self.schedules:
            schedule.start(first_step, run_steps, prior, sharers)

    def timing(self) -> Timing:
        spent = sum(schedule.probe_seconds for schedule in self.schedules)
        sharers = sum(schedule.budget is not None for schedule in self.schedules)
        if self.broadcast is None:
            return Timing(self.now, spent, sharers)
        return Timing(self.now, spent, sharers, self.broadcast)

    def run(self, steps: range) -> list[list[int]]:
        """The steps at which each schedule probed."""
        probed: list[list[int]] = [[] for _ in self.schedules]
        for step in steps:
            for schedule, steps_probed in zip(self.schedules, probed, strict=True):
                if schedule.is_due(step, clock=self.timing):
                    cost = self.probe_seconds
                    if self.first_probe_seconds is not None and not steps_probed:
                        cost = self.first_probe_seconds
                    self.now += cost
                    schedule.probed(step, cost, clock=self.timing)
                    steps_probed.append(step)
            self.now += self.step_seconds
        return probed

    def training_seconds(self) -> float:
        return self.now - sum(schedule.probe_seconds for schedule in self.schedules)


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


# -- every_n_steps="auto": a plan over the run Lightning expects --------------------------------
def auto() -> ProbeSchedule:
    """What a monitor at ``every_n_steps="auto"`` holds (its default cadence 500 is used only
    where the run's length is unknown)."""
    return ProbeSchedule(every_n_steps=500, auto=True)


def test_auto_aims_at_25_evenly_spaced_probes_when_they_are_cheap() -> None:
    # 0.05 s probes, 0.1 s steps: half a step each, 100 of them would fit 5% of 1000 steps;
    # the plan takes the 25 it aims at, one every 40 steps, from step 0.
    schedule = auto()
    run = FakeRun([schedule], 0.1, 0.05, run_steps=1000)
    assert run.run(range(1000)) == [list(range(0, 1000, 40))]
    assert schedule.shortfall is None
    assert schedule.probe_seconds / run.training_seconds() == pytest.approx(0.0125)


def test_auto_counts_the_step_0_probe_and_spreads_what_is_left_of_the_budget() -> None:
    # 1 s probes (10 steps' time), 5% of 1000 steps = 50 steps' time: 5 probes in all, the one
    # at step 0 included, spread over the run; exactly the budget when the run ends.
    schedule = auto()
    run = FakeRun([schedule], 0.1, 1.0, run_steps=1000)
    assert run.run(range(1000)) == [[0, 200, 400, 600, 800]]
    assert schedule.probe_seconds / run.training_seconds() == pytest.approx(AUTO_OVERHEAD)
    # fewer than a readable chart: said, with what it would take
    assert schedule.shortfall is not None
    assert schedule.shortfall.points == 5
    assert schedule.shortfall.cost == pytest.approx(10.0)
    assert schedule.shortfall.every_n_steps == 100
    assert schedule.shortfall.overhead_needed == pytest.approx(0.1)


def test_a_cold_first_probe_is_paid_for_by_fewer_later_ones() -> None:
    # Step 0 costs 2 s (a cold Lanczos start), later probes 1 s. After step 0 the plan knows
    # one cost, 20 steps' time: one more of those fits the 30 left, halfway; that one costs
    # 10, so two more fit the 20 left, at a third and two thirds of the rest: 5 s in all.
    schedule = auto()
    run = FakeRun([schedule], 0.1, 1.0, run_steps=1000, first_probe_seconds=2.0)
    assert run.run(range(1000)) == [[0, 500, 667, 834]]
    assert schedule.probe_seconds / run.training_seconds() == pytest.approx(AUTO_OVERHEAD)


@pytest.mark.parametrize("sharers", [1, 5])
@pytest.mark.parametrize(
    ("step_seconds", "probe_seconds", "first_probe_seconds"),
    [(0.1, 0.05, None), (0.1, 1.0, None), (0.1, 1.0, 3.0), (0.007, 0.12, 0.2), (0.05, 0.3, 0.9)],
)
def test_every_probe_step_0_included_stays_within_the_budget_over_the_run(
    step_seconds: float, probe_seconds: float, first_probe_seconds: float | None, sharers: int
) -> None:
    schedules = [auto() for _ in range(sharers)]
    # (the prior lets the first probe happen: it is an estimate of at most the first's cost)
    cost = (first_probe_seconds or probe_seconds) / step_seconds
    run = FakeRun(
        schedules, step_seconds, probe_seconds, run_steps=2000, prior=cost,
        first_probe_seconds=first_probe_seconds,
    )  # fmt: skip
    probed = run.run(range(2000))
    spent = sum(schedule.probe_seconds for schedule in schedules)
    assert spent <= AUTO_OVERHEAD * run.training_seconds() * (1 + 1e-9)
    for steps, schedule in zip(probed, schedules, strict=True):
        assert len(steps) <= 25
        fits = AUTO_OVERHEAD / sharers * 2000 // cost  # at least the budget's count, less one
        assert len(steps) >= min(25, fits) - 1
        assert (schedule.shortfall is None) == (len(steps) >= READABLE_POINTS)


def test_a_first_probe_estimated_beyond_the_budget_is_never_made_and_that_is_said() -> None:
    # The digits CNN of examples/digits_cnn.py: a 529-step run, five monitors at 5% (1% or
    # 5.3 steps' time each); an eigenvalue probe is estimated at 30 steps: none fits.
    schedule = auto()
    run = FakeRun([schedule, *(auto() for _ in range(4))], 0.007, 0.12, run_steps=529, prior=30.0)
    assert run.run(range(529))[0] == []
    assert schedule.probe_seconds == 0.0
    assert schedule.shortfall is not None
    assert (schedule.shortfall.points, schedule.shortfall.measured) == (0, False)
    assert schedule.shortfall.every_n_steps == 52
    assert schedule.state_dict() == {"next_step": 529, "last_step": -1}


def test_a_resumed_run_plans_what_is_left_of_it() -> None:
    # Resumed at step 500 of 1000: the plan covers the 500 steps left, 25 steps' time at 5%.
    schedule = auto()
    schedule.load_state_dict({"next_step": 520, "last_step": 480})
    run = FakeRun([schedule], 0.1, 1.0, run_steps=1000, first_step=500)
    assert run.run(range(500, 1000)) == [[520, 760]]  # two of 10 steps' time, then none fits
    assert schedule.probe_seconds / run.training_seconds() <= AUTO_OVERHEAD


def test_without_the_runs_length_auto_keeps_its_cadence_as_the_shortest_interval() -> None:
    # (an iterable dataset of unknown length, no max_steps): 500 steps apart at least, and
    # farther when the probes cost more than the budget's share of that.
    cheap, costly = auto(), auto()
    assert FakeRun([cheap], 0.1, 0.05).run(range(1200)) == [[0, 500, 1000]]
    assert FakeRun([costly], 0.1, 4.537).run(range(1200)) == [[0, 908]]  # 4.537 / (5% · 0.1)
