"""The eigenvalue monitor's two instruments of the optimizer step: its gradient, its update.

``HessianEigenvalueMonitor(gradient_share=True)`` logs the share ``‖P_k g‖²/‖g‖²`` of the
training gradient of a probed step in the span of the probe's top-k eigenvectors, read from
``.grad`` in ``on_before_optimizer_step``; ``update_sharpness=True`` copies the weights
there, before a step after which a probe is due, and that probe measures the curvature
``uᵀHu/‖u‖²`` along the update ``u`` the optimizer made. :class:`StepInstrumentsMonitor`,
a base of the eigenvalue monitor, keeps both from the probe to the optimizer step and back
(the weights' copy is :class:`~lightning_curvature.callbacks.last_update.LastUpdate`'s, which
the landscape monitor shares).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_curvature.callbacks.last_update import LastUpdate, flat_copy
from lightning_curvature.callbacks.operator_monitor import OperatorMonitor
from lightning_curvature.callbacks.reporting.logging import log_scalars
from lightning_curvature.callbacks.trainer import log_step, sharding
from lightning_curvature.functional.directional import directional_curvature, subspace_share
from lightning_curvature.functional.linalg.reductions import inner_products
from lightning_curvature.functional.model.batches import BatchList
from lightning_curvature.functional.stability import StabilityThreshold, stability_threshold

__all__ = ["StepInstrumentsMonitor"]


class StepInstrumentsMonitor(OperatorMonitor):
    """An operator monitor that also reads the optimizer step: its gradient and its update.

    Args:
        gradient_share: keep the top-k eigenvectors a probe found (set ``_basis`` in
            ``measure``) and log the training gradient's share of their span.
        update_sharpness: copy the weights before a step after which a probe is due, for
            :meth:`_update_sharpness` to measure the curvature along the update.
        **kwargs: see ``OperatorMonitor``.

    Both are documented with ``HessianEigenvalueMonitor``.

    Example:
        >>> StepInstrumentsMonitor(update_sharpness=True).extra_state()  # no copy yet
        {}
    """

    def __init__(
        self, *, gradient_share: bool = False, update_sharpness: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.gradient_share, self.update_sharpness = gradient_share, update_sharpness
        self._basis: tuple[int, torch.Tensor] | None = None  # (step, top-k eigenvectors)
        self._last_update = LastUpdate()  # w_{t−1}, copied before a step a probe follows

    def _measured(self, pl_module: pl.LightningModule) -> list[torch.Tensor]:
        """The parameters the last probe measured (their names resolved then)."""
        return [p for _, p in self.measured_tensors(pl_module)]

    def _measured_names(self, pl_module: pl.LightningModule) -> tuple[str, ...]:
        return tuple(name for name, _ in self.measured_tensors(pl_module))

    @override
    def check_sharding(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().check_sharding(trainer, pl_module)
        extras = [n for n in ("gradient_share", "update_sharpness") if getattr(self, n)]
        if extras and sharding(trainer) == "fsdp2":
            raise MisconfigurationException(
                f"`HessianEigenvalueMonitor` under ModelParallelStrategy: "
                f"{', '.join(f'{n}=True' for n in extras)} is not implemented over sharded "
                "parameters (its gradients and updates would be shards); leave it False."
            )

    def _threshold(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stability: bool
    ) -> StabilityThreshold | None:
        """The first optimizer's threshold now, if ``stability`` or the update's ratio needs it.

        ``None``: not needed, no optimizer, or an unknown one (said once).
        """
        if not (stability or self.update_sharpness) or not trainer.optimizers:
            return None
        found = stability_threshold(trainer.optimizers[0], self._measured(pl_module))
        if found is None:
            self.warn_once(
                "optimizer",
                f"no stability threshold is known for {type(trainer.optimizers[0]).__name__}.",
            )
        return found

    def _update_sharpness(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batches: list[Any],
        found: StabilityThreshold | None,
        metrics: dict[str, float | torch.Tensor],
    ) -> int:
        """``uᵀHu/‖u‖²`` along the last update (one product); 0 products if none is known."""
        update = self._last_update.take(
            trainer.global_step, self._measured(pl_module), self._measured_names(pl_module)
        )
        if update is None:  # no copy from the step before (step 0, a resumed run's first
            return 0  # probe), or the measured parameters changed since (said in a warning)
        out = directional_curvature(
            pl_module,
            self.probe_loss_fn(),
            BatchList(batches),
            update,
            parameters=self.measured_parameters,
            backend=self.backend,
            batch_norm=self.batch_norm,
            all_reduce=self.all_reduce(trainer),
            curvature=self.curvature,
        )
        metrics["curvature/update_sharpness"] = out.value
        if found is None or not math.isfinite(found.threshold):
            return out.num_hvps
        if found.kind == "sgd":
            metrics["curvature/update_sharpness_ratio"] = float(out.value) / found.limit
        elif found.preconditioner is not None:
            # P⁻¹H ~ D H D with D = P^{-1/2}: along z = D⁻¹u its Rayleigh quotient is
            # uᵀHu / uᵀD⁻²u (coordinates with D = 0 are not optimized: u is 0 there).
            scale = found.preconditioner.to(update)
            moved = scale > 0
            metric = inner_products(update[moved] / scale[moved], update[moved] / scale[moved])
            preconditioned = out.quadratic_form / metric
            metrics["curvature/preconditioned_update_sharpness"] = preconditioned
            metrics["curvature/update_sharpness_ratio"] = float(preconditioned) / found.threshold
        return out.num_hvps

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._basis is not None:
            step, basis = self._basis
            self._basis = None
            if step == trainer.global_step:  # the training gradient of the probed weights
                measured = self._measured(pl_module)
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in measured]
                flat = flat_copy(grads, basis.dtype)
                finite = bool(torch.isfinite(flat).all())  # (an overflowed AMP step: not)
                share = float(subspace_share(flat, basis)) if finite else math.nan
                values = self._warnings.finite(
                    {self.tag("curvature/training_gradient_top_share"): share}, step
                )
                self.last_metrics.update(values)
                log_scalars(trainer, values, log_step(trainer))
        if self.update_sharpness:
            self._last_update.keep_if_due(
                trainer,
                self.schedule,
                self._measured(pl_module),
                self._measured_names(pl_module),
            )

    @override
    def extra_state(self) -> dict[str, Any]:
        # (a checkpoint between the copy and its probe keeps the copy)
        return {**super().extra_state(), **self._last_update.state_dict()}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self._last_update.load_state_dict(state)
