"""The run behind ``tests/data/monitors_8e73fee.ckpt``: every periodic monitor on a small
regression, checkpointed every 5 steps. Imports only public names, so the same file runs at
the commit that wrote the checkpoint and today."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from models import TanhRegressor, csv_logger, loader, make_trainer, read_csv, regression_data

from lightning_curvature import (
    BatchSharpnessMonitor,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

STEPS = 10


def monitors() -> list[pl.Callback]:
    return [
        HessianEigenvalueMonitor(k=2, tol=1e-4, every_n_steps=1, per_layer=["net.2.*"]),
        HessianTraceMonitor(num_hvps=6, every_n_steps=2),
        SpectralDensityMonitor(num_steps=6, every_n_steps=3, on_train_end=True),
        GradientCoherenceMonitor(every_n_steps=2, micro_batch_size=2),
        BatchSharpnessMonitor(every_n_steps=2, num_batches=2),
    ]


def fit(tmp_path: Path, name: str, ckpt_path: Path | None = None) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    logger = csv_logger(tmp_path, name)
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / name / "checkpoints", every_n_train_steps=5, save_top_k=-1
    )
    trainer = make_trainer(
        [*monitors(), checkpoints], logger=logger, max_steps=STEPS, enable_checkpointing=True
    )
    trainer.fit(TanhRegressor(), loader(regression_data(n=40), batch_size=8), ckpt_path=ckpt_path)
    values = {
        tag: series
        for tag, series in read_csv(logger).items()
        if tag.startswith(("curvature/", "gradient/")) and not tag.endswith("seconds")
    }
    return {"values": values, "dir": tmp_path / name / "checkpoints"}
