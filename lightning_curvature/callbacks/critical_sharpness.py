"""``CriticalSharpnessMonitor``: ``2/η_c`` along the optimizer's next update, beside ``λ₁``.

**The update** is the one the optimizer would take now, computed from its state and the
probe gradient without stepping it
(:func:`~lightning_curvature.functional.optimizer_update.next_update`: SGD with momentum,
Nesterov and weight decay, Adam and AdamW), not the last one it took: at the edge of
stability the iterate jumps across the top eigenvector's valley at every step, so from the
new weights the last update points back uphill along it and the loss rises at once
(``η_c → 0``). With the fixed probe set to the full training batch (full-batch training) the
update is exactly training's next one.

**Why a monitor of its own**, not an option of ``LossLandscapeMonitor``: it costs one
gradient and a handful of forward passes, no Hessian-vector product (4-6 training steps a
probe), so it can run far more often than slices (every 500 steps by default, the
eigenvalue monitor's cadence, against the slices' 2000; ``every_n_steps=10`` costs about half
of training).

**Its chart.** ``λ_c`` is ``2/η`` at the edge for every optimizer (see
:mod:`~lightning_curvature.functional.critical_sharpness`), so it shares the chart of ``λ₁``
against the threshold when that threshold is ``2/η`` (plain SGD); otherwise it is charted
on its own, and its ratio ``η/η_c`` (1 at the edge) beside the sharpness ratios.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_curvature.callbacks.batch_sharpness import BatchSharpnessMonitor
from lightning_curvature.callbacks.eigenvalues import HessianEigenvalueMonitor
from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.monitor import CurvatureMonitor
from lightning_curvature.callbacks.reporting.dashboard import (
    Charts,
    exact,
    layout,
    multiline,
    sharpness_chart_title,
)
from lightning_curvature.callbacks.schedule import EveryNSteps
from lightning_curvature.callbacks.trainer import check_strategy, learning_rate
from lightning_curvature.functional.critical_sharpness import (
    CriticalSharpness,
    check_critical_sharpness_arguments,
    critical_sharpness,
)
from lightning_curvature.functional.model.batches import BatchList
from lightning_curvature.functional.model.parameters import select_parameters
from lightning_curvature.functional.model.probe import BatchNormMode, unwrap_model
from lightning_curvature.functional.optimizer_update import next_update

__all__ = ["CriticalSharpnessMonitor"]


def _plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """SGD without momentum: its stability threshold is ``2/η``, critical sharpness's edge."""
    group = optimizer.param_groups[0]
    return isinstance(optimizer, torch.optim.SGD) and not float(group.get("momentum", 0.0))


class CriticalSharpnessMonitor(CurvatureMonitor):
    """Critical sharpness ``2/η_c`` along the optimizer's next update (Kalra et al. 2026).

    ``η_c`` is the smallest step size at which one step along the update the optimizer is
    about to take raises the probe loss, ``L(w − η u) > L(w)``; found by a line search
    warm-started from the previous probe's ``η_c`` (about 6 forward passes once warm, plus
    the probe gradient the update is computed from). On a quadratic ``2/η_c = uᵀHu / gᵀu``:
    the curvature along the gradient for gradient descent. It needs no Hessian-vector
    product and no double backward.

    Args:
        rtol: relative width of the bracket of ``η_c`` (so of the logged value).
        max_evals: most forward passes per line search.
        every_n_steps: probe cadence (``"auto"``: 500, the eigenvalue monitor's, so that both
            land on the steps of one chart; a warm probe costs 4-6 training steps, about 1%
            of training at this cadence, ``benchmarks/README.md``).
        batch_norm: ``"train"`` (default: batch statistics, the landscape the optimizer
            steps on) or ``"eval"``.
        **kwargs: cadence, probe data, loss and the rest: see ``CurvatureMonitor``.

    Logged metrics:
        - ``curvature/critical_sharpness``: ``2/η_c``
        - ``curvature/critical_sharpness_ratio``: ``η/η_c = η·λ_c/2`` with ``η`` the
          optimizer's (largest) learning rate: above 1, the step it is about to take raises
          the probe loss
        - ``curvature/stability_threshold``: ``2/η`` for plain SGD, unless a (Hessian)
          ``HessianEigenvalueMonitor`` with ``stability=True`` or a
          ``BatchSharpnessMonitor`` of the same ``name`` logs it
        - ``probe_cost/critical_sharpness_forwards`` and ``_seconds``
        - with ``name=``: every tag as ``<group>/<name>/…``

    Nothing is logged at a probe whose line search did not close its bracket (one warning
    names why: an update that is not a descent direction of the probe loss, a loss that
    never rises along it, or ``max_evals``), nor at a learning rate of 0.

    Under ``ModelParallelStrategy`` (FSDP2, ``fully_shard``) the update is each process's
    shard of it (read from the shards of the optimizer state), every trial point is one
    forward pass with the local shards displaced in place (restored exactly after it), and
    every process brackets the union batch's ``η_c``; forward passes and one gradient only,
    so a piecewise-linear model is measured there too.

    Raises:
        MisconfigurationException: on invalid arguments (at construction); at the start of
            fitting, with an optimizer other than SGD, Adam or AdamW (whose next update
            cannot be read without stepping it).

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = CriticalSharpnessMonitor(every_n_steps=10)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=1, enable_progress_bar=False)
    """

    cost_name = "critical_sharpness"
    counts_hvps = False
    counts_forwards = True
    default_every_n_steps = 500
    state_key_arguments = ("rtol", "max_evals")
    shardable = True  # FSDP2: the update as shards, the trial points displaced in place

    def __init__(
        self,
        *,
        rtol: float = 0.01,
        max_evals: int = 30,
        every_n_steps: EveryNSteps = "auto",
        batch_norm: BatchNormMode = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, batch_norm=batch_norm, **kwargs)
        try:
            check_critical_sharpness_arguments(1.0, rtol, max_evals)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        self.rtol, self.max_evals = float(rtol), max_evals
        self.step_size: float | None = None  # the last η_c: the next search's start
        self._shares_chart = False
        self._logs_threshold = False

    @override
    def check_sharding(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse FSDP1 and DeepSpeed; under FSDP2 no finite differences, so any model."""
        check_strategy(trainer, type(self).__name__)

    @property
    def sharpness_quantity(self) -> str | None:
        """``"critical sharpness"`` on the chart of ``λ₁`` against ``2/η`` (plain SGD)."""
        return "critical sharpness" if self._shares_chart else None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            raise MisconfigurationException(
                "`CriticalSharpnessMonitor` needs an optimizer: it measures along its next update."
            )
        optimizer = trainer.optimizers[0]
        if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
            raise MisconfigurationException(
                f"`CriticalSharpnessMonitor` reads the next update of SGD, Adam or AdamW from "
                f"their state; {type(optimizer).__name__}'s cannot be read without stepping it."
            )
        self._shares_chart = _plain_sgd(optimizer)
        others = [
            c
            for c in trainer.callbacks  # type: ignore[attr-defined]
            if c.__class__ is not self.__class__ and getattr(c, "name", None) == self.name
        ]
        logged_elsewhere = any(
            (isinstance(c, HessianEigenvalueMonitor) and c.stability and c.curvature == "hessian")
            or isinstance(c, BatchSharpnessMonitor)
            for c in others
        )
        self._logs_threshold = self._shares_chart and not logged_elsewhere

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> Measurement | None:
        optimizer = trainer.optimizers[0]
        measured = [p for _, p in select_parameters(unwrap_model(pl_module), self.parameters)]
        lr = learning_rate(trainer)
        if lr is None:
            self.warn_once(
                "zero_lr",
                f"the learning rate is 0 at step {trainer.global_step}: no step, no critical "
                "step size; nothing is logged.",
            )
            return None

        def update(gradient: torch.Tensor) -> torch.Tensor:
            found = next_update(optimizer, measured, gradient)
            assert found is not None
            return found.update

        kwargs = self.probe_kwargs(trainer, pl_module)
        result = critical_sharpness(
            pl_module,
            self.probe_loss_fn(),
            BatchList(batches),
            update,
            init=self.step_size if self.step_size else lr,
            rtol=self.rtol,
            max_evals=self.max_evals,
            parameters=kwargs["parameters"],
            batch_norm=kwargs["batch_norm"],
            all_reduce=kwargs["all_reduce"],
        )
        if not result.converged:
            self.warn_once("open_bracket", self._why(trainer, result))
            return Measurement({}, forwards=result.num_forwards)
        self.step_size = result.step_size
        metrics: dict[str, float | torch.Tensor] = {
            "curvature/critical_sharpness": result.value,
            "curvature/critical_sharpness_ratio": result.relative_to(lr),
        }
        if self._logs_threshold:
            metrics["curvature/stability_threshold"] = 2.0 / lr
        return Measurement(metrics, forwards=result.num_forwards)

    def _why(self, trainer: pl.Trainer, result: CriticalSharpness) -> str:
        step = trainer.global_step
        if float(result.slope) <= 0:
            return (
                f"at step {step} the optimizer's next update is not a descent direction of the "
                f"probe loss (gᵀu = {float(result.slope):.3g}): the loss rises at any step "
                "size, so there is no critical step size; nothing is logged."
            )
        if math.isinf(result.upper):
            return (
                f"at step {step} the probe loss did not rise along the update up to step size "
                f"{result.lower:.3g}: the critical sharpness is below {2 / result.lower:.3g} "
                "there; nothing is logged."
            )
        return (
            f"at step {step} the line search did not close its bracket "
            f"[{result.lower:.3g}, {result.upper:.3g}] to rtol={self.rtol} within "
            f"max_evals={self.max_evals} forward passes; nothing is logged (raise max_evals)."
        )

    @override
    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Charts:
        value = exact(self.tag("curvature/critical_sharpness"))
        ratio = multiline(exact(self.tag("curvature/critical_sharpness_ratio")))
        science: dict[str, list[Any]] = {}
        title = None
        if self._shares_chart:
            title = sharpness_chart_title(
                trainer, pl_module, self.batch_norm, "critical sharpness", self.name
            )
        if title is not None:
            science[title] = multiline(value, exact(self.tag("curvature/stability_threshold")))
        else:
            science["critical sharpness 2/η_c along the next update"] = multiline(value)
        science["critical sharpness ratio η/η_c (1: the edge)"] = ratio
        return layout([{self.category("curvature"): science}, super().charts(trainer, pl_module)])

    @override
    def extra_state(self) -> dict[str, Any]:
        return {} if self.step_size is None else {"step_size": self.step_size}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        step_size = state.get("step_size")
        self.step_size = None if step_size is None else float(step_size)
