"""Each way a probe could end a training run now skips that measurement with one warning.

Every case here stopped ``fit`` before (a ``TypeError``, ``ValueError`` or
``ZeroDivisionError`` out of a probe); now the run finishes, the warning names the reason and
the step, and what could be measured is logged.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos import LightningLSTM
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.demos.lstm import SimpleLSTM
from models import (
    LIGHTNING_NOISE,
    TanhRegressor,
    assert_identical,
    csv_logger,
    loader,
    make_trainer,
    read_csv,
    regression_data,
    steps,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import (
    CurvatureWarning,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)
from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.monitor import CurvatureMonitor

pytestmark = [
    *LIGHTNING_NOISE,
    pytest.mark.filterwarnings("ignore:.*`training_step` returned `None`.*"),
    pytest.mark.filterwarnings("ignore:.*torch.jit.script.* is deprecated.*"),  # LSTM demo
]


def every_monitor(**common: Any) -> list[pl.Callback]:
    return [
        HessianEigenvalueMonitor(tol=1e-2, **common),
        HessianTraceMonitor(num_hvps=4, **common),
        SpectralDensityMonitor(num_steps=6, num_points=10, **common),
        GradientCoherenceMonitor(**common),
    ]


def curvature_warnings(records: Any) -> list[str]:
    return [str(r.message) for r in records if issubclass(r.category, CurvatureWarning)]


class NoBatchIdx(TanhRegressor):
    """``training_step(self, batch)``, as Lightning 2 allows."""

    def training_step(self, batch: Any) -> torch.Tensor:  # type: ignore[override]
        return super().training_step(batch, 0)


def test_a_training_step_without_batch_idx_is_probed(tmp_path: Path) -> None:
    logger = csv_logger(tmp_path)
    trainer = make_trainer(every_monitor(every_n_steps=2), logger=logger, max_steps=4)
    trainer.fit(NoBatchIdx(), loader(regression_data(), 8))
    logged = read_csv(logger)
    for tag in ("curvature/eigenvalue_1", "curvature/trace", "curvature/density_max"):
        assert steps(logged[tag]) == [0, 2], tag
    assert steps(logged["gradient/coherence"]) == [0, 2]


class SeesBatchIdx(TanhRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, bool]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append((batch_idx, self.training))  # in place: not undone by the isolation
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(("probe", "expected"), [("current", {0, 3}), ("fixed", {0})])
def test_the_probe_passes_the_training_batch_index_or_0_for_the_fixed_probe(
    tmp_path: Path, probe: str, expected: set[int]
) -> None:
    model = SeesBatchIdx()
    monitor = HessianTraceMonitor(num_hvps=2, every_n_steps=3, probe=probe)  # type: ignore[arg-type]
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=4)
    trainer.fit(model, loader(regression_data(), 8))
    assert [i for i, training in model.seen if training] == [0, 1, 2, 3]
    assert {i for i, training in model.seen if not training} == expected  # the probes (eval)


class NoneAt(TanhRegressor):
    """Skips the batch with index 7 (Lightning's way: return None)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:  # type: ignore[override]
        return None if batch_idx == 7 else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("index", range(4), ids=["eigenvalue", "trace", "density", "coherence"])
def test_a_none_loss_mid_run_skips_that_probe_with_one_warning(tmp_path: Path, index: int) -> None:
    logger = csv_logger(tmp_path)
    monitor = every_monitor(every_n_steps=1, probe="current")[index]
    trainer = make_trainer([monitor], logger=logger, max_steps=10)
    with pytest.warns(CurvatureWarning) as records:
        trainer.fit(NoneAt(), loader(regression_data(n=80), 8))
    messages = curvature_warnings(records)
    assert len(messages) == 1, messages
    assert "step 7" in messages[0]
    assert "training_step returned None" in messages[0]
    assert trainer.global_step == 10
    logged = read_csv(logger)
    tag = next(t for t in logged if t.startswith(("curvature/", "gradient/")))
    assert steps(logged[tag]) == [s for s in range(10) if s != 7]


class Warmup(TanhRegressor):
    """A linear warmup from lr 0 (``LambdaLR``), stepped every optimizer step."""

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 2))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_lr_0_at_step_0_logs_the_eigenvalues_and_warns_once(tmp_path: Path, optimizer: str) -> None:
    logger = csv_logger(tmp_path)
    monitor = HessianEigenvalueMonitor(tol=1e-2, every_n_steps=1)
    trainer = make_trainer([monitor], logger=logger, max_steps=3)
    with pytest.warns(CurvatureWarning) as records:
        trainer.fit(Warmup(optimizer=optimizer), loader(regression_data(), 8))
    messages = curvature_warnings(records)
    assert len(messages) == 1, messages
    assert "learning rate is 0 at step 0" in messages[0]
    logged = read_csv(logger)
    assert steps(logged["curvature/eigenvalue_1"]) == [0, 1, 2]
    assert steps(logged["curvature/stability_threshold"]) == [1, 2]
    # lr 0.05 at step 1 (half of it), 0.05 from step 2: SGD(momentum 0.5) 3/lr, Adam 38/lr
    per_lr = 3.0 if optimizer == "sgd" else 38.0
    assert logged["curvature/stability_threshold"][0][1] == pytest.approx(per_lr / 0.025)


def test_coherence_of_the_boring_model_with_one_example_per_batch_warns_once(
    tmp_path: Path,
) -> None:
    """BoringModel trains on batches of one example: one gradient sample per probe."""
    monitor = GradientCoherenceMonitor(every_n_steps=1)
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=3)
    with pytest.warns(CurvatureWarning) as records:
        trainer.fit(BoringModel())
    messages = curvature_warnings(records)
    assert len(messages) == 1, messages
    assert "step 0 gave 1 gradient sample(s)" in messages[0]
    assert trainer.global_step == 3
    assert monitor.last_metrics == {}


def test_a_current_probe_of_a_one_example_last_batch_warns_once_and_goes_on(
    tmp_path: Path,
) -> None:
    logger = csv_logger(tmp_path)
    monitor = GradientCoherenceMonitor(every_n_steps=1, probe="current")
    trainer = make_trainer([monitor], logger=logger, max_epochs=2)
    with pytest.warns(CurvatureWarning) as records:  # 9 examples in batches of 4: 4, 4, 1
        trainer.fit(TanhRegressor(), loader(regression_data(n=9), 4))
    messages = curvature_warnings(records)
    assert len(messages) == 1, messages
    assert "step 2 gave 1 gradient sample(s)" in messages[0]
    assert trainer.global_step == 6
    assert steps(read_csv(logger)["gradient/coherence"]) == [0, 1, 3, 4]


class NoSecondDerivative(TanhRegressor):
    """An ``EmbeddingBag`` on the path: no backend has its second derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(4, 5, mode="sum")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        tokens = (x.abs() * 10).long() % 4
        return torch.nn.functional.mse_loss(self.net(x + self.bag(tokens)).squeeze(-1), y)


def test_a_failing_backend_skips_the_probe_with_one_warning(tmp_path: Path) -> None:
    logger = csv_logger(tmp_path)
    # (backend="auto" would fall back to finite differences through the bag)
    monitor = HessianTraceMonitor(num_hvps=2, every_n_steps=1, backend="double_backward")
    trainer = make_trainer([monitor], logger=logger, max_steps=3)
    with pytest.warns(CurvatureWarning) as records:
        trainer.fit(NoSecondDerivative(), loader(regression_data(), 8))
    messages = curvature_warnings(records)
    assert len(messages) == 1, messages
    assert "skipped the probe at step 0 (RuntimeError" in messages[0]
    assert "EmbeddingBag" in messages[0]
    assert trainer.global_step == 3


class InfiniteValue(CurvatureMonitor):
    def measure(self, trainer, pl_module, batches):  # type: ignore[no-untyped-def]
        return Measurement({"probe/finite": 1.0, "probe/infinite": math.inf})


def test_non_finite_values_are_left_out_with_one_warning(tmp_path: Path) -> None:
    logger = csv_logger(tmp_path)
    trainer = make_trainer([InfiniteValue(every_n_steps=1)], logger=logger, max_steps=3)
    with pytest.warns(CurvatureWarning) as records:
        trainer.fit(TanhRegressor(), loader(regression_data(), 8))
    messages = curvature_warnings(records)
    assert len(messages) == 1, messages
    assert "probe/infinite" in messages[0]
    assert "step 0" in messages[0]
    logged = read_csv(logger)
    assert steps(logged["probe/finite"]) == [0, 1, 2]
    assert "probe/infinite" not in logged


def small_lstm() -> LightningLSTM:
    model = LightningLSTM(vocab_size=12)
    model.model = SimpleLSTM(vocab_size=12, ninp=6, nhid=6, nlayers=2, dropout=0.2)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.5)  # type: ignore[method-assign]
    model.prepare_data = lambda: None  # type: ignore[method-assign]  # (it downloads WikiText2)
    return model


def lstm_run(tmp_path: Path, callbacks: list[pl.Callback]) -> dict[str, Any]:
    pl.seed_everything(3, verbose=False)
    model = small_lstm()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 12, (24, 6), generator=g)
    data = DataLoader(TensorDataset(tokens, torch.roll(tokens, -1, 1)), batch_size=6)
    trainer = make_trainer(callbacks, logger=csv_logger(tmp_path), max_steps=6)
    trainer.fit(model, data)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "hidden": model.hidden}


def test_lightning_lstm_keeps_its_hidden_state_and_trains_bit_identically(tmp_path: Path) -> None:
    """Lightning's demo LSTM keeps ``self.hidden`` between steps; the probes (whose
    ``training_step`` sets it too) leave training's own untouched."""
    without = lstm_run(tmp_path / "without", [])
    monitors = every_monitor(every_n_steps=2)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", CurvatureWarning)
        with_monitors = lstm_run(tmp_path / "with", monitors)
    assert_identical(with_monitors, without)
    for message in curvature_warnings(records):  # vmap cannot pass the LSTM: micro-batches
        assert "per-example gradients" in message or "gradient sample(s)" in message, message
    for monitor in monitors[:3]:
        assert monitor.last_metrics, type(monitor).__name__
        assert all(math.isfinite(v) for v in monitor.last_metrics.values())
