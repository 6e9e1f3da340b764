"""``HessianTraceMonitor``: total curvature with its standard error, per layer on request."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_curvature.callbacks.layers import PerLayerMonitor
from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.operator_monitor import OperatorMonitor
from lightning_curvature.callbacks.reporting.dashboard import (
    Charts,
    exact,
    family,
    layout,
    margin,
    multiline,
)
from lightning_curvature.callbacks.schedule import EveryNSteps
from lightning_curvature.functional.model.batches import BatchList
from lightning_curvature.functional.model.parameters import PerLayer
from lightning_curvature.functional.trace import check_trace_arguments, hessian_trace

__all__ = ["HessianTraceMonitor"]


class HessianTraceMonitor(PerLayerMonitor, OperatorMonitor):
    """Hessian trace by Hutchinson (or Hutch++), always with its standard error.

    Costs ``num_hvps`` Hessian-vector products per probe. Per-layer traces come from the
    same products for free (with Hutchinson they sum exactly to the total).

    Args:
        num_hvps: probes per measurement (the standard error shrinks as ``1/√num_hvps``).
        method: ``"hutchinson"`` (default; best for neural-network Hessians below ~80
            probes) or ``"hutch++"``.
        per_layer: blocks with a trace of their own: ``True`` (one per module), a list of
            parameter-name patterns, or a dict of tag name to pattern(s); see
            :mod:`~lightning_curvature.callbacks.layers`.
        every_n_steps: probe every this many optimizer steps (``"auto"``: 1000, as a probe
            is ``num_hvps`` products, some 40-60 gradients).
        **kwargs: cadence, probe data, loss, ``curvature`` (``"ggn"``: the trace of the
            generalized Gauss–Newton matrix, see ``OperatorMonitor``) and the rest: see
            ``CurvatureMonitor``.

    Logged metrics:
        - ``curvature/trace`` and ``curvature/trace_std_error``
        - ``curvature/trace_lower`` and ``curvature/trace_upper``: trace ∓ 2 standard
          errors (the band of the custom-scalars chart)
        - ``curvature/trace/<name>`` (with ``per_layer``)
        - ``probe_cost/trace_hvps`` and ``probe_cost/trace_seconds``: cost of the probe
        - with ``curvature="ggn"``: every tag with ``ggn_`` before its name
          (``curvature/ggn_trace``, …)

    Raises:
        MisconfigurationException: on invalid arguments (at construction), or without a
            logger, under a sharded strategy, with manual optimization and no ``loss_fn``,
            or with a ``per_layer`` pattern that matches no measured parameter (at setup).

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = HessianTraceMonitor(num_hvps=16, every_n_steps=200, per_layer=True)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=1, enable_progress_bar=False)
    """

    shardable = True  # FSDP2: finite differences over sharded vectors

    cost_name = "trace"
    default_every_n_steps = 1000
    state_key_arguments = ("num_hvps", "method", "per_layer")

    def __init__(
        self,
        num_hvps: int = 32,
        method: Literal["hutchinson", "hutch++"] = "hutchinson",
        *,
        per_layer: PerLayer = False,
        every_n_steps: EveryNSteps = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(per_layer=per_layer, every_n_steps=every_n_steps, **kwargs)
        try:
            check_trace_arguments(num_hvps, method)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        self.num_hvps, self.method = num_hvps, method

    @override
    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Charts:
        bounds = ("curvature/trace", "curvature/trace_lower", "curvature/trace_upper")
        trace = [self.tag(tag) for tag in bounds]
        science = {
            f"{self.matrix} trace ± 2 standard errors": margin(*trace),
            "standard error of the trace": multiline(exact(self.tag("curvature/trace_std_error"))),
        }
        if self.blocks.requested:
            science[f"{self.matrix} trace per block"] = multiline(
                family(self.tag("curvature/trace/"), ".+")
            )
        return layout([{self.category("curvature"): science}, super().charts(trainer, pl_module)])

    @override
    def expected_cost(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """``num_hvps`` products of the probe batches.

        Example:
            >>> HessianTraceMonitor(num_hvps=8).expected_cost(None, None)
            20.0
        """
        return self.hvp_gradients * self.num_hvps * self.probe_batches

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> Measurement:
        result = hessian_trace(
            pl_module,
            self.probe_loss_fn(),
            BatchList(batches),
            self.num_hvps,
            self.method,
            per_layer=self.measured_blocks,
            **self.probe_kwargs(trainer, pl_module),
        )
        metrics: dict[str, float | torch.Tensor] = {
            "curvature/trace": result.estimate,
            "curvature/trace_std_error": result.std_error,
            "curvature/trace_lower": result.estimate - 2 * result.std_error,
            "curvature/trace_upper": result.estimate + 2 * result.std_error,
        }
        for block, value in result.per_layer.items():
            metrics[f"curvature/trace/{block}"] = value
        return Measurement(metrics, result.num_hvps)
