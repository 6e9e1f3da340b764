"""Every Lightning logger gets every scalar at the probe's step; nothing else is disturbed."""

from __future__ import annotations

import warnings
from argparse import Namespace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import Logger
from models import (
    LIGHTNING_NOISE,
    BNDropoutClassifier,
    TanhRegressor,
    classification_data,
    csv_logger,
    loader,
    make_trainer,
    read_csv,
    read_events,
    regression_data,
    steps,
    tb_logger,
    tb_scalars,
)

from lightning_curvature import (
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

pytestmark = LIGHTNING_NOISE


class RecordingLogger(Logger):
    """Any other Lightning logger: remembers every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(
        self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any
    ) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        assert step is not None
        self.calls.append((step, dict(metrics)))


def monitors() -> list[Any]:
    return [
        HessianEigenvalueMonitor(k=2, every_n_steps=3, on_train_end=True),
        HessianTraceMonitor(num_hvps=4, every_n_steps=2, per_layer=True),
        SpectralDensityMonitor(num_steps=6, every_n_epochs=1),
    ]


def curvature_only(series: dict[str, list[tuple[int, float]]]) -> dict[str, list[Any]]:
    return {tag: values for tag, values in series.items() if tag.startswith("curvature/")}


def test_csv_tensorboard_and_any_other_logger_get_every_scalar_at_its_step(
    tmp_path: Path,
) -> None:
    csv, tb, other = csv_logger(tmp_path), tb_logger(tmp_path), RecordingLogger()
    trainer = make_trainer(monitors(), logger=[csv, tb, other], max_steps=7, log_every_n_steps=5)
    trainer.fit(TanhRegressor(), loader(regression_data(n=32), batch_size=8))  # 4 steps/epoch
    from_csv = curvature_only(read_csv(csv))
    from_tb = curvature_only(tb_scalars(read_events(tb)))
    from_other: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in other.calls:
        for tag, value in metrics.items():
            if tag.startswith("curvature/"):
                from_other.setdefault(tag, []).append((step, value))

    assert set(from_csv) == set(from_tb) == set(from_other)
    assert steps(from_csv["curvature/eigenvalue_2"]) == [0, 3, 6, 7]
    assert steps(from_csv["curvature/trace/net.0"]) == [0, 2, 4, 6]
    assert steps(from_csv["curvature/density_max"]) == [4, 7]  # epoch ends (7: cut short)
    for tag, series in from_csv.items():
        assert steps(from_tb[tag]) == steps(series) == steps(from_other[tag]), tag
        for (_, a), (_, b), (_, c) in zip(series, from_tb[tag], from_other[tag], strict=True):
            assert a == pytest.approx(c, rel=1e-12), tag  # CSV keeps the float
            assert b == pytest.approx(c, rel=1e-6), tag  # TensorBoard stores float32


def test_tensorboard_extras_are_skipped_silently_without_tensorboard(tmp_path: Path) -> None:
    csv = csv_logger(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(monitors(), logger=csv, max_steps=5)
        trainer.fit(TanhRegressor(), loader(regression_data(n=32), batch_size=8))
    ours = [w for w in caught if "lightning_curvature" in w.filename]
    assert ours == []
    assert list(tmp_path.rglob("events.out.tfevents*")) == []
    assert steps(read_csv(csv)["curvature/density_max"]) == [4, 5]


def _user_rows(tmp_path: Path, with_monitors: bool, probe: str) -> list[tuple[int, float]]:
    pl.seed_everything(0, verbose=False)
    logger = csv_logger(tmp_path)
    callbacks: list[Any] = []
    if with_monitors:
        callbacks = [
            HessianEigenvalueMonitor(every_n_steps=1, probe=probe, on_train_end=True),  # type: ignore[arg-type]
            HessianTraceMonitor(num_hvps=4, every_n_steps=1, probe=probe),  # type: ignore[arg-type]
        ]
    trainer = make_trainer(callbacks, logger=logger, max_steps=8, log_every_n_steps=1)
    trainer.fit(BNDropoutClassifier(), loader(classification_data(n=64), batch_size=8))
    return read_csv(logger)["train_loss"]


@pytest.mark.parametrize("probe", ["fixed", "current"])
def test_training_steps_own_logged_values_are_not_duplicated_by_probes(
    tmp_path: Path, probe: str
) -> None:
    """Probes call training_step (which calls self.log) once per HVP operator; none of it shows."""
    without = _user_rows(tmp_path / "without", with_monitors=False, probe=probe)
    with_monitors = _user_rows(tmp_path / "with", with_monitors=True, probe=probe)
    assert steps(without) == list(range(8))  # one row per step
    assert with_monitors == without  # same rows, same values
