"""``BatchSharpnessMonitor``: the mini-batch sharpness that SGD settles at 2/η."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_curvature.callbacks.eigenvalues import HessianEigenvalueMonitor
from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.monitor import CurvatureMonitor
from lightning_curvature.callbacks.reporting.dashboard import (
    Charts,
    exact,
    layout,
    multiline,
    raw_threshold,
    sharpness_chart_title,
)
from lightning_curvature.callbacks.schedule import EveryNSteps
from lightning_curvature.checks import check_integer
from lightning_curvature.functional.batch_sharpness import batch_sharpness
from lightning_curvature.functional.model.probe import BatchNormMode

__all__ = ["BatchSharpnessMonitor"]


class BatchSharpnessMonitor(CurvatureMonitor):
    """Batch sharpness ``E_B[g_Bᵀ H_B g_B / ‖g_B‖²]`` with its standard error, next to 2/η.

    Andreyev & Beneventano (2024, "Edge of Stochastic Stability") find that under mini-batch
    SGD it is this quantity, the curvature of each mini-batch's loss along that mini-batch's
    own gradient, that rises to the stability threshold ``2/η`` and hovers there, while the
    full-batch ``λ₁`` stays below. Each probe draws on ``num_batches`` mini-batches ``B``:
    the fixed probe, taken once from the training dataloader (or ``probe_dataloader``) at
    its own batch size, so every probe sees the same sample and values are comparable over
    time. The standard error is that of the mean over these batches as draws of the
    loader's batches. Under DDP each sample is the union of the ranks' batches (gradients
    and products are averaged), the global batch of an optimizer step. Cost: per batch one
    Hessian-vector product and one gradient (free with the ``"retained_graph"`` backend,
    whose products go through it): about ``3·num_batches`` gradients of a training batch.

    Per-layer values are not offered: the quotient of a block needs that block's own product
    ``H_ll g_l``, one more product per block and batch.

    Args:
        num_batches: mini-batches per probe (>= 2: the standard error needs two).
        every_n_steps: probe cadence (``"auto"``: 500, the eigenvalue monitor's, so both
            land on the same steps of one chart).
        batch_norm: ``"train"`` (default: batch statistics, the landscape SGD steps on) or
            ``"eval"``.
        **kwargs: cadence, probe data (``probe_dataloader``), loss and the rest: see
            ``CurvatureMonitor`` (``probe="current"`` and ``probe_batches`` are not taken:
            the probe is the ``num_batches`` fixed batches).

    Logged metrics:
        - ``curvature/batch_sharpness``: the mean quotient over the batches
        - ``curvature/batch_sharpness_std_error``: its Monte-Carlo standard error
        - ``curvature/batch_sharpness_ratio``: ``batch_sharpness / threshold`` with the raw
          Hessian's threshold of SGD (``2/η``, ``(2 + 2β)/η`` with momentum, less coupled
          weight decay); not for Adam, whose threshold refers to ``P⁻¹H``
        - ``curvature/stability_threshold``: that threshold, unless a (Hessian)
          ``HessianEigenvalueMonitor`` of the same ``name`` with ``stability=True`` already
          logs it (then the two monitors share its series)
        - ``probe_cost/batch_sharpness_hvps`` and ``probe_cost/batch_sharpness_seconds``
        - with ``name=``: every tag as ``<group>/<name>/…``

    Raises:
        MisconfigurationException: on invalid arguments (at construction), and at setup as
            ``CurvatureMonitor``.

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = BatchSharpnessMonitor(num_batches=4, every_n_steps=50)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=1, enable_progress_bar=False)
    """

    cost_name = "batch_sharpness"
    sharpness_quantity = "batch sharpness"  # what it puts on the sharpness chart
    default_every_n_steps = 500
    state_key_arguments = ("num_batches",)

    def __init__(
        self,
        num_batches: int = 8,
        *,
        every_n_steps: EveryNSteps = "auto",
        batch_norm: BatchNormMode = "train",
        **kwargs: Any,
    ) -> None:
        check_integer(
            "num_batches",
            num_batches,
            2,
            why=" (the standard error needs two batches)",
            error=MisconfigurationException,
        )
        for taken in ("probe", "probe_batches"):
            if taken in kwargs:
                raise MisconfigurationException(
                    f"`BatchSharpnessMonitor` does not take `{taken}`: it measures the "
                    "`num_batches` fixed probe batches, each one sample of batch sharpness."
                )
        super().__init__(
            every_n_steps=every_n_steps,
            batch_norm=batch_norm,
            probe="fixed",
            probe_batches=num_batches,
            **kwargs,
        )
        self.num_batches = num_batches
        self._logs_threshold = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._logs_threshold = not any(  # (a GGN monitor logs curvature/ggn_… tags)
            isinstance(c, HessianEigenvalueMonitor)
            and c.stability
            and c.name == self.name
            and c.curvature == "hessian"
            for c in trainer.callbacks  # type: ignore[attr-defined]
        )
        super().on_train_start(trainer, pl_module)

    @override
    def expected_cost(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """One gradient and one product per batch.

        Example:
            >>> BatchSharpnessMonitor(num_batches=4).expected_cost(None, None)
            14.0
        """
        return (1 + self.hvp_gradients) * self.num_batches

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> Measurement:
        result = batch_sharpness(
            pl_module,
            self.probe_loss_fn(),
            batches,
            parameters=self.measured_parameters,
            backend=self.backend,
            batch_norm=self.batch_norm,
            all_reduce=self.all_reduce(trainer),
        )
        metrics: dict[str, float | torch.Tensor] = {
            "curvature/batch_sharpness": result.estimate,
            "curvature/batch_sharpness_std_error": result.std_error,
        }
        threshold = raw_threshold(trainer)
        if threshold is not None and math.isfinite(threshold) and threshold > 0:
            metrics["curvature/batch_sharpness_ratio"] = float(result.estimate) / threshold
            if self._logs_threshold:
                metrics["curvature/stability_threshold"] = threshold
        return Measurement(metrics, result.num_hvps)

    @override
    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Charts:
        value = exact(self.tag("curvature/batch_sharpness"))
        title = sharpness_chart_title(
            trainer, pl_module, self.batch_norm, self.sharpness_quantity, self.name
        )
        science: dict[str, list[Any]] = {}
        if title is not None:  # λ₁'s chart, if the eigenvalue monitor has one of that title
            science[title] = multiline(value, exact(self.tag("curvature/stability_threshold")))
            science["batch sharpness / threshold"] = multiline(
                exact(self.tag("curvature/batch_sharpness_ratio"))
            )
        else:
            science["batch sharpness E_B[g_BᵀH_Bg_B/‖g_B‖²]"] = multiline(value)
        science["batch sharpness: standard error"] = multiline(
            exact(self.tag("curvature/batch_sharpness_std_error"))
        )
        return layout([{self.category("curvature"): science}, super().charts(trainer, pl_module)])
