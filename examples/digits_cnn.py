"""A run as a user writes one, with every monitor at its defaults: a CNN on the digits.

A 38k-parameter CNN (two convolutions with BatchNorm, dropout before the head) learns
scikit-learn's bundled 8x8 digits (no download) with AdamW, a linear warmup and a cosine
decay, in ``bf16-mixed`` precision, accumulating two batches per optimizer step, validated
every epoch, with ``ModelCheckpoint`` and ``EarlyStopping``, for about 500 optimizer steps.
The five monitors (eigenvalues, trace, spectral density, gradient coherence, batch
sharpness) run at their defaults: ``every_n_steps="auto"`` fits their cadence to the run
Lightning expects within 5 % of its time. Each probe prints a line; the end of ``fit``
prints a table per monitor:

    python examples/digits_cnn.py
    python -m lightning_curvature.plot lightning_logs/digits_cnn -o digits_cnn.pdf
    python -m tensorboard.main --logdir lightning_logs

This run is too short for the budget: a training step takes about 7 ms on a CPU core and an
eigenvalue probe about 17 steps' time, so 5 % of 506 steps (shared by five monitors) affords
almost no probe, and the monitors say so. ``--every-n-steps 25`` gives readable charts (about
20 points each) at several times the run's cost; ``--max-overhead`` sets another budget.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import standardized_digits, tensorboard_hint

from lightning_curvature import (
    BatchSharpnessMonitor,
    CurvatureMonitor,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
    read_run,
)

TRAIN_EXAMPLES = 1437  # of 1797; the other 360 validate
BATCH_SIZE = 32
ACCUMULATE = 2
#: 45 batches an epoch, so 23 optimizer steps (the last one accumulates a single batch).
STEPS_PER_EPOCH = math.ceil(math.ceil(TRAIN_EXAMPLES / BATCH_SIZE) / ACCUMULATE)


def cnn() -> nn.Sequential:
    """``1x8x8 -> 16 -> 32 channels -> 4x4 pool -> 64 -> 10``: 38,378 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 10),
    )


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """The learning rate's factor at ``step``: linear from ``1/warmup`` to 1, then cosine.

    Example:
        >>> [round(warmup_cosine(s, 4, 12), 3) for s in (0, 3, 4, 8, 12)]
        [0.25, 1.0, 1.0, 0.55, 0.1]
    """
    if step < warmup:
        return (step + 1) / warmup  # never 0: a zero learning rate has no stability threshold
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class DigitsCNN(pl.LightningModule):
    """The CNN on the cross-entropy loss, AdamW with warmup and cosine decay, validated."""

    def __init__(self, lr: float = 3e-3, warmup: int = 50, total_steps: int = 500) -> None:
        super().__init__()
        self.lr, self.warmup, self.total_steps = lr, warmup, total_steps
        self.net = cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, 1, 8, 8))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/accuracy", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup, self.total_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def digits_loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Training (shuffled) and validation loaders of the standardised digits."""
    x, y = standardized_digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = order[:TRAIN_EXAMPLES], order[TRAIN_EXAMPLES:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=BATCH_SIZE, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=128),
    )


def monitors(**cadence: Any) -> list[CurvatureMonitor]:
    """The five monitors, every one at its defaults (but for ``cadence``, if given)."""
    return [
        HessianEigenvalueMonitor(**cadence),
        HessianTraceMonitor(**cadence),
        SpectralDensityMonitor(**cadence),
        GradientCoherenceMonitor(**cadence),
        BatchSharpnessMonitor(**cadence),
    ]


def make_trainer(
    epochs: int,
    log_dir: str | None,
    callbacks: Sequence[pl.Callback],
    name: str = "digits_cnn",
    **overrides: Any,
) -> pl.Trainer:
    """The Trainer of the run: bf16-mixed, accumulation 2, checkpoints and early stopping.

    ``log_dir=None`` logs nowhere and checkpoints nothing (a run only to be timed).
    """
    logged = log_dir is not None
    extra: list[pl.Callback] = [EarlyStopping("val/loss", patience=10)]
    if logged:
        extra.append(ModelCheckpoint(monitor="val/loss"))
    arguments: dict[str, Any] = {
        "max_epochs": epochs,
        "precision": "bf16-mixed",
        "accumulate_grad_batches": ACCUMULATE,
        "callbacks": [*callbacks, *extra],
        "logger": TensorBoardLogger(log_dir, name=name) if logged else False,
        "enable_checkpointing": logged,
        "log_every_n_steps": 10,  # (under 45 batches an epoch: no Lightning warning)
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **overrides,
    }
    return pl.Trainer(**arguments)


#: The charts the conclusion counts the points of, and their tags.
CHARTS = {
    "sharpness ratio": "curvature/sharpness_ratio",
    "stability threshold": "curvature/stability_threshold",
    "batch sharpness": "curvature/batch_sharpness",
    "trace": "curvature/trace",
    "coherence": "gradient/coherence",
    "density": "curvature/density_max",
}


def conclude(log_dir: str, monitors: Sequence[CurvatureMonitor], fit_seconds: float) -> None:
    """What the run showed, read back from its event files, and what the probes cost."""
    scalars = read_run(log_dir).scalars
    probes = sum(m.report.history.probes for m in monitors)
    seconds = sum(m.report.history.seconds for m in monitors)
    points = ", ".join(f"{chart} {len(scalars.get(tag, ()))}" for chart, tag in CHARTS.items())
    print(
        f"CONCLUSION: {probes} probes took {seconds:.1f} s, {100 * seconds / fit_seconds:.1f}% "
        f"of the fit's {fit_seconds:.1f} s; points per chart: {points}."
    )
    ratio, threshold = (
        scalars.get(CHARTS["sharpness ratio"]),
        scalars.get(CHARTS["stability threshold"]),
    )
    if ratio and threshold:
        print(
            f"The sharpness ratio λ₁(P⁻¹H) / (38/lr) went from {ratio.values[0]:.3g} to "
            f"{ratio.last:.3g} (max {max(ratio.values):.3g}) while the threshold 38/lr went "
            f"from {threshold.values[0]:.3g} to {min(threshold.values):.3g} and back to "
            f"{threshold.last:.3g} with the learning-rate schedule."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=22, help="23 optimizer steps each")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--every-n-steps", type=int, help="default: 'auto' (the budget)")
    parser.add_argument("--max-overhead", type=float, help="default: 5%% (with 'auto')")
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--name", default="digits_cnn", help="the run's folder in --log-dir")
    args = parser.parse_args()

    pl.seed_everything(0)
    train, val = digits_loaders()
    cadence: dict[str, Any] = {}
    if args.every_n_steps is not None:
        cadence["every_n_steps"] = args.every_n_steps
    if args.max_overhead is not None:
        cadence["max_overhead"] = args.max_overhead
    chosen = monitors(**cadence)
    trainer = make_trainer(args.epochs, args.log_dir, chosen, name=args.name)
    model = DigitsCNN(args.lr, total_steps=args.epochs * STEPS_PER_EPOCH)
    started = time.perf_counter()
    trainer.fit(model, train, val)
    assert trainer.log_dir is not None
    conclude(trainer.log_dir, chosen, time.perf_counter() - started)
    print(f"TensorBoard logs in {trainer.log_dir}: {tensorboard_hint(trainer.log_dir)}")


if __name__ == "__main__":
    main()
