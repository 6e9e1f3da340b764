"""``CurvatureMonitor``, the base of every monitor: its hooks, its probe's path, its state.

A monitor subclass implements :meth:`CurvatureMonitor.measure`, a call of the model-level API
that returns the scalars to log; this base decides when to call it and on what data, runs it
so that nothing the user trains changes, writes the result, and checkpoints its state. The
arguments it is built with, and what ``measure`` reads from them (the loss, the arguments of
every model-level call, the tags), are its base's,
:class:`~lightning_curvature.callbacks.settings.MonitorSettings`.

Rules kept by this base for every monitor (``../shared/DESIGN.md``; the argument checks are
in :mod:`~lightning_curvature.callbacks.arguments`, the Trainer's in
:mod:`~lightning_curvature.callbacks.trainer`, the warnings in
:mod:`~lightning_curvature.callbacks.warning_policy`):

* **Harmless**: the probe runs on the unwrapped LightningModule through the model-level API
  (which never writes parameters or ``.grad``), inside the one isolation context of the
  callbacks, :func:`~lightning_curvature.callbacks.isolation.isolated`: every RNG, module
  mode, module attribute, buffer and torchmetrics state restored, the whole module in eval
  mode, ``self.log`` silenced. It never touches the optimizer.
* **fp32 on the trainer's device**: autocast off, whatever the Trainer's precision.
* **Distributed**: every rank probes at the same steps on its own probe data, Hessian-vector
  products are averaged across ranks weighted by each rank's share of the examples (the
  union batch's operator), so every rank computes the same numbers; rank zero writes. Any
  exception on any rank (a non-finite loss, an out-of-memory error) skips the probe on all
  together (:mod:`~lightning_curvature.callbacks.agreement`): nothing hangs.
* **Loud on bad input, quiet on bad luck**: arguments are checked at construction, Trainer
  and model misfits at ``setup``. A probe that cannot run (a ``training_step`` returning
  ``None``, a non-finite loss or product, a backend that fails, any exception, too few
  samples) is skipped with one warning per reason, naming it, the step and (with several
  processes) the rank; non-finite values are not logged; training goes on.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_curvature.callbacks.agreement import agreed_probe, undoing
from lightning_curvature.callbacks.isolation import (
    RETURNED_NONE,
    isolated,
    recording_skip_reasons,
)
from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.reporting.dashboard import write_layout
from lightning_curvature.callbacks.reporting.logging import log_scalars
from lightning_curvature.callbacks.run_report import RunReport
from lightning_curvature.callbacks.schedule import Timing
from lightning_curvature.callbacks.settings import MonitorSettings
from lightning_curvature.callbacks.trainer import (
    callbacks_of,
    check_fit,
    check_sharded_probe,
    check_strategy,
    log_step,
    shared_timing,
)
from lightning_curvature.errors import ProbeFailure
from lightning_curvature.functional.model.batches import BatchList

__all__ = ["CurvatureMonitor"]


class CurvatureMonitor(MonitorSettings):
    """Base of the periodic monitors; subclasses implement :meth:`measure`.

    Args:
        every_n_steps: probe when ``trainer.global_step`` (optimizer steps) is a multiple
            of it, step 0 included (the weights before training). ``"auto"`` (default): about
            25 probes over the run Lightning expects (``estimated_stepping_batches``) within
            ``max_overhead`` (default 5 %, shared by the monitors), every probe counted, the
            first at step 0 when its estimated cost (:meth:`expected_cost`) fits; a run too
            short for 10 within the budget is said once (see :mod:`.budget`). Where the
            run's length is unknown, :attr:`default_every_n_steps` is the shortest interval.
            With ``every_n_epochs``: no step cadence. ``None``: no step cadence.
        every_n_epochs: probe at the end of every n-th epoch, as Lightning's callbacks do
            (a probe of the weights after that epoch's last step).
        on_train_end: also probe the final weights.
        max_overhead: instead of a fixed cadence, keep probe time under this fraction of
            training time, planned over the run Lightning expects when it knows its length.
            The interval adapts after every probe and may be as short as one step; an
            ``every_n_steps`` given with it is the shortest interval. The budget is shared:
            the N monitors of a Trainer that have one each keep to a 1/N share of it, so
            several monitors at ``max_overhead=0.05`` take 5% together.
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

    #: Attributes, in order, of the subclass arguments (plain values) that tell two instances
    #: apart in a checkpoint's state key (see :meth:`state_key_fields`).
    state_key_arguments: tuple[str, ...] = ()

    # What a fit sets (the arguments are kept by MonitorSettings.__init__):
    _state_key: str | None = None
    # probe="current": the batch (and its index) an epoch-end probe measures
    _last_batch: tuple[Any, int] | None = None

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

    # -- Lightning hooks -------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        check_fit(trainer, pl_module, name, self.loss_fn)
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
        name = type(self).__name__
        check_strategy(trainer, name, None if self.shardable else self.unshardable_reason)
        check_sharded_probe(trainer, pl_module, name, self.backend)

    #: Whether this monitor measures under ``ModelParallelStrategy`` (FSDP2 shards).
    shardable = False
    #: Why not, for the refusal at ``setup``.
    unshardable_reason = "it has not been made to work on sharded parameters."

    @property
    def _fixed_batches(self) -> list[Any] | None:
        """The fixed probe's batches (:class:`~.fixed_probe.FixedProbe`, drawn at train start)."""
        return self._fixed.batches

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
            self._fixed.draw(trainer, pl_module)
        monitors = _monitors(trainer)
        schedules = [monitor.schedule for monitor in monitors]
        cost = self.expected_cost(trainer, pl_module) if self.uses_probe_data else None
        self.report.start(trainer, self.schedule, cost, schedules)
        if monitors and self is monitors[0]:  # one layout per run, holding every monitor's
            write_layout(trainer, (monitor.charts(trainer, pl_module) for monitor in monitors))

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

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        monitors = _monitors(trainer)
        if monitors and self is monitors[0]:  # one table, every monitor's, after their last probe
            RunReport.summarize(trainer, (monitor.report for monitor in monitors))

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
        draws = {"probe_draws": self._fixed.draws} if self._fixed.draws else {}
        return {
            "schedule": self.schedule.state_dict(),
            "generator": generator,
            **draws,
            **self.extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict.get("schedule", {}))
        self._generator_state = state_dict.get("generator")
        self._generator = None
        self._fixed.draws = int(state_dict.get("probe_draws", 0))
        self.load_extra_state(state_dict)

    # -- the probe ---------------------------------------------------------------------------------
    def _probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        batches = self._fixed_batches if self.probe == "fixed" else [batch]
        if batches is None or batches == [None]:
            return  # "current" probe at train end: no batch to probe
        if not self.resolve_parameters(pl_module, trainer.global_step):
            return  # no measured parameter is trainable now (said once, on the change)
        self._batch_idx = batch_idx if self.probe == "current" else 0
        with recording_skip_reasons() as reasons:
            self.record_measurement(
                trainer, pl_module, lambda: self.measure(trainer, pl_module, batches)
            )
        if self.probe == "fixed" and RETURNED_NONE in reasons:  # (its one warning says so)
            exhausted = self._fixed.redraw(trainer, pl_module)
            if exhausted is not None:
                self.warn_once("redraw", exhausted)

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

        Every measurement of a monitor goes through here: the agreement of the processes
        (:func:`~lightning_curvature.callbacks.agreement.agreed_probe`: any ``Exception``
        on any rank, a non-finite loss or product, a ``training_step`` returning ``None``,
        an out-of-memory error, skips the measurement on every rank together), the
        isolation context (:func:`~lightning_curvature.callbacks.isolation.isolated`), one
        warning per kind of bad luck, naming the step, the rank and what it raised
        (non-finite values are left out), the cost tags, the next probe step under
        ``max_overhead``, and the one logging path.

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
        undo = undoing(self)  # a failed probe leaves every rank's monitor as it was
        with recording_skip_reasons() as reasons:
            try:
                with (
                    agreed_probe(trainer, reasons),
                    self._warnings.collected(step),
                    isolated(pl_module),
                ):
                    measured = measure()
            except ProbeFailure as failure:  # on every rank alike, whichever rank failed
                undo()
                self._warnings.skipped(step, failure)
        seconds = seconds_before + time.perf_counter() - started
        self.schedule.probed(step, seconds, clock=functools.partial(_timing, trainer))
        if measured is None:
            self.report.probed(trainer, self.schedule, step, seconds, None)
            return
        values = self._warnings.finite({key: float(v) for key, v in measured.metrics.items()}, step)
        values.update(measured.cost(self.cost_name, seconds))
        self.last_metrics = {self.tag(key): value for key, value in values.items()}
        log_scalars(trainer, self.last_metrics, log_step(trainer))
        self.report.probed(trainer, self.schedule, step, seconds, self.last_metrics, measured.hvps)
        drawn = time.perf_counter()  # pictures drawn of the run so far, counted in the budget
        self.log_extras(trainer, step)
        self.schedule.probe_seconds += time.perf_counter() - drawn


def _monitors(trainer: pl.Trainer) -> list[CurvatureMonitor]:
    return callbacks_of(trainer, CurvatureMonitor)


def _timing(trainer: pl.Trainer) -> Timing:
    """The clock of the budget the monitors of ``trainer`` share (read by their schedules).

    Its time is read here, from the clock that times the probes.
    """
    now = time.perf_counter()
    return shared_timing(trainer, now, [monitor.schedule for monitor in _monitors(trainer)])
