"""What the callbacks read from Lightning: the log step, the strategy, the batch transfer.

Every callback of the project asks the Trainer the same few things, here: the step
``self.log`` writes at (:func:`log_step`), how its strategy shards parameters
(:func:`sharding`) and whether a callback can measure under it (:func:`check_strategy`,
:func:`check_sharded_probe`), the mean or sum of a tensor over its processes
(:func:`reduce`), whether the Trainer and the module fit a probe at all (:func:`check_fit`),
how a batch reaches the device (:func:`transfer_batches`), which callbacks of a kind it holds
(:func:`callbacks_of`), the clock of the probe budget they share (:func:`shared_timing`)
and the length of the run that budget is planned over (:func:`run_steps`).

Besides these, a probe reads only public facts of the Trainer: ``global_step``,
``current_epoch``, ``world_size``, ``global_rank``, ``is_global_zero``, ``loggers``,
``optimizers``, ``callbacks``, ``train_dataloader`` and
``strategy.broadcast``/``batch_to_device`` (``estimated_stepping_batches`` where there is
one: the budget's run length, :func:`run_steps`). That short
list is what :class:`~lightning_curvature.callbacks.fabric.FabricMonitors` presents to run the
same monitors in a Lightning Fabric loop, so the functions here take a Fabric strategy as
well as a Trainer's (the two strategy families share no base class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

from lightning_curvature.callbacks.isolation import isolated
from lightning_curvature.callbacks.schedule import ProbeSchedule, Timing
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.probe import unwrap_model
from lightning_curvature.functional.operator.kinks import check_smooth

__all__ = [
    "Sharding",
    "callbacks_of",
    "check_fit",
    "check_sharded_probe",
    "check_strategy",
    "learning_rate",
    "log_step",
    "reduce",
    "run_steps",
    "sharding",
    "shared_timing",
    "transfer_batches",
]

#: How a strategy shards parameters: ``"fsdp2"`` (``ModelParallelStrategy``, ``fully_shard``),
#: ``"flat"`` (FSDP1's or DeepSpeed's flat parameters) or ``None`` (every process holds them).
Sharding = Literal["fsdp2", "flat"] | None

_C = TypeVar("_C", bound=Callback)


def log_step(trainer: pl.Trainer) -> int:
    """The step ``self.log`` writes at now: optimizer steps of the loop, once per batch.

    Equal to ``trainer.global_step`` under automatic optimization; with manual optimization
    and several optimizers ``global_step`` counts every optimizer's steps, while loggers and
    ``self.log`` (and Lightning's own ``LearningRateMonitor``) count batches that stepped.

    Example:
        >>> log_step(pl.Trainer(logger=False, enable_progress_bar=False))
        0
    """
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(epoch_loop, "_batches_that_stepped", trainer.global_step))


def sharding(trainer: pl.Trainer) -> Sharding:
    """How the strategy of ``trainer`` (a Trainer's, or Fabric's) shards parameters.

    Example:
        >>> sharding(pl.Trainer(logger=False)) is None  # a single device
        True
    """
    from lightning.fabric import strategies as fabric
    from lightning.pytorch import strategies as trainer_strategies

    strategy = trainer.strategy
    if isinstance(
        strategy, (trainer_strategies.ModelParallelStrategy, fabric.ModelParallelStrategy)
    ):
        return "fsdp2"
    flat = (
        trainer_strategies.FSDPStrategy,
        trainer_strategies.DeepSpeedStrategy,
        fabric.FSDPStrategy,
        fabric.DeepSpeedStrategy,
    )
    return "flat" if isinstance(strategy, flat) else None


def reduce(trainer: pl.Trainer, tensor: torch.Tensor, reduce_op: Literal["mean", "sum"]) -> Any:
    """``tensor`` reduced over the processes of ``trainer`` (a Trainer's or Fabric's strategy).

    A Trainer's strategy calls it ``reduce``, Fabric's ``all_reduce``; both all-reduce in one
    collective, and return ``tensor`` as it is on one process.

    Example:
        >>> reduce(pl.Trainer(logger=False), torch.tensor(2.0), "mean")
        tensor(2.)
    """
    from lightning.fabric.strategies import Strategy as FabricStrategy

    strategy = trainer.strategy
    if isinstance(strategy, FabricStrategy):
        return strategy.all_reduce(tensor, reduce_op=reduce_op)
    return strategy.reduce(tensor, reduce_op=reduce_op)


def learning_rate(trainer: pl.Trainer) -> float | None:
    """The first optimizer's largest learning rate now (``None``: no optimizer, or 0).

    Example:
        >>> learning_rate(pl.Trainer(logger=False, enable_progress_bar=False)) is None
        True
    """
    if not trainer.optimizers:
        return None
    lr = max(float(group["lr"]) for group in trainer.optimizers[0].param_groups)
    return lr if lr > 0 else None


def check_strategy(trainer: pl.Trainer, callback: str, why: str | None = None) -> None:
    """At ``setup``: refuse a sharded strategy ``callback`` cannot run under.

    FSDP1 (``FSDPStrategy``) and DeepSpeed are always refused, naming the alternative: their
    flat-parameter sharding needs an accelerator and was not verified here. FSDP2
    (``ModelParallelStrategy`` with ``fully_shard``, verified on CPU processes) is refused
    only with a ``why`` (the reason ``callback`` cannot run on sharded parameters).

    Raises:
        MisconfigurationException: naming ``callback``, the strategy and what to use.

    Example:
        >>> check_strategy(pl.Trainer(logger=False), "SAM")  # a single device: nothing to refuse
    """
    strategy = type(trainer.strategy).__name__
    sharded = sharding(trainer)
    if sharded == "flat":
        raise MisconfigurationException(
            f"`{callback}` does not support {strategy}: its flat-parameter sharding was not "
            "verified here. Use ModelParallelStrategy() with "
            "torch.distributed.fsdp.fully_shard in `configure_model` (FSDP2), or DDP."
        )
    if why is not None and sharded == "fsdp2":
        raise MisconfigurationException(
            f"`{callback}` does not support {strategy} (sharded parameters): {why} Use DDP."
        )


def check_sharded_probe(
    trainer: pl.Trainer, pl_module: pl.LightningModule, callback: str, backend: str
) -> None:
    """At ``setup``: refuse kinked modules to finite differences, and what shards cannot do.

    Sharded parameters have no double backward, so only the finite-difference backend
    (``"auto"`` chooses it there) measures them, and only on a smooth model. Under any
    other strategy only ``backend="finite_difference"`` on a model with kinked modules is
    refused here (ReLU, hard-swish, ...: its products would not be the Hessian).

    Raises:
        MisconfigurationException: naming ``callback``, the strategy and the misfit.

    Example:
        >>> check_sharded_probe(pl.Trainer(logger=False), torch.nn.Linear(1, 1), "M", "auto")
    """
    strategy = type(trainer.strategy).__name__
    if sharding(trainer) != "fsdp2":
        if backend == "finite_difference":
            try:
                check_smooth(unwrap_model(pl_module))
            except ValueError as err:
                raise MisconfigurationException(f"`{callback}`: {err}") from None
        return
    if backend not in ("auto", "finite_difference"):
        raise MisconfigurationException(
            f"`{callback}` under {strategy}: backend={backend!r} needs a double backward, "
            "which FSDP2's sharded parameters do not have; use backend='auto' (which "
            "chooses 'finite_difference' there) or 'finite_difference'."
        )
    try:
        check_smooth(unwrap_model(pl_module))
    except ValueError as err:
        raise MisconfigurationException(f"`{callback}` under {strategy}: {err}") from None


def check_fit(
    trainer: pl.Trainer, pl_module: pl.LightningModule, callback: str, loss_fn: LossFn | None
) -> None:
    """At ``setup``: refuse a Trainer without a logger, and a module a probe cannot call.

    Without ``loss_fn`` a probe calls ``training_step``, which a manual-optimization module
    steps the optimizer in, and which cannot take a ``dataloader_iter`` on a probe batch.

    Raises:
        MisconfigurationException: naming ``callback`` and what to change.
    """
    if not trainer.loggers:
        raise MisconfigurationException(
            f"Cannot use `{callback}` with a Trainer that has no logger."
        )
    if loss_fn is None and not pl_module.automatic_optimization:
        raise MisconfigurationException(
            f"`{callback}` with manual optimization needs `loss_fn=`: calling a "
            "manual-optimization "
            "training_step would step the optimizer."
        )
    if loss_fn is None and is_param_in_hook_signature(
        pl_module.training_step, "dataloader_iter", explicit=True
    ):
        raise MisconfigurationException(
            f"`{callback}` cannot call a `training_step` that takes `dataloader_iter` on a "
            "probe batch: pass `loss_fn=`."
        )


def _before_transfer(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """``on_before_batch_transfer`` of the datamodule if it overrides it, else the module's.

    (The rest of the transfer, ``transfer_batch_to_device`` and ``on_after_batch_transfer``,
    is ``trainer.strategy.batch_to_device``.) A module that is no LightningModule (in a
    Fabric loop) has no such hook: the batch is passed on as it is.
    """
    datamodule = getattr(trainer, "datamodule", None)  # set by fit (public, not typed)
    if datamodule is not None and is_overridden(
        "on_before_batch_transfer", datamodule, pl.LightningDataModule
    ):
        return datamodule.on_before_batch_transfer(batch, 0)
    if not isinstance(pl_module, pl.LightningModule):
        return batch
    return pl_module.on_before_batch_transfer(batch, 0)


def transfer_batches(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batches: Sequence[Any], seed: int
) -> list[Any]:
    """``batches`` moved to the device through the batch-transfer hooks, as training's go.

    A probe must see what ``training_step`` sees (e.g. a dict unpacked, or normalisation on
    device); the hooks run isolated (:func:`~lightning_curvature.callbacks.isolation.isolated`,
    modes left as they are) with the torch RNG seeded with ``seed``.
    """
    with isolated(pl_module, eval_mode=False):
        torch.manual_seed(seed)
        return [
            trainer.strategy.batch_to_device(_before_transfer(trainer, pl_module, b))
            for b in batches
        ]


def callbacks_of(trainer: pl.Trainer, kind: type[_C]) -> list[_C]:
    """The callbacks of ``trainer`` that are ``kind``, in the Trainer's order.

    Example:
        >>> from lightning.pytorch.callbacks import LearningRateMonitor
        >>> trainer = pl.Trainer(callbacks=[LearningRateMonitor()], logger=False)
        >>> [type(c).__name__ for c in callbacks_of(trainer, LearningRateMonitor)]
        ['LearningRateMonitor']
    """
    return [c for c in trainer.callbacks if isinstance(c, kind)]  # type: ignore[attr-defined]


def shared_timing(trainer: pl.Trainer, now: float, schedules: Sequence[ProbeSchedule]) -> Timing:
    """The clock of the budget ``schedules`` share at time ``now`` (read by each of them).

    Their probe time together, how many keep to a share of a budget, and the Trainer's
    broadcast of rank zero's interval.
    """
    return Timing(
        now=now,
        probe_seconds=sum(schedule.probe_seconds for schedule in schedules),
        sharers=sum(schedule.budget is not None for schedule in schedules),
        broadcast=lambda interval: trainer.strategy.broadcast(interval, src=0),
    )


def run_steps(trainer: pl.Trainer) -> int | None:
    """The optimizer steps of the run Lightning expects (``None``: it cannot tell).

    ``estimated_stepping_batches``: from ``max_steps``, or ``max_epochs`` times the
    optimizer steps of an epoch (accumulation counted), the steps of a resumed run included.
    A run without either bound, or over an iterable of unknown length, has no length.

    Example:
        >>> run_steps(pl.Trainer(max_steps=528, logger=False))
        528
    """
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # no dataloader attached yet, or one that cannot say its length
        return None
    return int(steps) if math.isfinite(steps) else None
