"""The micro-batches of one SAM step as they pass, and the random state each pass starts from.

SAM's second pass evaluates ``training_step`` again on every micro-batch whose gradient is
in ``.grad`` at the optimizer step: with gradient accumulation, all micro-batches since
Lightning last zeroed the gradients. :class:`StepWindow` keeps them (as ``training_step``
received them, already on the device), their first-pass losses for ``sam/sharpness``, and,
with ``dropout="reuse"``, the global random state each first pass starts from: captured
after the module's own ``on_train_batch_start`` (which may draw random numbers, and runs
after every callback's) and, for the step's last micro-batch, again when Lightning's closure
is called, so the second pass replays exactly the first pass's draws.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_curvature.functional.gradients.rng import RNGState

__all__ = ["MicroBatch", "StepWindow", "loss_of"]


@dataclass(frozen=True)
class MicroBatch:
    """A micro-batch of a SAM step.

    Attributes:
        batch: the batch, already on the device.
        batch_idx: its index, as ``training_step`` receives it.
        rng: the global RNG states its first pass started from (``dropout="reuse"``), else
            ``None``.
    """

    batch: Any
    batch_idx: int
    rng: RNGState | None


def loss_of(output: Any) -> torch.Tensor | None:
    """The loss Lightning takes from a ``training_step`` output (tensor, dict or None).

    Example:
        >>> loss_of({"loss": torch.tensor(2.0), "logits": None}), loss_of(None)
        (tensor(2.), None)
    """
    if isinstance(output, Mapping):
        output = output.get("loss")
    return output if isinstance(output, torch.Tensor) else None


class StepWindow:
    """The micro-batches of the SAM step being accumulated (none on steps without SAM).

    Example:
        >>> window = StepWindow()
        >>> batch = torch.ones(2)
        >>> window.start(step=0, batch=batch, batch_idx=0, accumulate=1, due=True)
        >>> window.capture(batch, step=0, device=torch.device("cpu"))
        >>> window.holds(0), window.batches[0].rng is not None
        (True, True)
    """

    def __init__(self) -> None:
        self.step = -1
        self.batches: list[MicroBatch] = []
        #: the first-pass losses of the micro-batches that did not end the step
        self.first_losses: list[torch.Tensor] = []

    def start(self, step: int, batch: Any, batch_idx: int, accumulate: int, due: bool) -> None:
        """A micro-batch arrives (``on_train_batch_start``); ``due``: its step is a SAM step.

        A new window starts wherever Lightning zeroes the gradients (the first micro-batch
        of a step), so the second pass covers exactly the micro-batches in ``.grad``.
        """
        if step != self.step or batch_idx % accumulate == 0:
            self.clear(step)
        if due:
            self.batches.append(MicroBatch(batch, batch_idx, None))

    def capture(self, batch: Any, step: int, device: torch.device) -> None:
        """The random state the first pass of ``batch`` (the latest micro-batch) starts from."""
        if self.holds(step) and self.batches[-1].batch is batch:
            rng = RNGState.capture(device)
            self.batches[-1] = dataclasses.replace(self.batches[-1], rng=rng)

    def end(self, step: int, outputs: Any) -> None:
        """A micro-batch is done (``on_train_batch_end``, at ``step`` after it)."""
        if step != self.step:  # the optimizer stepped: free its batches
            self.clear(self.step)
        elif self.batches:
            # A micro-batch that did not end the step: keep its loss (divided by the number of
            # micro-batches, as Lightning reports it) for ``sam/sharpness``.
            loss = loss_of(outputs)
            if loss is not None:
                self.first_losses.append(loss.detach())

    def holds(self, step: int) -> bool:
        """Whether the window holds micro-batches of ``step`` (a SAM step)."""
        return bool(self.batches) and self.step == step

    def clear(self, step: int = -1) -> None:
        """Empty, for ``step``."""
        self.step, self.batches, self.first_losses = step, [], []
