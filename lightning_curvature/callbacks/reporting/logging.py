"""The one logging path of every callback: scalars to every logger at an exact step.

``pl_module.log`` from a callback with its own cadence lands on the wrong steps whenever
``log_every_n_steps`` does not divide it, so callbacks write with
``logger.log_metrics(metrics, step=trainer.global_step)`` for each of ``trainer.loggers``,
on rank zero only. TensorBoard-only extras (custom-scalars layout, histograms, images) go
through :func:`tensorboard_writers`, which yields nothing for other loggers. A monitor with a
``name`` writes its tags under ``<group>/<name>/…`` (:func:`named_tag`), so two monitors of
one kind (say a training and a held-out probe) never write the same tag.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["check_name", "log_scalars", "named_tag", "tensorboard_writers"]

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_name(name: str | None) -> None:
    """Refuse a monitor ``name`` that is not one tag component (letters, digits, ``_.-``).

    Example:
        >>> check_name("heldout")
        >>> check_name("held/out")
        Traceback (most recent call last):
        ...
        lightning.fabric.utilities.exceptions.MisconfigurationException: `name` must be ...
    """
    if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise MisconfigurationException(
            "`name` must be None or a non-empty string of letters, digits, '_', '.' and '-' "
            f"(it becomes one component of every tag), got {name!r}."
        )


def named_tag(tag: str, name: str | None) -> str:
    """``tag`` as a monitor called ``name`` writes it: ``<group>/<name>/<rest>``.

    The group (``curvature``, ``gradient``, …) stays first, so TensorBoard keeps a named
    monitor's charts next to the unnamed one's.

    Example:
        >>> named_tag("curvature/eigenvalue_1", "heldout")
        'curvature/heldout/eigenvalue_1'
        >>> named_tag("curvature/eigenvalue_1", None)
        'curvature/eigenvalue_1'
    """
    if name is None:
        return tag
    group, _, rest = tag.partition("/")
    return f"{group}/{name}/{rest}"


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

    Lightning's TensorBoard logger is Fabric's with more: both count, so a Fabric loop's
    ``lightning.fabric.loggers.TensorBoardLogger`` gets the same extras as a Trainer's.

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
