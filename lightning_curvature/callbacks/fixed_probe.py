"""The fixed probe: batches drawn once, and drawn again where ``training_step`` skips them.

``probe="fixed"`` (every monitor's default) measures the same ``probe_batches`` batches all
run long, so that values are comparable over time: drawn at ``on_train_start`` from
``probe_dataloader`` or the training dataloader under the monitor's seed, touching no RNG
(:func:`~lightning_curvature.callbacks.probe_data.draw_batches`), and moved to the device
through the batch-transfer hooks
(:func:`~lightning_curvature.callbacks.trainer.transfer_batches`).

A ``training_step`` may return ``None`` for a batch, Lightning's way to skip it (a batch
too short, one the user filters out). A fixed probe of such batches would be skipped at
every probe of the run, so after a probe skipped for that reason :class:`FixedProbe` draws
the next ``probe_batches`` batches of the same seeded order, and the following probes
measure those: comparable from then on. It draws at most :attr:`FixedProbe.MAX_DRAWS`
times (a ``training_step`` that returns ``None`` for every batch, e.g. during a warm-up, is
not chased through the dataset), then keeps the last draw. Each process draws its own
batches with no collective (the skip itself is agreed across processes by its non-finite
loss). How many draws came first is checkpoint state, so a resumed run probes the batches
the interrupted run was probing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_curvature.callbacks.probe_data import draw_batches
from lightning_curvature.callbacks.trainer import transfer_batches

__all__ = ["FixedProbe"]


class FixedProbe:
    """The batches a ``probe="fixed"`` monitor measures, on the trainer's device.

    Args:
        count: batches per draw (``probe_batches``).
        seed: the seed of the draws.
        dataloader: where they come from (``None``: the training dataloader).
        owner: the monitor's class name, for messages.

    Attributes:
        batches: the batches in use (``None`` before :meth:`draw`).
        draws: how many draws came before the one in use (checkpoint state).

    Example:
        >>> probe = FixedProbe(count=2, seed=0, dataloader=None, owner="Monitor")
        >>> probe.batches, probe.draws, FixedProbe.MAX_DRAWS
        (None, 0, 8)
    """

    #: The most draws of one run, the first included.
    MAX_DRAWS = 8

    def __init__(self, count: int, seed: int, dataloader: Iterable[Any] | None, owner: str) -> None:
        self.count, self.seed, self.dataloader, self.owner = count, seed, dataloader, owner
        self.batches: list[Any] | None = None
        self.draws = 0

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the batches in use: the ``count`` after ``draws × count`` of the seeded order.

        Raises:
            MisconfigurationException: if there is no dataloader to draw from.
            ValueError: if the dataloader yields no batch after those.
        """
        source = self.dataloader if self.dataloader is not None else trainer.train_dataloader
        if source is None:
            raise MisconfigurationException(
                f"`{self.owner}` found no training dataloader to probe."
            )
        cpu, skip = torch.device("cpu"), self.draws * self.count
        drawn = draw_batches(source, self.count, cpu, self.seed, skip=skip)
        self.batches = transfer_batches(trainer, pl_module, drawn, self.seed)

    def redraw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        """Draw the next batches for the next probes (``training_step`` skipped these).

        Returns:
            ``None``, or why no other batch was drawn (for one warning).
        """
        if self.draws + 1 < self.MAX_DRAWS:
            self.draws += 1
            try:
                self.draw(trainer, pl_module)
                return None
            except ValueError:  # the dataloader has no batch left after these
                self.draws -= 1
        return (
            f"training_step returned None for each of the {self.draws + 1} fixed probes drawn "
            f"({self.count} batch(es) each); the last is kept, and probes are skipped while "
            "training_step returns None for it."
        )
