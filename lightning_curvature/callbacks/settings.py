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

from lightning_curvature.callbacks.agreement import process_mean
from lightning_curvature.callbacks.arguments import check_probe_arguments, refuse_unknown
from lightning_curvature.callbacks.fixed_probe import FixedProbe
from lightning_curvature.callbacks.isolation import training_step_loss
from lightning_curvature.callbacks.measured import (
    MeasuredParameters,
    change_message,
    resolve_measured,
)
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
from lightning_curvature.functional.model.parameters import (
    ParameterPatterns,
    PerLayer,
    select_parameters,
)
from lightning_curvature.functional.model.probe import BatchNormMode, module_device, unwrap_model
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
    #: Whether the cost tags include ``forwards`` (monitors that evaluate the loss by forward
    #: passes: slices, line searches).
    counts_forwards = False
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
        self._fixed = FixedProbe(probe_batches, seed, probe_dataloader, type(self).__name__)
        self._warnings = WarningPolicy(type(self).__name__)
        if probe == "fixed":
            self._warnings.none_note = "another fixed probe batch is drawn for the next probes"
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
        if self.counts_forwards:
            forwards = exact(self.tag(cost_tag(self.cost_name, "forwards")))
            cost["forward passes per probe"] = multiline(forwards)
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
            "parameters": self.measured_parameters,
            "backend": self.backend,
            "batch_norm": self.batch_norm,
            "generator": self.generator(module_device(pl_module)),
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
        """The agreed mean across processes under a multi-process strategy, else ``None``."""
        return process_mean(trainer)

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
        the monitor). Then note what the monitor measures (see :meth:`resolve_parameters`).
        """
        select_parameters(unwrap_model(pl_module), self.parameters)  # every pattern matches
        self._resolved = resolve_measured(pl_module, self.parameters, self.layer_spec())

    #: What a probe does when the measured parameters changed since the last one (the end of
    #: its one warning, :func:`~lightning_curvature.callbacks.measured.change_message`).
    parameter_change_effect = "probes measure the new set from this one on"
    _resolved: MeasuredParameters | None = None  # what the last probe (or setup) resolved

    def layer_spec(self) -> PerLayer:
        """The ``per_layer`` blocks, as the model-level functions take them (none here)."""
        return False

    def resolve_parameters(
        self, pl_module: pl.LightningModule, step: int, effect: str | None = None
    ) -> bool:
        """Resolve again which parameters this probe measures; whether there is any.

        ``requires_grad`` may have changed since the last probe (a layer frozen or
        unfrozen): a new measured set is said in one warning per set, ending with
        ``effect`` (default :attr:`parameter_change_effect`); see
        :mod:`~lightning_curvature.callbacks.measured`.
        """
        now = resolve_measured(pl_module, self.parameters, self.layer_spec())
        before, self._resolved = self._resolved, now
        if before is not None and before.names != now.names:
            why = change_message(before, now, step, effect or self.parameter_change_effect)
            self.warn_once(f"parameters:{hash(now.names)}", why)
        return bool(now.names)

    @property
    def measured_parameters(self) -> ParameterPatterns:
        """``parameters=`` narrowed to the patterns that match a trainable parameter now."""
        return self.parameters if self._resolved is None else self._resolved.parameters

    def measured_tensors(self, pl_module: pl.LightningModule) -> list[tuple[str, torch.Tensor]]:
        """The measured parameters by name, as last resolved (``parameters=`` before that)."""
        module = unwrap_model(pl_module)
        if self._resolved is None:
            return list(select_parameters(module, self.parameters))
        params = dict(module.named_parameters())
        return [(name, params[name]) for name in self._resolved.names]

    def measured_size(self, pl_module: pl.LightningModule) -> int:
        """Number of parameters the monitor measures now (``parameters=`` of the module)."""
        return sum(p.numel() for _, p in self.measured_tensors(pl_module))
