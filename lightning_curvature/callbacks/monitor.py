"""What every periodic monitor shares: cadence, probe data, isolation, DDP, logging, state.

A monitor subclass implements :meth:`CurvatureMonitor.measure`, a call of the model-level API
that returns the scalars to log; this base decides when to call it, on what data and with
which loss, runs it so that nothing the user trains changes, and writes the result.

Rules kept here for every monitor (``../shared/DESIGN.md``):

* **Harmless**: the probe runs on the unwrapped LightningModule through the model-level API
  (which never writes parameters or ``.grad``), inside the one isolation context of the
  callbacks, :func:`~lightning_curvature.callbacks.isolation.isolated`: every RNG, module
  mode, module attribute, buffer and torchmetrics state restored, the whole module in eval
  mode, ``self.log`` silenced. It never touches the optimizer.
* **fp32 on the trainer's device**: autocast off, whatever the Trainer's precision.
* **Distributed**: every rank probes at the same steps on its own probe data, Hessian-vector
  products are averaged across ranks, so every rank computes the same numbers; rank zero
  writes. A non-finite loss on any rank skips the probe on all.
* **Loud on bad input, quiet on bad luck**: arguments are checked at construction, Trainer
  and model misfits at ``setup``. A probe that cannot run (a ``training_step`` returning
  ``None``, a non-finite loss or product, a backend that fails, too few samples) is skipped
  with one warning per reason, naming it and the step; non-finite values are not logged;
  training goes on.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from typing_extensions import override

from lightning_curvature.callbacks.isolation import (
    isolated,
    recording_skip_reasons,
    silenced_logging,
    training_step_loss,
)
from lightning_curvature.callbacks.measurement import Measurement, cost_tag
from lightning_curvature.callbacks.probe_data import ProbePolicy, draw_batches
from lightning_curvature.callbacks.reporting.dashboard import (
    COST_CATEGORY,
    Charts,
    exact,
    multiline,
    write_layout,
)
from lightning_curvature.callbacks.reporting.logging import check_name, log_scalars, named_tag
from lightning_curvature.callbacks.schedule import (
    EveryNSteps,
    ProbeSchedule,
    Timing,
    resolve_every_n_steps,
)
from lightning_curvature.errors import (
    CurvatureWarning,
    NonFiniteCurvatureError,
    PiecewiseLinearError,
)
from lightning_curvature.functional.linalg.sampling import make_generator
from lightning_curvature.functional.model.batches import BatchList
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.parameters import ParameterPatterns, select_parameters
from lightning_curvature.functional.model.probe import BatchNormMode, unwrap_model
from lightning_curvature.functional.operator.backends import BACKENDS, AllReduce, HVPBackend
from lightning_curvature.functional.operator.graph_checks import check_smooth

__all__ = [
    "CurvatureMonitor",
    "Measurement",
    "check_strategy",
    "log_step",
    "silenced_logging",
    "training_step_loss",
]

_PROBES = ("fixed", "current")
_BATCH_NORM = ("eval", "train")


def _before_transfer(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """``on_before_batch_transfer`` of the datamodule if it overrides it, else the module's.

    (The rest of the transfer, ``transfer_batch_to_device`` and ``on_after_batch_transfer``,
    is ``trainer.strategy.batch_to_device``.)
    """
    datamodule = getattr(trainer, "datamodule", None)  # set by fit (public, not typed)
    if datamodule is not None and is_overridden(
        "on_before_batch_transfer", datamodule, pl.LightningDataModule
    ):
        return datamodule.on_before_batch_transfer(batch, 0)
    return pl_module.on_before_batch_transfer(batch, 0)


def _check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise MisconfigurationException(f"`{name}` must be one of {allowed}, got {value!r}.")


def _check_patterns(parameters: Any) -> None:
    """``parameters`` is None, a glob pattern, or a non-empty list of them."""
    if parameters is None or isinstance(parameters, str):
        return
    if (
        not isinstance(parameters, (list, tuple))
        or not parameters
        or not all(isinstance(p, str) for p in parameters)
    ):
        raise MisconfigurationException(
            "`parameters` must be None (every trainable parameter), a glob pattern of "
            f"parameter names or a non-empty list of them, got {parameters!r}."
        )


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
    from lightning.pytorch.strategies import (
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    strategy = type(trainer.strategy).__name__
    if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise MisconfigurationException(
            f"`{callback}` does not support {strategy}: its flat-parameter sharding was not "
            "verified here. Use ModelParallelStrategy() with "
            "torch.distributed.fsdp.fully_shard in `configure_model` (FSDP2), or DDP."
        )
    if why is not None and isinstance(trainer.strategy, ModelParallelStrategy):
        raise MisconfigurationException(
            f"`{callback}` does not support {strategy} (sharded parameters): {why} Use DDP."
        )


class CurvatureMonitor(Callback):
    """Base of the periodic monitors; subclasses implement :meth:`measure`.

    Args:
        every_n_steps: probe when ``trainer.global_step`` (optimizer steps) is a multiple
            of it, step 0 included (the weights before training). ``"auto"`` (default): the
            monitor's own cadence (:attr:`default_every_n_steps`, set from its cost), or
            none when ``every_n_epochs`` or ``max_overhead`` is given; ``None``: no step
            cadence.
        every_n_epochs: probe at the end of every n-th epoch, as Lightning's callbacks do
            (a probe of the weights after that epoch's last step).
        on_train_end: also probe the final weights.
        max_overhead: instead of a fixed cadence, keep probe time under this fraction of
            training time. The interval adapts after every probe and may be as short as one
            step; an ``every_n_steps`` given with it is the shortest interval. The budget is
            shared: the N monitors of a Trainer that have one each keep to a 1/N share of
            it, so several monitors at ``max_overhead=0.05`` take 5% together.
        name: writes every tag as ``<group>/<name>/…`` (``curvature/heldout/eigenvalue_1``),
            so that two monitors of one kind (a training and a held-out probe, say) keep
            apart; ``None`` (default): the plain tags.
        probe: ``"fixed"`` (default: batches drawn once, comparable over time) or
            ``"current"`` (the batch of the probed step).
        probe_batches: number of batches in the fixed probe (averaged by size).
        probe_dataloader: where the fixed probe is drawn from (default: the training data).
        loss_fn: ``loss_fn(module, batch) -> scalar``; default: the module's
            ``training_step`` with its logging silenced (see :func:`training_step_loss`:
            ``batch_idx`` is the training batch's for ``probe="current"``, 0 for the fixed
            probe; a ``training_step(self, batch)`` gets none).
        batch_norm: ``"eval"`` (default: running statistics, the inference-time landscape)
            or ``"train"`` (batch statistics); running statistics are never changed.
        parameters: glob pattern(s) of the module's parameter names to measure.
        backend: Hessian-vector product strategy (see ``HessianOperator``).
        seed: seed of the monitor's own random generator and of the fixed probe draw.

    Example:
        A monitor of one's own gets the cadence, probe batch, isolation and logging for free:

        >>> class ProbeLoss(CurvatureMonitor):
        ...     def measure(self, trainer, pl_module, batches):
        ...         with torch.no_grad():
        ...             losses = [self.probe_loss_fn()(pl_module, b) for b in batches]
        ...         return Measurement({"probe/loss": torch.stack(losses).mean()})  # no HVPs
        >>> trainer = pl.Trainer(callbacks=[ProbeLoss(every_n_steps=10)], max_steps=1)
    """

    #: The monitor kind in its cost tags, ``probe_cost/<cost_name>_seconds|hvps``
    #: (:func:`~lightning_curvature.callbacks.measurement.cost_tag`).
    cost_name = ""
    #: Whether the cost tags include ``hvps`` (monitors that compute no HVP: no).
    counts_hvps = True
    #: Attributes, in order, of the subclass arguments (plain values) that tell two instances
    #: apart in a checkpoint's state key (see :meth:`state_key_fields`).
    state_key_arguments: tuple[str, ...] = ()
    #: The step cadence of ``every_n_steps="auto"``.
    default_every_n_steps = 100

    def __init__(
        self,
        *,
        every_n_steps: EveryNSteps = "auto",
        every_n_epochs: int | None = None,
        on_train_end: bool = False,
        max_overhead: float | None = None,
        name: str | None = None,
        probe: ProbePolicy = "fixed",
        probe_batches: int = 1,
        probe_dataloader: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        batch_norm: BatchNormMode = "eval",
        parameters: ParameterPatterns = None,
        backend: HVPBackend = "auto",
        seed: int = 0,
        **unknown: Any,
    ) -> None:
        if unknown:
            self._refuse_unknown(unknown)
        steps = resolve_every_n_steps(
            every_n_steps, self.default_every_n_steps, every_n_epochs, max_overhead
        )
        self.schedule = ProbeSchedule(steps, every_n_epochs, on_train_end, max_overhead)
        check_name(name)
        self.name = name
        _check_choice("probe", probe, _PROBES)
        _check_choice("batch_norm", batch_norm, _BATCH_NORM)
        _check_choice("backend", backend, BACKENDS)
        if (
            isinstance(probe_batches, bool)
            or not isinstance(probe_batches, int)
            or probe_batches < 1
        ):
            raise MisconfigurationException(
                f"`probe_batches` must be a positive integer, got {probe_batches!r}."
            )
        if probe == "current" and (probe_batches != 1 or probe_dataloader is not None):
            raise MisconfigurationException(
                "`probe_batches` and `probe_dataloader` apply to probe='fixed' only; "
                "got probe='current'."
            )
        if loss_fn is not None and not callable(loss_fn):
            raise MisconfigurationException(
                f"`loss_fn` must be callable as loss_fn(module, batch), got {loss_fn!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MisconfigurationException(f"`seed` must be an integer, got {seed!r}.")
        _check_patterns(parameters)
        self.probe = probe
        self.probe_batches = probe_batches
        self.probe_dataloader = probe_dataloader
        self.loss_fn = loss_fn
        self.batch_norm = batch_norm
        self.parameters = parameters
        self.backend = backend
        self.seed = seed
        self.last_metrics: dict[str, float] = {}
        self._fixed_batches: list[Any] | None = None
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self._warned: set[str] = set()
        self._pending: list[str] | None = None  # warn_once's messages during a probe
        self._batch_idx = 0  # what the probe passes as training_step's batch_idx
        self._state_key: str | None = None
        # probe="current": the batch (and its index) an epoch-end probe measures
        self._last_batch: tuple[Any, int] | None = None

    def _refuse_unknown(self, unknown: dict[str, Any]) -> None:
        """A misspelt argument names the monitor the user built and what it takes."""
        allowed: list[str] = []
        for cls in type(self).__mro__:
            if cls is Callback:
                break
            for name, param in inspect.signature(cls.__init__).parameters.items():  # type: ignore[misc]
                variadic = param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
                if name != "self" and not variadic and name not in allowed:
                    allowed.append(name)
        raise MisconfigurationException(
            f"`{type(self).__name__}` got unexpected argument(s) "
            f"{', '.join(f'`{n}`' for n in unknown)}; it takes {', '.join(allowed)}."
        )

    # -- what subclasses implement -----------------------------------------------------------
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> Measurement | None:
        """Run the measurement: the scalars to log and the HVPs used (``None``: nothing to log)."""
        raise NotImplementedError

    def log_extras(self, trainer: pl.Trainer, step: int) -> None:
        """Write logger-specific extras (histograms, images) after a successful probe."""

    def extra_state(self) -> dict[str, Any]:
        """Subclass state for the checkpoint (tensors and plain types only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Charts:
        """This monitor's custom-scalars charts (subclasses add theirs to these cost charts).

        Called once at ``on_train_start``, when the optimizer is known; see
        :mod:`~lightning_curvature.callbacks.reporting.dashboard`.
        """
        seconds = exact(self.tag(cost_tag(self.cost_name, "seconds")))
        cost = {"seconds per probe": multiline(seconds)}
        if self.counts_hvps:
            hvps = exact(self.tag(cost_tag(self.cost_name, "hvps")))
            cost["Hessian-vector products per probe"] = multiline(hvps)
        return {COST_CATEGORY: cost}

    # -- helpers for subclasses ----------------------------------------------------------------
    def tag(self, tag: str) -> str:
        """``tag`` as this monitor writes it (under its ``name``, if it has one)."""
        return named_tag(tag, self.name)

    def category(self, group: str) -> str:
        """The custom-scalars category of this monitor's charts of ``group``."""
        return group if self.name is None else f"{group} ({self.name})"

    def probe_kwargs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Arguments shared by every model-level call of a probe."""
        return {
            "parameters": self.parameters,
            "backend": self.backend,
            "batch_norm": self.batch_norm,
            "generator": self.generator(pl_module.device),
            "all_reduce": self.all_reduce(trainer),
        }

    def generator(self, device: torch.device) -> torch.Generator:
        """The monitor's own generator on ``device`` (restored from a checkpoint if any)."""
        if self._generator is None or self._generator.device.type != device.type:
            self._generator = make_generator(device, self.seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
        return self._generator

    @staticmethod
    def all_reduce(trainer: pl.Trainer) -> AllReduce | None:
        """Mean across processes under a multi-process strategy, else ``None``."""
        if trainer.world_size <= 1:
            return None
        return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="mean")

    def warn_once(self, key: str, message: str) -> None:
        """One :class:`CurvatureWarning` per kind of bad luck, on rank zero."""
        if key not in self._warned:
            self._warned.add(key)
            text = f"{type(self).__name__}: {message}"
            if self._pending is not None:  # inside a probe, whose warnings are being collected
                self._pending.append(text)
            else:
                rank_zero_warn(text, category=CurvatureWarning)

    def probe_loss_fn(self) -> LossFn:
        """The loss used by probes.

        ``loss_fn``, or :func:`training_step_loss` with the probe's ``batch_idx`` (the
        training batch's for ``probe="current"``, else 0).
        """
        if self.loss_fn is not None:
            return self.loss_fn
        return functools.partial(training_step_loss, batch_idx=self._batch_idx)  # type: ignore[return-value]

    def check_model(self, pl_module: pl.LightningModule) -> None:
        """At ``setup``: refuse arguments that do not fit the model.

        Raise a ``MisconfigurationException``, or a ``ValueError`` (raised on as one, naming
        the monitor).
        """
        self.measured_size(pl_module)

    def measured_size(self, pl_module: pl.LightningModule) -> int:
        """Number of parameters the monitor measures (``parameters=`` of the module)."""
        named = select_parameters(unwrap_model(pl_module), self.parameters)
        return sum(p.numel() for _, p in named)

    # -- Lightning hooks -------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        if not trainer.loggers:
            raise MisconfigurationException(
                f"Cannot use `{name}` with a Trainer that has no logger."
            )
        if not pl_module.automatic_optimization and self.loss_fn is None:
            raise MisconfigurationException(
                f"`{name}` with manual optimization needs `loss_fn=`: calling a "
                "manual-optimization "
                "training_step would step the optimizer."
            )
        if self.loss_fn is None and is_param_in_hook_signature(
            pl_module.training_step, "dataloader_iter", explicit=True
        ):
            raise MisconfigurationException(
                f"`{name}` cannot call a `training_step` that takes `dataloader_iter` on a "
                "probe batch: pass `loss_fn=`."
            )
        try:
            self.check_model(pl_module)
        except ValueError as err:
            raise MisconfigurationException(f"`{name}`: {err}") from None
        self.check_sharding(trainer, pl_module)
        if getattr(trainer, "fast_dev_run", False) and self is _monitors(trainer)[0]:
            rank_zero_warn(
                "fast_dev_run replaces every logger with a DummyLogger: the curvature monitors "
                "still probe (so errors show), but nothing they measure is logged. Use "
                "`max_steps=` for a short run that logs."
            )

    def check_sharding(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At ``setup``: refuse a sharded strategy this monitor cannot measure under.

        ``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in ``configure_model``) is
        supported by the monitors whose :attr:`shardable` is true, with the finite-difference
        backend (``"auto"`` chooses it) on a smooth model; FSDP1 and DeepSpeed are refused.
        """
        from lightning.pytorch.strategies import ModelParallelStrategy

        name, strategy = type(self).__name__, type(trainer.strategy).__name__
        check_strategy(trainer, name, None if self.shardable else self.unshardable_reason)
        if not isinstance(trainer.strategy, ModelParallelStrategy):
            return
        if self.backend not in ("auto", "finite_difference"):
            raise MisconfigurationException(
                f"`{name}` under {strategy}: backend={self.backend!r} needs a double backward, "
                "which FSDP2's sharded parameters do not have; use backend='auto' (which "
                "chooses 'finite_difference' there) or 'finite_difference'."
            )
        try:
            check_smooth(unwrap_model(pl_module))
        except ValueError as err:
            raise MisconfigurationException(f"`{name}` under {strategy}: {err}") from None

    #: Whether this monitor measures under ``ModelParallelStrategy`` (FSDP2 shards).
    shardable = False
    #: Why not, for the refusal at ``setup``.
    unshardable_reason = "it has not been made to work on sharded parameters."

    @property
    def fixed_probe(self) -> BatchList | None:
        """The fixed probe's batches, on the trainer's device (``None`` before training).

        What every probe of ``probe="fixed"`` measures: pass it to the model-level functions
        to recompute a logged value by hand.
        """
        return None if self._fixed_batches is None else BatchList(self._fixed_batches)

    @property
    def uses_probe_data(self) -> bool:
        """Whether this monitor measures on probe batches (else on training's own work)."""
        return True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe == "fixed" and self.uses_probe_data:
            source = (
                self.probe_dataloader
                if self.probe_dataloader is not None
                else trainer.train_dataloader
            )
            if source is None:
                raise MisconfigurationException(
                    f"`{type(self).__name__}` found no training dataloader to probe."
                )
            drawn = draw_batches(source, self.probe_batches, torch.device("cpu"), self.seed)
            # Through the batch-transfer hooks, as every training batch goes: the probe must
            # see what training_step sees (e.g. a dict unpacked, or normalisation on device).
            with isolated(pl_module, eval_mode=False):
                torch.manual_seed(self.seed)
                self._fixed_batches = [
                    trainer.strategy.batch_to_device(_before_transfer(trainer, pl_module, b))
                    for b in drawn
                ]
        self.schedule.start()
        monitors = _monitors(trainer)
        if monitors and self is monitors[0]:  # one layout per run, holding every monitor's
            write_layout(trainer, pl_module, monitors)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.probe == "current":
            self._last_batch = (batch, batch_idx)
        if self.is_due(trainer, batch_idx):
            self._probe(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.uses_probe_data and self.schedule.is_due_at_epoch_end(
            trainer.global_step, trainer.current_epoch
        ):
            batch, batch_idx = self._last_batch or (None, 0)
            self._probe(trainer, pl_module, batch, batch_idx)

    def is_due(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether to measure at this training batch (call from ``on_train_batch_start``)."""
        # every_n_epochs acts at epoch end (on_train_epoch_end); a monitor that reads
        # training's own steps instead of probe data measures the epoch's first step.
        epoch_start = batch_idx == 0 and not self.uses_probe_data
        return self.schedule.is_due(
            trainer.global_step,
            trainer.current_epoch,
            epoch_start=epoch_start,
            clock=functools.partial(_timing, trainer),
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.on_train_end and self.schedule.last_step != trainer.global_step:
            self._probe(trainer, pl_module, None, 0)

    @property
    @override
    def state_key(self) -> str:
        # Every argument that makes two monitors of one class measure different things:
        # Lightning refuses two stateful callbacks with one key (e.g. k=1 and k=5, or a
        # training and a held-out probe at the same cadence). Objects enter by a stable name.
        # Built once: Lightning reads it at every hook call (its profiler's action name).
        if self._state_key is None:
            self._state_key = self._build_state_key()
        return self._state_key

    def _build_state_key(self) -> str:
        loss_fn = self.loss_fn
        return self._generate_state_key(
            every_n_steps=self.schedule.every_n_steps,
            every_n_epochs=self.schedule.every_n_epochs,
            on_train_end=self.schedule.on_train_end,
            max_overhead=self.schedule.max_overhead,
            parameters=self.parameters,
            probe=self.probe,
            probe_batches=self.probe_batches,
            probe_dataloader=self.probe_dataloader is not None,
            loss_fn=None if loss_fn is None else getattr(loss_fn, "__qualname__", repr(loss_fn)),
            batch_norm=self.batch_norm,
            backend=self.backend,
            seed=self.seed,
            **({} if self.name is None else {"name": self.name}),
            **self.state_key_fields(),
        )

    def state_key_fields(self) -> dict[str, Any]:
        """Subclass arguments (plain values) that tell two instances apart in a checkpoint.

        The attributes :attr:`state_key_arguments` names, in that order.
        """
        return {name: getattr(self, name) for name in self.state_key_arguments}

    @override
    def state_dict(self) -> dict[str, Any]:
        generator = (
            self._generator.get_state() if self._generator is not None else self._generator_state
        )
        return {
            "schedule": self.schedule.state_dict(),
            "generator": generator,
            **self.extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict.get("schedule", {}))
        self._generator_state = state_dict.get("generator")
        self._generator = None
        self.load_extra_state(state_dict)

    # -- the probe ---------------------------------------------------------------------------------
    def _probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        batches = self._fixed_batches if self.probe == "fixed" else [batch]
        if batches is None or batches == [None]:
            return  # "current" probe at train end: no batch to probe
        self._batch_idx = batch_idx if self.probe == "current" else 0
        self.record_measurement(
            trainer, pl_module, lambda: self.measure(trainer, pl_module, batches)
        )

    @property
    def probe_seconds(self) -> float:
        """Seconds this monitor has spent measuring in this fit (for the shared budget)."""
        return self.schedule.probe_seconds

    def record_measurement(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        measure: Callable[[], Measurement | None],
        seconds_before: float = 0.0,
    ) -> None:
        """Run ``measure`` isolated, time it, reschedule, and log what it returns.

        Every measurement of a monitor goes through here: the isolation context
        (:func:`~lightning_curvature.callbacks.isolation.isolated`), one warning per kind of
        bad luck, naming it and the step (a :class:`NonFiniteCurvatureError`, a
        ``training_step`` returning ``None`` or a ``RuntimeError`` of a backend skips the
        measurement; non-finite values are left out), the cost tags, the next probe step
        under ``max_overhead``, and the one logging path.

        Args:
            trainer: the trainer.
            pl_module: the module.
            measure: returns the scalars to log and the number of HVPs used (``None``:
                nothing to log this time).
            seconds_before: time already spent on this measurement (e.g. in training hooks).
        """
        step = trainer.global_step
        started = time.perf_counter()
        measured: Measurement | None = None
        failure: Exception | None = None
        self._pending = []
        try:
            with (
                warnings.catch_warnings(record=True) as caught,
                recording_skip_reasons() as reasons,
                isolated(pl_module),
            ):
                warnings.simplefilter("always", CurvatureWarning)
                try:
                    measured = measure()
                except (NonFiniteCurvatureError, PiecewiseLinearError, RuntimeError) as err:
                    failure = err
        finally:
            pending, self._pending = self._pending, None
        for record in caught:
            if issubclass(record.category, CurvatureWarning):
                # One warning per place that warns (e.g. Lanczos not converging), not one per
                # category: every CurvatureWarning shares the category.
                key = f"{record.filename}:{record.lineno}"
                self.warn_once(key, f"at step {step}: {record.message}")
            else:
                warnings.warn_explicit(
                    record.message, record.category, record.filename, record.lineno
                )
        for text in pending:  # warn_once calls made by measure(), already deduplicated
            rank_zero_warn(text, category=CurvatureWarning)
        if failure is not None:
            self._warn_skipped(step, failure, reasons)
            measured = None
        seconds = seconds_before + time.perf_counter() - started
        self.schedule.probed(step, seconds, clock=functools.partial(_timing, trainer))
        if measured is None:
            return
        values = self._finite({key: float(v) for key, v in measured.metrics.items()}, step)
        values.update(measured.cost(self.cost_name, seconds))
        self.last_metrics = {self.tag(key): value for key, value in values.items()}
        log_scalars(trainer, self.last_metrics, log_step(trainer))
        self.log_extras(trainer, step)

    def _warn_skipped(self, step: int, failure: Exception, reasons: list[str]) -> None:
        """One warning per reason a probe could not run."""
        if reasons:  # what training_step ran into explains the non-finite loss
            key, why = "none_loss", "; ".join(dict.fromkeys(reasons))
        elif isinstance(failure, NonFiniteCurvatureError):
            key, why = "nonfinite", str(failure)
        else:
            key, why = "runtime", f"{type(failure).__name__}: {failure}"
        why = why.strip().rstrip(".")
        self.warn_once(key, f"skipped the probe at step {step} ({why}); training goes on.")

    def _finite(self, metrics: dict[str, float], step: int) -> dict[str, float]:
        """``metrics`` without its non-finite values (one warning names them)."""
        bad = [name for name, value in metrics.items() if not math.isfinite(value)]
        if bad:
            self.warn_once(
                "nonfinite_values",
                f"left the non-finite value(s) of {', '.join(bad)} out at step {step}.",
            )
        return {name: value for name, value in metrics.items() if name not in bad}


def _monitors(trainer: pl.Trainer) -> list[CurvatureMonitor]:
    return [c for c in trainer.callbacks if isinstance(c, CurvatureMonitor)]  # type: ignore[attr-defined]


def _timing(trainer: pl.Trainer) -> Timing:
    """The clock of the budget the monitors of ``trainer`` share (read by their schedules)."""
    schedules = [monitor.schedule for monitor in _monitors(trainer)]
    return Timing(
        now=time.perf_counter(),
        probe_seconds=sum(schedule.probe_seconds for schedule in schedules),
        sharers=sum(schedule.max_overhead is not None for schedule in schedules),
        broadcast=lambda interval: trainer.strategy.broadcast(interval, src=0),
    )
