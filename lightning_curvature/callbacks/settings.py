"""The arguments every monitor takes, checked and kept, and what a measurement reads from them.

:class:`MonitorSettings` is the base of
:class:`~lightning_curvature.callbacks.monitor.CurvatureMonitor` (which documents the
arguments): its constructor checks them (:mod:`~lightning_curvature.callbacks.arguments`) and
keeps them, and its methods are what a subclass's ``measure`` reads from them: the probe's
loss, the arguments of every model-level call (parameters, backend, BatchNorm mode, the
monitor's own generator, the mean across processes), the tags and charts its values are
written under, and one warning per kind of bad luck. It knows no Lightning hook.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback

from lightning_curvature.callbacks.arguments import check_probe_arguments, refuse_unknown
from lightning_curvature.callbacks.isolation import training_step_loss
from lightning_curvature.callbacks.measurement import cost_tag
from lightning_curvature.callbacks.probe_data import ProbePolicy
from lightning_curvature.callbacks.reporting.dashboard import (
    COST_CATEGORY,
    Charts,
    exact,
    multiline,
)
from lightning_curvature.callbacks.reporting.logging import check_name, named_tag
from lightning_curvature.callbacks.run_report import RunReport
from lightning_curvature.callbacks.schedule import (
    EveryNSteps,
    ProbeSchedule,
    resolve_every_n_steps,
)
from lightning_curvature.callbacks.warning_policy import WarningPolicy
from lightning_curvature.functional.linalg.sampling import make_generator
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.parameters import ParameterPatterns, select_parameters
from lightning_curvature.functional.model.probe import BatchNormMode, unwrap_model
from lightning_curvature.functional.operator.backends import AllReduce, HVPBackend

__all__ = ["MonitorSettings"]


class MonitorSettings(Callback):
    """A monitor's arguments and what its measurements read from them.

    The arguments are those of ``CurvatureMonitor``, documented there.

    Example:
        >>> settings = MonitorSettings(every_n_steps=10, name="heldout")
        >>> settings.tag("curvature/trace"), settings.category("curvature")
        ('curvature/heldout/trace', 'curvature (heldout)')
    """

    #: The monitor kind in its cost tags, ``probe_cost/<cost_name>_seconds|hvps``
    #: (:func:`~lightning_curvature.callbacks.measurement.cost_tag`).
    cost_name = ""
    #: Whether the cost tags include ``hvps`` (monitors that compute no HVP: no).
    counts_hvps = True
    #: The step cadence of ``every_n_steps="auto"`` where the run's length is unknown.
    default_every_n_steps = 100
    #: One Hessian-vector product in gradients of its batch (measured 1.8-2.5x on a 2-core
    #: CPU for the retained-graph backend, ``functional/operator/backends.py``; rounded up).
    hvp_gradients = 2.5

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
            refuse_unknown(type(self), unknown)
        steps = resolve_every_n_steps(
            every_n_steps, self.default_every_n_steps, every_n_epochs, max_overhead
        )
        auto = every_n_steps == "auto" and every_n_epochs is None
        self.schedule = ProbeSchedule(steps, every_n_epochs, on_train_end, max_overhead, auto=auto)
        check_name(name)
        self.name = name
        check_probe_arguments(
            probe=probe,
            batch_norm=batch_norm,
            backend=backend,
            probe_batches=probe_batches,
            probe_dataloader=probe_dataloader,
            loss_fn=loss_fn,
            seed=seed,
            parameters=parameters,
        )
        self.probe = probe
        self.probe_batches = probe_batches
        self.probe_dataloader = probe_dataloader
        self.loss_fn = loss_fn
        self.batch_norm = batch_norm
        self.parameters = parameters
        self.backend = backend
        self.seed = seed
        self.last_metrics: dict[str, float] = {}
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self._warnings = WarningPolicy(type(self).__name__)
        self._batch_idx = 0  # what the probe passes as training_step's batch_idx
        owner = type(self).__name__ + ("" if name is None else f"({name})")
        #: The plan, the progress lines and the history of this monitor's fit.
        self.report = RunReport(owner)

    def expected_cost(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """One probe's cost in gradients of a training batch, estimated before any is made.

        What a budget plans the first probe with (``every_n_steps="auto"`` or
        ``max_overhead``): a monitor whose first probe would not fit its share of the run
        makes none. ``None`` (this default): unknown, the first probe is made and measured.
        """
        return None

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
        """One :class:`~lightning_curvature.errors.CurvatureWarning` per kind of bad luck.

        On rank zero, naming the monitor; see
        :class:`~lightning_curvature.callbacks.warning_policy.WarningPolicy`.
        """
        self._warnings.warn_once(key, message)

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
