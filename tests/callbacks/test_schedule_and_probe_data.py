"""When monitors probe (cadence, time budget) and on what data (fixed, several, current, own)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from models import (
    CPU,
    LIGHTNING_NOISE,
    LeastSquares,
    TanhRegressor,
    csv_logger,
    loader,
    make_trainer,
    read_csv,
    regression_data,
    steps,
)
from torch.utils.data import DataLoader, TensorDataset

import lightning_curvature.callbacks.monitor as base
from lightning_curvature import HessianEigenvalueMonitor, HessianTraceMonitor
from lightning_curvature.callbacks import CurvatureMonitor, Measurement
from lightning_curvature.callbacks.probe_data import draw_batches
from lightning_curvature.callbacks.schedule import ProbeSchedule

pytestmark = LIGHTNING_NOISE


# -- ProbeSchedule -------------------------------------------------------------------------------
def test_next_interval_spaces_probes_to_the_overhead_budget() -> None:
    schedule = ProbeSchedule(max_overhead=0.05)
    # a 1 s probe, 0.1 s steps, 5 %: 1 s of probing per 20 s of training = 200 steps
    assert schedule.next_interval(1.0, 0.1) == 200
    assert ProbeSchedule(max_overhead=0.25).next_interval(1.0, 0.125) == 32
    assert ProbeSchedule(max_overhead=0.5).next_interval(0.1, 1.0) == 1  # cheap probe: each step
    # every_n_steps is the shortest interval
    assert ProbeSchedule(every_n_steps=500, max_overhead=0.05).next_interval(1.0, 0.1) == 500
    # step time unknown (first probe) or a broken timing: the shortest interval
    assert schedule.next_interval(1.0, 0.0) == 1
    assert schedule.next_interval(float("nan"), 0.1) == 1
    assert schedule.next_interval(float("inf"), 0.1) == 1


def test_is_due_by_steps_epochs_and_once_per_step() -> None:
    by_steps = ProbeSchedule(every_n_steps=4)
    assert [s for s in range(13) if by_steps.is_due(s, epoch=0, epoch_start=False)] == [0, 4, 8, 12]

    by_epochs = ProbeSchedule(every_n_epochs=2)
    # (step, epoch, first batch of the epoch?) with 3 steps per epoch
    calls = [(s, s // 3, s % 3 == 0) for s in range(12)]
    assert [s for s, e, start in calls if by_epochs.is_due(s, e, start)] == [0, 6]

    both = ProbeSchedule(every_n_steps=5, every_n_epochs=3)
    assert [s for s, e, start in calls if both.is_due(s, e, start)] == [0, 5, 9, 10]

    once = ProbeSchedule(every_n_steps=1)
    assert once.is_due(7, 0, False)
    once.record(7)
    assert not once.is_due(7, 0, False)  # the second micro-batch of an accumulated step
    assert once.is_due(8, 0, False)


def test_adaptive_schedule_waits_for_next_step_and_its_state_round_trips() -> None:
    schedule = ProbeSchedule(max_overhead=0.1)
    assert schedule.is_due(0, 0, True)
    schedule.record(0, interval=5)
    assert [s for s in range(1, 12) if schedule.is_due(s, 0, False)] == [5, 6, 7, 8, 9, 10, 11]
    restored = ProbeSchedule(max_overhead=0.1)
    restored.load_state_dict(schedule.state_dict())
    assert (restored.next_step, restored.last_step) == (5, 0)
    restored.load_state_dict({})  # tolerant of older checkpoints
    assert (restored.next_step, restored.last_step) == (5, 0)


# -- max_overhead in a fit, with a controlled clock ------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class CostlyMonitor(CurvatureMonitor):
    """A probe that takes exactly 1 s on the fake clock."""

    def __init__(self, clock: Clock, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock = clock

    def measure(self, trainer, pl_module, batches):  # type: ignore[no-untyped-def]
        self.clock.now += 1.0
        return Measurement({"probe/value": float(trainer.global_step)}, hvps=0)


class StepTime(pl.Callback):
    """Each training step takes 0.125 s on the fake clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.clock.now += 0.125


def test_max_overhead_spaces_probes_by_measured_probe_and_step_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(base, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monitor = CostlyMonitor(clock, every_n_steps=1, max_overhead=0.25)
    logger = csv_logger(tmp_path)
    trainer = make_trainer([monitor, StepTime(clock)], logger=logger, max_steps=70)
    trainer.fit(TanhRegressor(), loader(regression_data(n=64), batch_size=8))
    # Step 0: no step time yet, so step 1 times one (0.125 s) and budgets the step-0 probe
    # (instead of probing again). The run has 70 steps (8.75 s of training), of which 25% is
    # 17.5 steps' time; the step-0 probe took 8 of them, so one more fits, halfway through
    # what is left: 2 s of probes, 23% (the old rule, 1 s / (0.25 × 0.125 s) = 32 steps
    # apart, probed at 0, 32, 64: 34%, the last probe never paid for).
    logged = read_csv(logger)
    assert steps(logged["probe/value"]) == [0, 35]
    assert [v for _, v in logged["probe_cost/seconds"]] == [1.0] * 2
    assert monitor.probe_seconds / (70 * 0.125) <= 0.25


def test_monitors_share_one_budget_and_never_count_each_others_probes_as_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two monitors at max_overhead=0.25 keep to 0.125 each (0.25 together), and the 1 s
    probe of one is not training time for the other: after step 1 both measure 0.125 s
    steps, so a probe costs 8 steps' time of the 25 each may spend on a 200-step run: after
    the step-0 probe two more fit, spread over the 199 steps left (67 apart).
    (Counting the other's probe as training, a step would have looked 9x as long.)"""
    clock = Clock()
    monkeypatch.setattr(base, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monitors = [
        CostlyMonitor(clock, every_n_steps=1, max_overhead=0.25, seed=seed) for seed in (0, 1)
    ]
    logger = csv_logger(tmp_path)
    trainer = make_trainer([*monitors, StepTime(clock)], logger=logger, max_steps=200)
    trainer.fit(TanhRegressor(), loader(regression_data(n=64), batch_size=8))
    for monitor in monitors:
        assert monitor.probe_seconds == 3.0  # steps 0, 67 and 134
        assert monitor.schedule.next_step == 200  # none left in the run
    assert steps(read_csv(logger)["probe/value"]) == [0, 0, 67, 67, 134, 134]


def test_max_overhead_in_a_real_fit_probes_less_often_than_every_step(
    tmp_path: Path, record_property: Any
) -> None:
    logger = csv_logger(tmp_path)
    # (a probe of 4 products is estimated at 10 steps, so a 60-step run affords 3 of them at
    # 50%: the estimate lets the first one happen, the measured costs space the others)
    monitor = HessianTraceMonitor(num_hvps=4, every_n_steps=1, max_overhead=0.5)
    trainer = make_trainer([monitor], logger=logger, max_steps=60)
    started = time.perf_counter()
    trainer.fit(TanhRegressor(), loader(regression_data(n=64), batch_size=8))
    total = time.perf_counter() - started
    logged = read_csv(logger)
    probed = steps(logged["curvature/trace"])
    probe_seconds = sum(v for _, v in logged["probe_cost/trace_seconds"])
    fraction = probe_seconds / total
    record_property("overhead_fraction", fraction)
    print(f"max_overhead=0.5: {len(probed)} probes in 60 steps at {probed}, {fraction:.1%} of fit")
    assert probed[0] == 0  # then the measured interval (step 1 times a step, no probe)
    assert 1 not in probed
    assert len(probed) < 60
    gaps = np.diff(probed)
    assert (gaps >= 1).all()


# -- probe data ------------------------------------------------------------------------------------
def _rng_states() -> tuple[Any, ...]:
    numpy_state = np.random.get_state()
    return (torch.get_rng_state(), numpy_state[1].copy(), numpy_state[2], random.getstate())


def _same_rng(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


@pytest.mark.parametrize("own_generator", [False, True])
def test_draw_batches_is_seeded_and_touches_no_rng(own_generator: bool) -> None:
    dataset = TensorDataset(torch.arange(40.0))
    generator = torch.Generator().manual_seed(123) if own_generator else None
    shuffled = DataLoader(dataset, batch_size=5, shuffle=True, generator=generator)
    before = _rng_states()
    sampler_before = generator.get_state() if generator is not None else None

    first = draw_batches(shuffled, 2, CPU, seed=0)
    again = draw_batches(shuffled, 2, CPU, seed=0)
    other = draw_batches(shuffled, 2, CPU, seed=1)

    assert len(first) == 2
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a[0], b[0])
    assert not torch.equal(first[0][0], other[0][0])
    assert _same_rng(before, _rng_states())
    if generator is not None:
        assert torch.equal(sampler_before, generator.get_state())  # type: ignore[arg-type]


def test_draw_batches_errors_on_an_empty_loader() -> None:
    with pytest.raises(ValueError, match="yielded no batch"):
        draw_batches([], 1, CPU, seed=0)


def _exact_top(x: torch.Tensor) -> float:
    x = x.double()
    return float(torch.linalg.eigvalsh(2 * x.T @ x / len(x))[-1])


def test_probe_batches_average_the_hessian_by_batch_size(tmp_path: Path) -> None:
    dataset = regression_data(n=20, d=5)  # batches of 8, 8 and 4: the three are all the data
    x = dataset.tensors[0]
    monitor = HessianEigenvalueMonitor(tol=1e-5, probe_batches=3, every_n_steps=1)
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=1)
    trainer.fit(LeastSquares(d=5), loader(dataset, batch_size=8))
    assert [len(b[0]) for b in monitor._fixed_batches] == [8, 8, 4]  # type: ignore[union-attr]
    logged = monitor.last_metrics["curvature/eigenvalue_1"]
    assert logged == pytest.approx(_exact_top(x), rel=1e-5)
    # an unweighted mean of the three batch Hessians is another matrix, with another top
    hessians = [2 * b.double().T @ b.double() / len(b) for b in (x[:8], x[8:16], x[16:])]
    unweighted = float(torch.linalg.eigvalsh(sum(hessians) / 3)[-1])
    assert abs(unweighted - logged) > 1e-2 * logged


def test_probe_dataloader_is_where_the_fixed_probe_comes_from(tmp_path: Path) -> None:
    held_out = regression_data(n=16, d=5, seed=7)
    monitor = HessianEigenvalueMonitor(
        tol=1e-5, every_n_steps=1, probe_dataloader=loader(held_out, batch_size=16)
    )
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=2)
    train = regression_data(n=32, d=5)
    trainer.fit(LeastSquares(d=5), loader(train, batch_size=32))
    exact = _exact_top(held_out.tensors[0])
    assert monitor.last_metrics["curvature/eigenvalue_1"] == pytest.approx(exact, rel=1e-5)
    assert abs(_exact_top(train.tensors[0]) - exact) > 1e-2 * exact


@pytest.mark.parametrize("probe", ["fixed", "current"])
def test_fixed_probe_is_one_batch_throughout_and_current_probe_follows_the_optimizer_step(
    tmp_path: Path, probe: str
) -> None:
    dataset = regression_data(n=64, d=5)
    x = dataset.tensors[0]
    monitor = HessianEigenvalueMonitor(tol=1e-5, every_n_steps=1, probe=probe)  # type: ignore[arg-type]
    logger = csv_logger(tmp_path)
    trainer = make_trainer([monitor], logger=logger, max_steps=4, accumulate_grad_batches=2)
    trainer.fit(LeastSquares(d=5), loader(dataset, batch_size=8))
    logged = read_csv(logger)["curvature/eigenvalue_1"]
    assert steps(logged) == [0, 1, 2, 3]  # one probe per optimizer step, not per batch
    if probe == "fixed":  # the first batch of an unshuffled loader, drawn once
        expected = [_exact_top(x[:8])] * 4
    else:  # optimizer step s starts with batch 2s (two micro-batches per step)
        expected = [_exact_top(x[16 * s : 16 * s + 8]) for s in range(4)]
    assert [v for _, v in logged] == pytest.approx(expected, rel=1e-5)
    assert len(set(expected)) == (1 if probe == "fixed" else 4)


class DeviceNormalised(LeastSquares):
    """Batches arrive as dicts and are rescaled in the batch-transfer hooks, as on a GPU."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return (batch["x"], batch["y"])

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return (0.5 * x, y)


class DictDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, dataset: TensorDataset) -> None:
        self.x, self.y = dataset.tensors

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


@pytest.mark.parametrize("probe", ["fixed", "current"])
def test_the_probe_sees_batches_after_the_modules_transfer_hooks(
    tmp_path: Path, probe: str
) -> None:
    dataset = regression_data(n=16, d=5)
    monitor = HessianEigenvalueMonitor(tol=1e-5, every_n_steps=1, probe=probe)  # type: ignore[arg-type]
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=1)
    trainer.fit(DeviceNormalised(d=5), DataLoader(DictDataset(dataset), batch_size=16))
    # what training_step sees is 0.5 x, whose Hessian is a quarter of the raw data's
    exact = _exact_top(0.5 * dataset.tensors[0])
    assert monitor.last_metrics["curvature/eigenvalue_1"] == pytest.approx(exact, rel=1e-5)


class DictData(pl.LightningDataModule):
    """A datamodule that owns the unpacking hook (it wins over the module's)."""

    def __init__(self, dataset: TensorDataset) -> None:
        super().__init__()
        self.dataset = DictDataset(dataset)

    def train_dataloader(self) -> DataLoader:  # type: ignore[type-arg]
        return DataLoader(self.dataset, batch_size=16)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return (batch["x"], 2.0 * batch["y"])


@pytest.mark.filterwarnings("ignore:.*overridden `on_after_batch_transfer` in `LightningModule`.*")
def test_a_datamodules_transfer_hook_is_used_for_the_fixed_probe(tmp_path: Path) -> None:
    dataset = regression_data(n=16, d=5)

    class Module(LeastSquares):
        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            x, y = batch
            return (0.5 * x, y)

    monitor = HessianEigenvalueMonitor(tol=1e-5, every_n_steps=1)
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=1)
    trainer.fit(Module(d=5), datamodule=DictData(dataset))
    (batch,) = monitor._fixed_batches  # type: ignore[misc]
    assert torch.equal(batch[1], 2.0 * dataset.tensors[1])  # the datamodule's hook ran
    exact = _exact_top(0.5 * dataset.tensors[0])  # and the module's after-transfer hook
    assert monitor.last_metrics["curvature/eigenvalue_1"] == pytest.approx(exact, rel=1e-5)
