"""The digits CNN of ``examples/digits_cnn.py`` trains bit for bit the same with the monitors.

The run as users write one (bf16-mixed, accumulation 2, AdamW with warmup and cosine decay,
BatchNorm, dropout, validation, ModelCheckpoint, EarlyStopping), shortened to 12 optimizer
steps over three validated epochs, with the five monitors probing every third step (their
defaults would not probe so short a run: the budget allows none) and without them.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from models import LIGHTNING_NOISE, assert_identical

from lightning_curvature import (
    BatchSharpnessMonitor,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from digits_cnn import DigitsCNN, digits_loaders, make_trainer

pytestmark = [*LIGHTNING_NOISE, pytest.mark.slow]

EPOCHS, BATCHES = 3, 8  # 4 optimizer steps an epoch
STEPS = EPOCHS * BATCHES // 2


def monitors() -> list[pl.Callback]:
    """The example's five monitors, at every third step."""
    every = {"every_n_steps": 3}
    return [
        HessianEigenvalueMonitor(**every),
        HessianTraceMonitor(num_hvps=8, **every),
        SpectralDensityMonitor(num_steps=10, **every),
        GradientCoherenceMonitor(**every),
        BatchSharpnessMonitor(num_batches=2, **every),
    ]


def train(tmp_path: Path, callbacks: list[pl.Callback]) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    train_data, val_data = digits_loaders()
    trainer = make_trainer(
        EPOCHS, str(tmp_path), callbacks, limit_train_batches=BATCHES, limit_val_batches=2
    )
    model = DigitsCNN(total_steps=STEPS, warmup=4)
    trainer.fit(model, train_data, val_data)
    assert trainer.global_step == STEPS
    checkpoint = trainer.checkpoint_callback
    assert checkpoint is not None
    saved = torch.load(checkpoint.best_model_path, weights_only=False)
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "checkpoint": {"state_dict": saved["state_dict"], "epoch": saved["epoch"]},
        "validation": {k: v.clone() for k, v in trainer.callback_metrics.items()},
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def test_the_example_trains_bit_identically_with_and_without_the_monitors(
    tmp_path: Path,
) -> None:
    without = train(tmp_path / "without", [])
    chosen = monitors()
    with_monitors = train(tmp_path / "with", chosen)
    for key in ("state", "grads", "optimizer", "scheduler", "checkpoint", "validation"):
        assert_identical(with_monitors[key], without[key], key)
    assert torch.equal(with_monitors["torch_rng"], without["torch_rng"])
    assert np.array_equal(with_monitors["numpy_rng"], without["numpy_rng"])
    assert with_monitors["python_rng"] == without["python_rng"]
    # ... and every monitor measured (steps 0, 3, 6, 9), so the comparison means something
    for monitor in chosen:
        assert monitor.report.history.probes == 4, type(monitor).__name__
    eigen = chosen[0].report.history.series
    assert [s for s, _ in eigen["curvature/sharpness_ratio"]] == [3, 6, 9]  # Adam: not at 0
    assert [s for s, _ in eigen["curvature/stability_threshold"]] == [0, 3, 6, 9]
