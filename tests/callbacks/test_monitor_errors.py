"""Loud on bad input (construction, setup), quiet on bad luck (one warning, training goes on)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import (
    LIGHTNING_NOISE,
    TanhRegressor,
    csv_logger,
    hessian_loss,
    loader,
    make_trainer,
    read_csv,
    regression_data,
    steps,
)

from lightning_curvature import (
    CurvatureWarning,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

pytestmark = LIGHTNING_NOISE

MONITORS = [
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
    GradientCoherenceMonitor,
]

# (keyword arguments, the argument the message must name)
COMMON_INVALID: list[tuple[dict[str, Any], str]] = [
    *[({"every_n_steps": v}, "every_n_steps") for v in (0, -1, 1.5, True, "10")],
    *[({"every_n_epochs": v}, "every_n_epochs") for v in (0, -2, 2.0, False)],
    *[({"max_overhead": v}, "max_overhead") for v in (0, 1, -0.1, 1.5, "0.05", math.nan)],
    ({"every_n_steps": None}, "every_n_steps"),  # no trigger at all
    ({"probe": "random"}, "probe"),
    ({"probe": None}, "probe"),
    *[({"probe_batches": v}, "probe_batches") for v in (0, -1, 1.5, True)],
    ({"probe": "current", "probe_batches": 2}, "probe_batches"),
    ({"probe": "current", "probe_dataloader": [torch.zeros(2)]}, "probe_dataloader"),
    ({"batch_norm": "as_is"}, "batch_norm"),
    ({"batch_norm": "frozen"}, "batch_norm"),
    ({"backend": "jvp"}, "backend"),
    ({"loss_fn": "mse"}, "loss_fn"),
    ({"loss_fn": 3}, "loss_fn"),
    *[({"seed": v}, "seed") for v in (1.5, "0", True, None)],
]

SPECIFIC_INVALID: list[tuple[type, dict[str, Any], str]] = [
    *[(HessianEigenvalueMonitor, {"k": v}, "`k`") for v in (0, -1, 1.5, True)],
    *[(HessianEigenvalueMonitor, {"tol": v}, "tol") for v in (0, -1e-3, "1e-3", math.nan, True)],
    (HessianEigenvalueMonitor, {"k": 3, "max_iter": 2}, "max_iter"),
    (HessianEigenvalueMonitor, {"max_iter": 0}, "max_iter"),
    (HessianEigenvalueMonitor, {"max_iter": 10.0}, "max_iter"),
    (HessianEigenvalueMonitor, {"max_iter": True}, "max_iter"),
    (HessianEigenvalueMonitor, {"per_layer": "net.*"}, "per_layer"),
    *[(HessianTraceMonitor, {"num_hvps": v}, "num_hvps") for v in (1, 0, 2.5, True)],
    (HessianTraceMonitor, {"method": "hutch++", "num_hvps": 2}, "num_hvps"),
    (HessianTraceMonitor, {"method": "exact"}, "method"),
    (HessianTraceMonitor, {"per_layer": "net.*"}, "per_layer"),
    (HessianTraceMonitor, {"per_layer": [1]}, "per_layer"),
    *[(SpectralDensityMonitor, {"num_steps": v}, "num_steps") for v in (1, 0, 2.0, True)],
    *[(SpectralDensityMonitor, {"num_runs": v}, "num_runs") for v in (0, 1.0)],
    *[(SpectralDensityMonitor, {"num_points": v}, "num_points") for v in (1, "200")],
]


@pytest.mark.parametrize("monitor", MONITORS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(("kwargs", "name"), COMMON_INVALID, ids=lambda x: repr(x)[:40])
def test_invalid_common_arguments_raise_at_construction_naming_them(
    monitor: type, kwargs: dict[str, Any], name: str
) -> None:
    with pytest.raises(MisconfigurationException, match=name) as raised:
        monitor(**kwargs)
    message = str(raised.value)
    assert "got" in message or "at least one" in message  # says what it got / what is missing


@pytest.mark.parametrize(("monitor", "kwargs", "name"), SPECIFIC_INVALID, ids=repr)
def test_invalid_specific_arguments_raise_at_construction_naming_them(
    monitor: type, kwargs: dict[str, Any], name: str
) -> None:
    with pytest.raises(MisconfigurationException, match=name) as raised:
        monitor(**kwargs)
    assert "got" in str(raised.value)


@pytest.mark.parametrize("monitor", MONITORS, ids=lambda m: m.__name__)
def test_valid_edge_values_are_accepted(monitor: type) -> None:
    monitor(every_n_steps=None, on_train_end=True)
    monitor(every_n_steps=None, every_n_epochs=1)
    monitor(every_n_steps=1, max_overhead=0.999)
    backend = {} if monitor is GradientCoherenceMonitor else {"backend": "double_backward"}
    monitor(probe="current", batch_norm="train", seed=-3, **backend)
    monitor(probe_batches=4, probe_dataloader=[torch.zeros(2)], loss_fn=hessian_loss)


# -- Trainer-dependent misfits, at setup -----------------------------------------------------------
def test_no_logger_fails_at_setup(tmp_path: Path) -> None:
    trainer = make_trainer([HessianTraceMonitor(every_n_steps=1)], logger=False, max_steps=1)
    with pytest.raises(MisconfigurationException, match="no logger"):
        trainer.fit(TanhRegressor(), loader(regression_data(), 8))


class ManualRegressor(TanhRegressor):
    """Manual optimization: calling its training_step from a probe would step the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(hessian_loss(self, batch))
        optimizer.step()


def test_manual_optimization_needs_a_loss_fn(tmp_path: Path) -> None:
    trainer = make_trainer(
        [HessianEigenvalueMonitor(every_n_steps=1)], logger=csv_logger(tmp_path), max_steps=2
    )
    with pytest.raises(MisconfigurationException, match="manual optimization needs `loss_fn=`"):
        trainer.fit(ManualRegressor(), loader(regression_data(), 8))


def test_manual_optimization_with_a_loss_fn_works(tmp_path: Path) -> None:
    monitor = HessianEigenvalueMonitor(every_n_steps=1, loss_fn=hessian_loss)
    logger = csv_logger(tmp_path)
    trainer = make_trainer([monitor], logger=logger, max_steps=3)
    trainer.fit(ManualRegressor(), loader(regression_data(), 8))
    assert trainer.global_step == 3
    assert steps(read_csv(logger)["curvature/eigenvalue_1"]) == [0, 1, 2]
    assert "curvature/stability_threshold" in monitor.last_metrics


@pytest.mark.parametrize("monitor", MONITORS, ids=lambda m: m.__name__)
def test_fsdp1_fails_at_setup_naming_the_alternative(tmp_path: Path, monitor: type) -> None:
    # FSDP needs a GPU to build a real Trainer; the check only reads `.strategy` and `.loggers`.
    # (ModelParallelStrategy is supported since FSDP2: tests/distributed/test_fsdp_setup.py.)
    trainer = SimpleNamespace(strategy=FSDPStrategy(), loggers=[csv_logger(tmp_path)])
    with pytest.raises(
        MisconfigurationException, match=r"does not support FSDPStrategy.*ModelParallelStrategy"
    ):
        monitor(every_n_steps=1).setup(trainer, TanhRegressor(), stage="fit")


def test_setup_for_other_stages_checks_nothing() -> None:
    trainer = SimpleNamespace(strategy=FSDPStrategy(), loggers=[])
    HessianTraceMonitor(every_n_steps=1).setup(trainer, TanhRegressor(), stage="validate")


# -- quiet on bad luck -----------------------------------------------------------------------------
def nan_at(bad_steps: set[int]):  # type: ignore[no-untyped-def]
    def loss_fn(module: pl.LightningModule, batch: Any) -> torch.Tensor:
        loss = hessian_loss(module, batch)
        return loss * math.nan if module.trainer.global_step in bad_steps else loss

    return loss_fn


def curvature_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    return [str(r.message) for r in records if issubclass(r.category, CurvatureWarning)]


@pytest.mark.parametrize("monitor", MONITORS, ids=lambda m: m.__name__)
def test_nan_probe_loss_skips_that_probe_with_one_warning_and_training_goes_on(
    tmp_path: Path, monitor: type
) -> None:
    logger = csv_logger(tmp_path)
    kwargs: dict[str, Any] = {"num_steps": 6} if monitor is SpectralDensityMonitor else {}
    callback = monitor(every_n_steps=1, loss_fn=nan_at({2, 4}), **kwargs)
    trainer = make_trainer([callback], logger=logger, max_steps=6)
    with pytest.warns(CurvatureWarning) as records:
        trainer.fit(TanhRegressor(), loader(regression_data(), 8))
    messages = curvature_warnings(records.list)
    assert len(messages) == 1, messages
    assert "step 2" in messages[0]
    assert "not finite" in messages[0]
    assert trainer.global_step == 6
    logged = read_csv(logger)
    tag = next(
        t for t in logged if t.startswith(("curvature/", "gradient/")) and not t.endswith("seconds")
    )
    assert steps(logged[tag]) == [0, 1, 3, 5]
    assert all(math.isfinite(v) for _, v in logged[tag])


def test_non_converging_lanczos_warns_once_however_many_probes(tmp_path: Path) -> None:
    logger = csv_logger(tmp_path)
    monitor = HessianEigenvalueMonitor(k=1, tol=1e-12, max_iter=2, every_n_steps=1)
    trainer = make_trainer([monitor], logger=logger, max_steps=5)
    with pytest.warns(CurvatureWarning) as records:
        trainer.fit(TanhRegressor(), loader(regression_data(), 8))
    messages = curvature_warnings(records.list)
    assert len(messages) == 1, messages
    assert "did not certify" in messages[0]
    assert steps(read_csv(logger)["curvature/eigenvalue_1"]) == [0, 1, 2, 3, 4]  # still logged


def test_each_kind_of_bad_luck_is_reported_once(tmp_path: Path) -> None:
    """A NaN probe must not swallow a later, different warning (nor the other way round)."""
    monitor = HessianEigenvalueMonitor(
        tol=1e-12, max_iter=2, every_n_steps=1, loss_fn=nan_at({0, 3})
    )
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=5)
    with pytest.warns(CurvatureWarning) as records:
        trainer.fit(TanhRegressor(), loader(regression_data(), 8))
    messages = curvature_warnings(records.list)
    assert len(messages) == 2, messages
    assert any("not finite" in m for m in messages)
    assert any("did not certify" in m for m in messages)
    for message in messages:  # one prefix, not the monitor's name twice
        assert message.count("HessianEigenvalueMonitor") == 1, message


class RMSpropRegressor(TanhRegressor):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(self.parameters(), lr=0.01)


def test_unknown_optimizer_warns_once_and_logs_the_eigenvalues(tmp_path: Path) -> None:
    logger = csv_logger(tmp_path)
    monitor = HessianEigenvalueMonitor(every_n_steps=1, tol=1e-2)
    trainer = make_trainer([monitor], logger=logger, max_steps=4)
    with pytest.warns(CurvatureWarning) as records:
        trainer.fit(RMSpropRegressor(), loader(regression_data(), 8))
    messages = curvature_warnings(records.list)
    assert len(messages) == 1, messages
    assert "no stability threshold is known for RMSprop" in messages[0]
    logged = read_csv(logger)
    assert steps(logged["curvature/eigenvalue_1"]) == [0, 1, 2, 3]
    assert "curvature/stability_threshold" not in logged
    assert "curvature/sharpness_ratio" not in logged


def test_prog_bar_shows_the_top_eigenvalue_including_with_a_final_probe(tmp_path: Path) -> None:
    monitor = HessianEigenvalueMonitor(every_n_steps=2, on_train_end=True, prog_bar=True)
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=3)
    trainer.fit(TanhRegressor(), loader(regression_data(), 8))
    assert monitor.schedule.last_step == 3  # the final probe ran
    shown = trainer.progress_bar_metrics["curvature/eigenvalue_1"]
    logged = read_csv(trainer.logger)["curvature/eigenvalue_1"]  # type: ignore[arg-type]
    assert steps(logged) == [0, 2, 3]
    assert shown == pytest.approx(logged[1][1])  # the last in-batch probe (step 2)
