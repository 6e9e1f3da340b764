"""``LossLandscapeMonitor``: the loss along the directions that matter, beside its quadratic model.

**Why a monitor of its own**, not an option of ``HessianEigenvalueMonitor``: it draws
pictures, which are looked at every few hundred steps, not every probe of a curve; its
tags, image and cost are its own; and all it needs of the eigenvalue monitor is the
directions that monitor tracks, its warm-start vectors
(:attr:`~lightning_curvature.callbacks.eigenvalues.HessianEigenvalueMonitor.warm_start_vectors`),
which it reads and refines by a warm-started Lanczos run on its own probe (about 3
Hessian-vector products when the eigenvalue monitor has just probed the same Hessian, more
when the two probe different data or at different steps). So every slice runs along a
certified eigenvector of the Hessian it slices, whatever the two monitors' cadences and
probes, and the landscape monitor also runs without an eigenvalue monitor (from its own
warm start). The slice along the last update shares the eigenvalue monitor's copy of the
weights before a step (:class:`~lightning_curvature.callbacks.last_update.LastUpdate`).

What a probe draws, on which axis and what it logs:
:mod:`~lightning_curvature.callbacks.landscape_lines`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_curvature.callbacks.eigenvalues import HessianEigenvalueMonitor
from lightning_curvature.callbacks.landscape_lines import (
    eigenvector_lines,
    line_panels,
    line_scalars,
    update_line,
)
from lightning_curvature.callbacks.last_update import LastUpdate
from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.monitor import CurvatureMonitor
from lightning_curvature.callbacks.reporting.dashboard import (
    Charts,
    batch_norm_note,
    family,
    layout,
    multiline,
)
from lightning_curvature.callbacks.reporting.logging import tensorboard_writers
from lightning_curvature.callbacks.reporting.slice_rendering import slice_image
from lightning_curvature.callbacks.schedule import EveryNSteps
from lightning_curvature.callbacks.trainer import callbacks_of
from lightning_curvature.checks import check_flag, check_integer
from lightning_curvature.functional.eigenvalues import (
    check_eigenvalue_arguments,
    hessian_eigenvalues,
)
from lightning_curvature.functional.landscape import loss_slice
from lightning_curvature.functional.linalg.sharded import VectorShards, fsdp_shards, local_tensor
from lightning_curvature.functional.model.batches import BatchList
from lightning_curvature.functional.model.parameters import select_parameters
from lightning_curvature.functional.model.probe import BatchNormMode, unwrap_model
from lightning_curvature.functional.optimizer_update import next_update

__all__ = ["LossLandscapeMonitor"]

_KEYS = r"(\d+|update)"


class LossLandscapeMonitor(CurvatureMonitor):
    """The loss along the top Hessian eigenvectors and the last update, and its quadratic model.

    At each probe: the top ``k`` eigenvectors (Lanczos warm-started from the eigenvalue
    monitor's vectors, or its own), then one slice along each and along the optimizer's last
    update ``u = w_t − w_{t−1}``: ``num_points + 2`` forward passes each at copies of the
    weights displaced along the line, beside the second-order model ``L₀ + t·gᵀd + ½t²·dᵀHd``
    from the same probe (one Hessian-vector product per line). Distances along an
    eigenvector are in lengths of the optimizer's next step (read from its state; for another
    optimizer, the last update's length), with that step's landing point and ``2/λ`` (where
    the quadratic model is back at ``L(w)``) marked: gradient descent is at the edge of
    stability along ``v`` when the two marks meet. Along the update, in multiples of ``u``
    (``−1``: the weights before the step). See
    :mod:`~lightning_curvature.callbacks.landscape_lines`.

    Args:
        k: slices along the top ``k`` eigenvectors.
        num_points: evenly spaced points per line (odd, >= 5, the current weights among
            them), in ``[−2, 2]`` step lengths or wider to show both marks; ``±1`` and the
            step are added.
        update: also slice along the last update (its weights copied, one ``P``-vector,
            in ``on_before_optimizer_step`` of the step before a probe; no such slice at
            step 0).
        tol: relative error bound of the eigenvalues (see ``hessian_eigenvalues``).
        images: write the picture of every probe (TensorBoard).
        every_n_steps: probe cadence (``"auto"``: 2000, a multiple of the eigenvalue
            monitor's 500, so that it starts from vectors of the same step; a probe with
            ``k=1`` costs about 20-60 training steps, 1-3% of training at this cadence,
            ``benchmarks/README.md``).
        batch_norm: ``"train"`` (default: batch statistics, as the eigenvalue monitor) or
            ``"eval"``.
        **kwargs: cadence, probe data, loss and the rest: see ``CurvatureMonitor``.

    Logged metrics (``<key>``: ``1`` … ``k`` for the eigenvectors, ``update``):
        - ``landscape/curvature_<key>``: ``dᵀHd/‖d‖²`` (``λ_i`` along ``v_i``)
        - ``landscape/secant_curvature_<key>``: ``[L(h) + L(−h) − 2L₀]/‖h‖²`` one step length
          ``h`` away on either side: the curvature at the scale the optimizer moves (equal to
          the first on a quadratic)
        - ``landscape/asymmetry_<key>``: ``[L(h) − L(−h) − 2gᵀh]/[L(h) + L(−h) − 2L₀]``
          (0 on a quadratic; the cubic term's share)
        - ``landscape/step_loss_change_<key>`` and ``landscape/quadratic_step_loss_change_<key>``:
          the loss change at the optimizer's step along the line (along ``v_i``: what the
          next step's component along ``v_i`` does to the loss; along ``u``: one more such
          step), measured and as the quadratic model has it
        - ``probe_cost/landscape_hvps``, ``_forwards``, ``_seconds``
        - TensorBoard only: the image ``landscape/slices``, one panel per line
        - with ``name=``: every tag as ``<group>/<name>/…``

    Checkpoints hold the copy of the weights for a pending update slice, not the warm-start
    vectors (``(k + 1)·P`` values): after a resume the first probe starts Lanczos from the
    eigenvalue monitor's vectors or cold, and its eigenvalues agree to ``tol``.

    Values read from loss differences the float32 forward passes do not resolve (below 64
    roundings of ``L(w)``) are not logged; nor, with one warning, values read at points
    whose loss is not finite.

    Under ``ModelParallelStrategy`` (FSDP2, ``fully_shard``) every direction is held as each
    process's shard of it, each point of a slice is one forward pass with the local shards
    displaced in place (restored exactly after it), and the inner products are summed over
    the shards: every process logs the union batch's slices (the products by finite
    differences, so on a smooth model, as the eigenvalue monitor there).

    Raises:
        MisconfigurationException: on invalid arguments (at construction), and at setup as
            ``CurvatureMonitor`` does.

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = LossLandscapeMonitor(k=2, every_n_steps=200)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=1, enable_progress_bar=False)
    """

    cost_name = "landscape"
    counts_forwards = True
    default_every_n_steps = 2000
    state_key_arguments = ("k", "num_points", "update", "tol")
    shardable = True  # FSDP2: directions as shards, the points displaced in place

    def __init__(
        self,
        k: int = 1,
        *,
        num_points: int = 13,
        update: bool = True,
        tol: float = 1e-3,
        images: bool = True,
        every_n_steps: EveryNSteps = "auto",
        batch_norm: BatchNormMode = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, batch_norm=batch_norm, **kwargs)
        try:
            check_eigenvalue_arguments(k, tol)
            check_integer("num_points", num_points, 5)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        if num_points % 2 == 0:
            raise MisconfigurationException(
                f"`num_points` must be odd (the current weights among them), got {num_points}."
            )
        check_flag("update", update, error=MisconfigurationException)
        check_flag("images", images, error=MisconfigurationException)
        self.k, self.num_points, self.update, self.tol = k, num_points, update, float(tol)
        self.images = images
        self._warm: torch.Tensor | None = None
        self._last_update = LastUpdate()
        self._picture: tuple[list[Any], str] | None = None  # panels and title of the last probe

    def _measured(self, pl_module: pl.LightningModule) -> list[torch.Tensor]:
        return [p for _, p in select_parameters(unwrap_model(pl_module), self.parameters)]

    def _init(self, trainer: pl.Trainer, names: Sequence[str], size: int) -> torch.Tensor | None:
        """The eigenvalue monitor's warm-start vectors if they are over ``names``, else ours."""
        for monitor in callbacks_of(trainer, HessianEigenvalueMonitor):
            vectors = monitor.warm_start_vectors(names, size)
            if monitor.curvature == "hessian" and vectors is not None:
                return vectors
        if self._warm is not None and self._warm.shape[-1] == size:
            return self._warm
        return None

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> Measurement:
        measured = self._measured(pl_module)
        size = sum(local_tensor(p).numel() for p in measured)  # FSDP2: this shard's
        shards = fsdp_shards(measured) or VectorShards.single(size)
        update = self._last_update.take(trainer.global_step, measured) if self.update else None
        kwargs = self.probe_kwargs(trainer, pl_module)
        names = [name for name, _ in select_parameters(unwrap_model(pl_module), self.parameters)]
        init = self._init(trainer, names, size)
        top = hessian_eigenvalues(
            pl_module,
            self.probe_loss_fn(),
            BatchList(batches),
            self.k,
            self.tol,
            init=None if init is None else init.to(pl_module.device),
            return_eigenvectors=True,
            return_gradient=True,
            **kwargs,
        )
        assert top.eigenvectors is not None
        assert top.gradient is not None
        self._warm = top.warm_start
        step = self._step(trainer, measured, top.gradient, update, shards)
        lines = (
            []
            if step is None
            else eigenvector_lines(
                top.eigenvalues, top.eigenvectors, top.gradient, step, self.num_points, shards
            )
        )
        if update is not None and shards.any_true(bool(update.any()), update.device):
            lines.append(update_line(update, self.num_points))
        if not lines:
            self.warn_once(
                "no_line",
                f"at step {trainer.global_step} neither the optimizer's next step nor its last "
                "update is known (or both are zero): no length to slice in; nothing is logged.",
            )
            return Measurement({}, hvps=top.num_hvps, forwards=0)
        kwargs.pop("generator")
        result = loss_slice(
            pl_module,
            self.probe_loss_fn(),
            BatchList(batches),
            torch.stack([line.direction for line in lines]),
            torch.stack([line.offsets for line in lines]),
            **kwargs,
        )
        metrics = line_scalars(result, lines)
        bad = int((~torch.isfinite(result.losses)).sum())
        if bad:
            self.warn_once(
                "non_finite_slice",
                f"the loss is not finite at {bad} point(s) of the slices at step "
                f"{trainer.global_step}: they are left out of the picture, and the values "
                "read from them are not logged.",
            )
            metrics = {k: v for k, v in metrics.items() if bool(torch.isfinite(v))}
        self._picture = (line_panels(result, lines), self._title(trainer, pl_module))
        return Measurement(
            metrics, hvps=top.num_hvps + result.num_hvps, forwards=result.num_forwards
        )

    def _step(
        self,
        trainer: pl.Trainer,
        measured: list[torch.Tensor],
        gradient: torch.Tensor,
        update: torch.Tensor | None,
        shards: VectorShards,
    ) -> torch.Tensor | None:
        """The optimizer's next step from the probe gradient, else its last update, else None.

        Under FSDP2 this process's shard of it, and ``None`` only where it is zero on every
        process (every process decides alike).
        """
        found = None
        if trainer.optimizers:
            found = next_update(trainer.optimizers[0], measured, gradient)
        step = found.step.to(gradient) if found is not None else update
        if step is None or not shards.any_true(bool(step.any()), step.device):
            return None
        return step

    def _title(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        note = batch_norm_note(pl_module, self.batch_norm)
        return f"loss slices at step {trainer.global_step}{note}"

    @override
    def log_extras(self, trainer: pl.Trainer, step: int) -> None:
        picture, self._picture = self._picture, None
        if not self.images or picture is None:
            return
        writers = list(tensorboard_writers(trainer))
        if not writers:
            return
        image = slice_image(picture[0], title=picture[1])
        for writer in writers:
            writer.add_image(self.tag("landscape/slices"), image, global_step=step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.update:
            self._last_update.keep_if_due(trainer, self.schedule, self._measured(pl_module))

    @override
    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Charts:
        tag = self.tag
        science = {
            "secant curvature at the optimizer's step vs. the quadratic model's": multiline(
                family(tag("landscape/secant_curvature_"), _KEYS),
                family(tag("landscape/curvature_"), _KEYS),
            ),
            "loss change at the optimizer's step along each line: measured, quadratic": (
                multiline(
                    family(tag("landscape/step_loss_change_"), _KEYS),
                    family(tag("landscape/quadratic_step_loss_change_"), _KEYS),
                )
            ),
            "asymmetry of each slice at the step (0: quadratic)": multiline(
                family(tag("landscape/asymmetry_"), _KEYS)
            ),
        }
        return layout([{self.category("landscape"): science}, super().charts(trainer, pl_module)])

    @override
    def extra_state(self) -> dict[str, Any]:
        return self._last_update.state_dict()  # a copy pending at a checkpoint

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._last_update.load_state_dict(state)
