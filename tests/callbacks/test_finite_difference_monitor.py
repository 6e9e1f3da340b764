"""The eigenvalue monitor with ``backend="finite_difference"`` logs what double backward does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from models import (
    LIGHTNING_NOISE,
    TanhRegressor,
    csv_logger,
    loader,
    make_trainer,
    read_csv,
    regression_data,
)

from lightning_curvature import CurvatureWarning, HessianEigenvalueMonitor

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


class _FunctionalRelu(TanhRegressor):
    """A ReLU no module check sees (``F.relu`` in the forward): kinks for a finite difference."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        hidden = F.relu(self.net[0](x))
        return F.mse_loss(self.net[2](hidden).squeeze(-1), y)


def _fit_relu(tmp_path: Path, callbacks: list[pl.Callback]) -> list[torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    model = _FunctionalRelu()
    trainer = make_trainer(callbacks, logger=csv_logger(tmp_path), max_steps=4)
    trainer.fit(model, loader(regression_data(n=64), batch_size=16))
    return [p.detach().clone() for p in model.parameters()]


def test_kinks_found_at_a_probe_skip_it_with_one_warning(tmp_path: Path) -> None:
    """Training goes on, unchanged, and one warning names the op (not one per probe)."""
    monitor = HessianEigenvalueMonitor(backend="finite_difference", every_n_steps=1)
    with pytest.warns(CurvatureWarning, match=r"ReluBackward0") as caught:
        weights = _fit_relu(tmp_path / "with", [monitor])
    kinked = [w for w in caught if "ReluBackward0" in str(w.message)]
    assert len(kinked) == 1
    assert all(
        torch.equal(a, b) for a, b in zip(weights, _fit_relu(tmp_path / "without", []), strict=True)
    )
