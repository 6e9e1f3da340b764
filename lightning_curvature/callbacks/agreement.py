"""The Trainer's processes agreeing on every probe: Lightning's side of the agreement.

Every monitor's probe (``CurvatureMonitor.record_measurement``) and every SAM step's
second pass run inside :func:`agreed_probe`, and every collective they
make goes through :func:`process_sum` or :func:`process_mean` (or, over FSDP2 shards, the
agreed sums of :mod:`~lightning_curvature.functional.linalg.sharded`): an exception on any
rank, an out-of-memory error included, then ends the probe on every rank at the same
collective, and each rank raises the same
:class:`~lightning_curvature.errors.ProbeFailure`, naming the ranks that failed and what they
raised. The mechanism and its cost are in
:mod:`~lightning_curvature.functional.distributed.agreement`.

A failed probe must leave every rank's callback as it was before it (:func:`undoing`): a
process that failed stopped early, its peers went on to their next collective, and a monitor
whose random generator or warm start then differs between ranks would run Lanczos for a
different number of steps at its next probe, and its collectives would no longer meet.

The sums call ``torch.distributed.all_reduce`` on the default group (the group Lightning's
DDP and ``ModelParallelStrategy`` reduce over) rather than ``strategy.reduce``, which adds a
barrier before each all-reduce: the agreement's status collective takes the barrier's place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import torch

from lightning_curvature.callbacks.trainer import reduce
from lightning_curvature.functional.distributed.agreement import (
    Agreement,
    InPlaceSum,
    agreed,
    describe_error,
)

__all__ = ["agreed_probe", "agreement_of", "process_mean", "process_sum", "undoing"]


def _world_sum(trainer: pl.Trainer) -> InPlaceSum:
    """The in-place sum over the Trainer's processes (a Trainer's or Fabric's)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return lambda tensor: dist.all_reduce(tensor)
    return lambda tensor: tensor.copy_(reduce(trainer, tensor, "sum"))


def agreement_of(trainer: pl.Trainer) -> Agreement:
    """An agreement over the Trainer's processes (one process: nothing to agree with).

    Example:
        >>> agreement_of(pl.Trainer(logger=False)).world_size
        1
    """
    if trainer.world_size <= 1:
        return Agreement()
    return Agreement(
        _world_sum(trainer),
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        device=trainer.strategy.root_device,
    )


def process_sum(trainer: pl.Trainer) -> Callable[[torch.Tensor], torch.Tensor]:
    """The agreed sum of a tensor over the Trainer's processes (on one process, itself).

    Example:
        >>> process_sum(pl.Trainer(logger=False))(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    if trainer.world_size <= 1:
        return lambda tensor: tensor
    return agreed(_world_sum(trainer))


def process_mean(trainer: pl.Trainer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The agreed mean of a tensor over the Trainer's processes (``None`` on one process).

    Example:
        >>> process_mean(pl.Trainer(logger=False)) is None
        True
    """
    if trainer.world_size <= 1:
        return None
    total, processes = process_sum(trainer), trainer.world_size
    return lambda tensor: total(tensor).div_(processes)


@contextlib.contextmanager
def agreed_probe(trainer: pl.Trainer, reasons: list[str] | None = None) -> Iterator[None]:
    """Run a probe on every process, skipped by all if it fails on any.

    Args:
        trainer: the trainer, whose processes run the probe.
        reasons: what ``training_step`` ran into during the probe
            (:func:`~lightning_curvature.callbacks.isolation.recording_skip_reasons`): a rank
            that has some names them instead of the error they led to.

    Raises:
        ProbeFailure: on every process, if the block raised an ``Exception`` on any.

    Example:
        >>> from lightning_curvature.errors import ProbeFailure
        >>> try:
        ...     with agreed_probe(pl.Trainer(logger=False)):
        ...         raise ValueError("the loss is not a scalar")
        ... except ProbeFailure as failure:
        ...     print(failure)
        ValueError: the loss is not a scalar
    """

    def describe(error: Exception) -> str:
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
        return describe_error(error)

    with agreement_of(trainer).probe(describe):
        yield


def undoing(callback: object) -> Callable[[], None]:
    """What puts ``callback``'s attributes back as they are now (after a failed probe).

    Every attribute is rebound to its present value, dicts, lists and sets copied one level
    deep (a warm start stored by key), and every ``torch.Generator`` among them gets its
    present state back: what a probe changes in the monitor that runs it.

    Example:
        >>> class Monitor:
        ...     def __init__(self):
        ...         self.warm, self.generator = {}, torch.Generator().manual_seed(0)
        >>> monitor = Monitor()
        >>> undo = undoing(monitor)
        >>> monitor.warm["full"], first = torch.ones(2), torch.rand(1, generator=monitor.generator)
        >>> undo()
        >>> monitor.warm, torch.equal(first, torch.rand(1, generator=monitor.generator))
        ({}, True)
    """
    saved = {name: _shallow_copy(value) for name, value in vars(callback).items()}
    generators = [
        (value, value.get_state()) for value in saved.values() if isinstance(value, torch.Generator)
    ]

    def undo() -> None:
        vars(callback).clear()
        vars(callback).update({name: _shallow_copy(value) for name, value in saved.items()})
        for generator, state in generators:
            generator.set_state(state)

    return undo


def _shallow_copy(value: object) -> object:
    return type(value)(value) if type(value) in (dict, list, set) else value  # type: ignore[call-arg]
