"""Bounded checkpoint state: the monitors at their defaults add at most 5 % to a checkpoint.

The ratio of ``benchmarks/bench_checkpoint.py`` (1.0 M parameters: +0.46 % for every monitor
together) on a 0.25 M-parameter model, where the monitors' fixed few kB weigh four times
more: a checkpoint with every monitor at its defaults against one without, both saved after
the step-0 probes have left their state (warm starts included, were they stored).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from models import LIGHTNING_NOISE, csv_logger, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import (
    BatchSharpnessMonitor,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

pytestmark = LIGHTNING_NOISE

WIDTHS = (32, 512, 448, 1)  # P = 247,169: 0.99 MB of float32 weights


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(WIDTHS):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.net = nn.Sequential(*layers[:-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def checkpoint(tmp_path: Path, name: str, callbacks: list[pl.Callback]) -> Path:
    pl.seed_everything(0, verbose=False)
    x = torch.randn(256, WIDTHS[0])
    data = DataLoader(TensorDataset(x, torch.tanh(x[:, :4].sum(1))), batch_size=16)
    trainer = make_trainer(
        callbacks, logger=csv_logger(tmp_path, name), max_steps=2, accumulate_grad_batches=2
    )
    trainer.fit(Regressor(), data)
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


# A fixed cadence: on this 2-step run the default budget ("auto") would afford no probe, and
# the checkpoint must be measured after one (its warm starts exist, and are left out).
CADENCE = {"every_n_steps": 500}


def defaults() -> list[pl.Callback]:
    return [
        HessianEigenvalueMonitor(**CADENCE),
        HessianTraceMonitor(**CADENCE),
        SpectralDensityMonitor(**CADENCE),
        GradientCoherenceMonitor(**CADENCE),
        GradientCoherenceMonitor(source="accumulation", **CADENCE),
        BatchSharpnessMonitor(**CADENCE),
    ]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> int:
    return checkpoint(tmp_path_factory.mktemp("plain"), "plain", []).stat().st_size


@pytest.mark.filterwarnings("ignore::lightning_curvature.errors.CurvatureWarning")
def test_every_monitor_at_its_defaults_adds_at_most_5_percent(tmp_path: Path, plain: int) -> None:
    monitors = defaults()
    path = checkpoint(tmp_path, "monitored", monitors)
    added = path.stat().st_size - plain
    assert plain > 4 * sum(p.numel() for p in Regressor().parameters())  # the weights are in
    assert 0 < added <= 0.05 * plain, f"{added} bytes on {plain}: {added / plain:.2%}"
    states = torch.load(path, weights_only=True)["callbacks"]
    assert {monitor.state_key for monitor in monitors} <= set(states)
    eigen = states[monitors[0].state_key]
    assert "warm_start" not in eigen  # measured at step 0, kept for step 500, not stored
    assert monitors[0]._warm["full"].shape == (2, 247_169)


@pytest.mark.filterwarnings("ignore::lightning_curvature.errors.CurvatureWarning")
def test_stored_warm_starts_would_triple_it(tmp_path: Path, plain: int) -> None:
    """The control: with the warm starts stored, (k + 1) P float32 values are added."""
    path = checkpoint(
        tmp_path, "stored", [HessianEigenvalueMonitor(checkpoint_warm_start=True, **CADENCE)]
    )
    added = path.stat().st_size - plain
    assert added >= 2 * 4 * 247_169  # twice the weights
