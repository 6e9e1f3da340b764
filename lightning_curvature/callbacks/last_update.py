"""The optimizer's last update ``u = w_t − w_{t−1}``, read without stepping anything.

A probe at step ``t`` that measures along the update the optimizer just made (the eigenvalue
monitor's ``update_sharpness``, the landscape monitor's slice along the update) needs the
weights from before that step. :class:`LastUpdate` copies them (one flat vector in the probe
dtype; under FSDP2 this process's shard) in ``on_before_optimizer_step`` of a step after
which a probe is due, and only then; the probe subtracts the copy from the weights it finds.
Any optimizer, any update rule (momentum, Adam, clipping, a scheduler): what is measured is
the step actually taken. A copy pending when a checkpoint is written goes into it, so a
resumed run measures the same update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_curvature.callbacks.schedule import ProbeSchedule
from lightning_curvature.functional.linalg.sharded import local_tensor
from lightning_curvature.functional.model.functional_model import probe_dtype

__all__ = ["LastUpdate", "flat_copy", "probes_after_this_step"]


def flat_copy(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """One flat detached copy of ``tensors`` in ``dtype`` (the layout of the operator).

    Of FSDP2 (``DTensor``) parameters, this process's shards (the operator's layout there).

    Example:
        >>> flat_copy([torch.ones(2, 2), torch.zeros(1)], torch.float64)
        tensor([1., 1., 1., 1., 0.], dtype=torch.float64)
    """
    return torch.cat([local_tensor(t).detach().reshape(-1).to(dtype) for t in tensors])


def probes_after_this_step(trainer: pl.Trainer, schedule: ProbeSchedule) -> bool:
    """Whether ``schedule`` probes right after the optimizer step being taken now.

    Read in ``on_before_optimizer_step``; never ``schedule.is_due``, which may space a
    ``max_overhead`` budget.
    """
    following, epoch = trainer.global_step + 1, trainer.current_epoch
    if schedule.due_by_cadence(following):
        return True
    last = trainer.max_steps == following  # training stops after this step
    if (trainer.is_last_batch or last) and schedule.is_due_at_epoch_end(following, epoch):
        return True  # an epoch-end probe (max_steps also ends the epoch it stops in)
    return schedule.on_train_end and last


class LastUpdate:
    """The weights before a step, kept for the probe right after it; the update at that probe.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> last = LastUpdate()
        >>> last.keep(step=1, parameters=[w])  # before the optimizer step 0 -> 1
        >>> with torch.no_grad():
        ...     _ = w.add_(torch.tensor([0.5, -1.0]))
        >>> last.take(step=1, parameters=[w])
        tensor([ 0.5000, -1.0000])
        >>> last.take(step=1, parameters=[w]) is None  # taken once
        True
    """

    def __init__(self) -> None:
        # (probe step, the parameters' names, w_{t−1} over them)
        self._start: tuple[int, tuple[str, ...], torch.Tensor] | None = None

    def keep(
        self, step: int, parameters: Sequence[torch.Tensor], names: Sequence[str] = ()
    ) -> None:
        """Copy ``parameters`` (named ``names``) now, for the probe at ``step``."""
        self._start = (step, tuple(names), flat_copy(parameters, probe_dtype(parameters)))

    def keep_if_due(
        self,
        trainer: pl.Trainer,
        schedule: ProbeSchedule,
        parameters: Sequence[torch.Tensor],
        names: Sequence[str] = (),
    ) -> None:
        """In ``on_before_optimizer_step``: copy the weights if ``schedule`` probes next."""
        if probes_after_this_step(trainer, schedule):
            self.keep(trainer.global_step + 1, parameters, names)

    def take(
        self, step: int, parameters: Sequence[torch.Tensor], names: Sequence[str] = ()
    ) -> torch.Tensor | None:
        """``w_t − w_{t−1}`` at the probe of ``step``; ``None`` without a copy from the step before.

        (Step 0, a resumed run's first probe without a checkpointed copy, a probe the copy
        was not for, parameters other than those copied: a layer frozen or unfrozen since.)
        The copy is dropped either way.
        """
        start, self._start = self._start, None
        if start is None or start[0] != step:
            return None
        _, kept, before = start
        if kept and tuple(names) != kept:
            return None
        if sum(local_tensor(p).numel() for p in parameters) != before.numel():
            return None  # (a copy from an older checkpoint, without names)
        return flat_copy(parameters, before.dtype).to(before.device).sub_(before)

    def state_dict(self) -> dict[str, Any]:
        """The pending copy, if any (tensors and plain types: loads with ``weights_only``)."""
        if self._start is None:
            return {}
        step, names, weights = self._start
        return {"update_start": {"step": step, "names": list(names), "weights": weights.cpu()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a state without a copy clears it)."""
        start = state.get("update_start")
        self._start = (
            None
            if start is None
            else (int(start["step"]), tuple(start.get("names", ())), start["weights"])
        )
