"""The one logging path of every callback: scalars to every logger at an exact step.

``pl_module.log`` from a callback with its own cadence lands on the wrong steps whenever
``log_every_n_steps`` does not divide it, so callbacks write with
``logger.log_metrics(metrics, step=trainer.global_step)`` for each of ``trainer.loggers``,
on rank zero only. TensorBoard-only extras (custom-scalars layout, histograms, images) go
through :func:`tensorboard_writers`, which yields nothing for other loggers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = ["log_scalars", "tensorboard_writers"]


def _as_float(value: float | torch.Tensor) -> float:
    return float(value.detach().cpu()) if isinstance(value, torch.Tensor) else float(value)


def log_scalars(
    trainer: pl.Trainer, metrics: Mapping[str, float | torch.Tensor], step: int
) -> None:
    """Write ``metrics`` to every logger of ``trainer`` at ``step`` (rank zero only).

    Example:
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False)
        >>> log_scalars(trainer, {"curvature/eigenvalue_1": 1.5}, step=0)  # no logger: no-op
    """
    if trainer.global_rank != 0 or not metrics:
        return
    values = {name: _as_float(value) for name, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def tensorboard_writers(trainer: pl.Trainer) -> Iterator[Any]:
    """The ``SummaryWriter`` of each TensorBoard logger of ``trainer`` (rank zero only).

    Example:
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False)
        >>> list(tensorboard_writers(trainer))
        []
    """
    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            yield logger.experiment
