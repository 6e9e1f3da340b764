"""The eigenvalue monitor with ``backend="finite_difference"`` logs what double backward does."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from models import (
    LIGHTNING_NOISE,
    TanhRegressor,
    csv_logger,
    loader,
    make_trainer,
    read_csv,
    regression_data,
)

from lightning_curvature import HessianEigenvalueMonitor

pytestmark = LIGHTNING_NOISE


def _logged_top(tmp_path: Path, backend: str) -> list[tuple[int, float]]:
    pl.seed_everything(0, verbose=False)
    monitor = HessianEigenvalueMonitor(backend=backend, every_n_steps=2)  # type: ignore[arg-type]
    logger = csv_logger(tmp_path, name=backend)
    trainer = make_trainer([monitor], logger=logger, max_steps=4)
    trainer.fit(TanhRegressor(lr=0.05), loader(regression_data(n=64), batch_size=16))
    return read_csv(logger)["curvature/eigenvalue_1"]


def test_finite_difference_monitor_matches_double_backward(tmp_path: Path) -> None:
    exact = _logged_top(tmp_path, "double_backward")
    finite = _logged_top(tmp_path, "finite_difference")
    assert [step for step, _ in finite] == [step for step, _ in exact] == [0, 2]
    for (_, fd), (_, db) in zip(finite, exact, strict=True):
        assert fd == pytest.approx(db, rel=1e-3)
