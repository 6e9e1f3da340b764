"""``HessianEigenvalueMonitor``: sharpness against the optimizer's edge of stability."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_curvature.callbacks.eigenvalue_charts import eigenvalue_charts
from lightning_curvature.callbacks.layers import PerLayerMonitor
from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.reporting.dashboard import Charts, layout
from lightning_curvature.callbacks.schedule import EveryNSteps
from lightning_curvature.callbacks.sharpness_picture import write_sharpness_picture
from lightning_curvature.callbacks.step_instruments import StepInstrumentsMonitor
from lightning_curvature.callbacks.warm_starts import WarmStartDevice, WarmStarts
from lightning_curvature.checks import check_choice
from lightning_curvature.functional.directional import subspace_share
from lightning_curvature.functional.eigenvalues import (
    check_eigenvalue_arguments,
    hessian_eigenvalues,
)
from lightning_curvature.functional.linalg.sharded import local_tensor
from lightning_curvature.functional.model.batches import BatchList
from lightning_curvature.functional.model.parameters import PerLayer, select_parameters
from lightning_curvature.functional.model.probe import (
    BatchNormMode,
    module_device,
    unwrap_model,
)
from lightning_curvature.functional.stability import StabilityThreshold

__all__ = ["HessianEigenvalueMonitor"]

_WARM_START_DEVICES = get_args(WarmStartDevice)


class HessianEigenvalueMonitor(PerLayerMonitor, StepInstrumentsMonitor):
    """Top-k Hessian eigenvalues (sharpness) next to the optimizer's stability threshold.

    Lanczos with full reorthogonalisation, warm-started from the previous probe's top
    ``k + 1`` Ritz vectors (about 6-16 Hessian-vector products per probe once warm, for
    ``tol=1e-3``, until the eigenvalue below the top k has converged too). The first probe
    (and the first after a resume without warm starts) is cold: it goes on until the chance
    that its random start missed a larger eigenvalue is below 10⁻³ (20-33 products on the
    digits edge-of-stability run; ``HessianEigenvalues.converged`` says what each start
    certifies). The threshold is read from the first optimizer at the probe's step: ``2/lr``
    for SGD, ``(2 + 2β)/lr`` with heavy-ball momentum β, ``(2 + 2β)/((1 + 2β) lr)`` with
    Nesterov momentum, plus coupled weight decay; for Adam/AdamW the preconditioned
    sharpness ``λ₁(P⁻¹H)`` (one more Lanczos run) is compared with
    ``(2 + 2β₁)/((1 − β₁) lr)`` = 38/lr (Cohen et al. 2021, 2022).

    Args:
        k: number of top eigenvalues.
        tol: relative error bound of each eigenvalue.
        max_iter: most Hessian-vector products per Lanczos run (default ``40 + 10k``; 1.3x
            that above ``FULL_BASIS_ENTRIES``, where the basis is held to a few rows).
        stability: log the stability threshold and the sharpness ratio.
        smallest: also log the smallest (most negative) eigenvalue.
        per_layer: blocks of measured parameters with a top eigenvalue of their own (one
            more Lanczos run each, on the Hessian of the block), logged under
            ``curvature/eigenvalue_1/<name>``: ``True`` (one per module), a list of
            parameter-name patterns, or a dict of tag name to pattern(s); see
            :mod:`~lightning_curvature.callbacks.layers`.
        warm_start: start each Lanczos run from the previous run's top ``k + 1`` Ritz
            vectors (``HessianEigenvalues.warm_start``): ``(k + 1) × P`` values kept per
            Lanczos run of a probe (the full model, each ``per_layer`` block, Adam's
            preconditioned run).
        warm_start_device: where those vectors wait between probes: ``"model"`` (default,
            the model's device) or ``"cpu"`` (host memory; moved to the device for the run
            only, ``(k + 1) × P`` values each way per probe), which frees ``(k + 1) × P``
            of accelerator memory per run between probes.
        checkpoint_warm_start: save them in checkpoints too, so that a resumed run logs
            exactly what the uninterrupted run does, for ``(k + 1) × P`` float32 values per
            run on disk (twice the weights for ``k = 1``). ``False`` (default): the first
            probe after a resume starts cold (values within ``tol``, not bit for bit, a few
            more products; :mod:`~lightning_curvature.callbacks.warm_starts`).
        gradient_share: also log the share ``‖P_k g‖²/‖g‖²`` of the gradient in the span of
            the top-k eigenvectors (Gur-Ari, Roberts & Dyer 2018): of the probe gradient
            (free: the Lanczos operator holds it) and of the training gradient of the probed
            step, read from ``.grad`` in ``on_before_optimizer_step`` (after accumulation,
            unscaling and the DDP all-reduce, before clipping; nothing is written). The
            eigenvectors are kept from the probe to that hook (``k × P`` on the model's
            device, a view of the warm start when it stays there). It is as accurate as the
            eigenvectors, whose error goes as the square root of the eigenvalues' (``tol``):
            lower ``tol`` for a sharper share.
        update_sharpness: also log the curvature ``uᵀHu/‖u‖²`` of the probe loss along the
            optimizer's last update ``u = w_t − w_{t−1}`` (any optimizer: SGD, momentum,
            Adam) and its ratio to the threshold. The weights are copied (one ``P``-vector,
            in the checkpoint while pending) only in ``on_before_optimizer_step`` of a step
            after which a probe is due; it costs one more gradient of the probe batch and
            one Hessian-vector product. No value at step 0 (no update yet). Both are of the
            whole measured model, not per block: a block's share or curvature along the
            update needs that block's own eigenvectors or product (``H_ll u_l``), not the
            full model's. Under ``SAM`` the training gradient is the SAM gradient ``.grad``
            then holds.
        prog_bar: show ``eigenvalue_1`` in the progress bar.
        every_n_steps: probe every this many optimizer steps; ``"auto"`` (default): the
            shared budget's cadence over the run (``CurvatureMonitor``), 500 if unknown.
        batch_norm: ``"train"`` (default here: batch statistics, the landscape the optimizer
            steps on, which is what the stability threshold refers to) or ``"eval"``
            (running statistics, the inference-time landscape). The chart titles say which.
        **kwargs: cadence, probe data, loss, ``curvature`` (``"ggn"``: the eigenvalues of
            the generalized Gauss–Newton matrix, see ``OperatorMonitor``) and the rest: see
            ``CurvatureMonitor``.

    Logged metrics:
        - ``curvature/eigenvalue_1`` … ``curvature/eigenvalue_k``
        - ``curvature/stability_threshold``: the value of the compared eigenvalue at which
          the step turns unstable (SGD: ``(2 + 2β)/η`` less the coupled weight decay, which
          shifts every eigenvalue of the optimized loss; Adam: 38/η for ``λ₁(P⁻¹H)``)
        - ``curvature/sharpness_ratio``: exactly ``eigenvalue_1 / stability_threshold``
          (``preconditioned_eigenvalue_1 / stability_threshold`` for Adam), ≈ 1 at the
          edge of stability; neither at a step whose learning rate is 0 (a warmup's first
          step: no threshold, one warning)
        - ``curvature/preconditioned_eigenvalue_1`` (Adam/AdamW)
        - ``curvature/eigenvalue_min`` (with ``smallest=True``)
        - ``curvature/eigenvalue_1/<name>`` (with ``per_layer``)
        - ``curvature/gradient_top_share`` and ``curvature/training_gradient_top_share``
          (with ``gradient_share``): ``‖P_k g‖²/‖g‖²`` of the probe and the training gradient
        - ``curvature/update_sharpness`` (with ``update_sharpness``): ``uᵀHu/‖u‖²``;
          ``curvature/update_sharpness_ratio``: it over the SGD threshold, or for Adam the
          preconditioned ``uᵀHu/(uᵀPu)`` (``curvature/preconditioned_update_sharpness``,
          the Rayleigh quotient of ``P⁻¹H`` along u) over 38/η
        - ``probe_cost/eigenvalue_hvps`` and ``probe_cost/eigenvalue_seconds``: cost of the probe
        - TensorBoard only: image ``curvature/sharpness_chart``, the run so far (log axis, legend)
        - with ``name=``: every tag as ``<group>/<name>/…``
        - with ``curvature="ggn"``: every tag with ``ggn_`` before its name
          (``curvature/ggn_eigenvalue_1``, ``curvature/ggn_sharpness_ratio``, …)

    Raises:
        MisconfigurationException: on invalid arguments (at construction), or without a
            logger, under a sharded strategy, with manual optimization and no ``loss_fn``,
            or with ``k`` above the number of measured parameters or a ``parameters`` or
            ``per_layer`` pattern that matches no measured parameter (at setup).

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = HessianEigenvalueMonitor(k=2, every_n_steps=50)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=1, enable_progress_bar=False)
    """

    shardable = True  # FSDP2: finite differences over sharded vectors

    cost_name = "eigenvalue"
    default_every_n_steps = 500
    state_key_arguments = (
        "k",
        "tol",
        "max_iter",
        "stability",
        "smallest",
        "per_layer",
        "warm_start",
        "gradient_share",
        "update_sharpness",
    )

    def __init__(
        self,
        k: int = 1,
        tol: float = 1e-3,
        max_iter: int | None = None,
        *,
        stability: bool = True,
        smallest: bool = False,
        per_layer: PerLayer = False,
        warm_start: bool = True,
        warm_start_device: WarmStartDevice = "model",
        checkpoint_warm_start: bool = False,
        gradient_share: bool = False,
        update_sharpness: bool = False,
        prog_bar: bool = False,
        every_n_steps: EveryNSteps = "auto",
        batch_norm: BatchNormMode = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            per_layer=per_layer,
            gradient_share=gradient_share,
            update_sharpness=update_sharpness,
            every_n_steps=every_n_steps,
            batch_norm=batch_norm,
            **kwargs,
        )
        flags = {"stability": stability, "smallest": smallest, "warm_start": warm_start}
        flags |= {"checkpoint_warm_start": checkpoint_warm_start, "prog_bar": prog_bar}
        flags |= {"gradient_share": gradient_share, "update_sharpness": update_sharpness}
        try:
            check_eigenvalue_arguments(k, tol, max_iter, **flags)
            check_choice("warm_start_device", warm_start_device, _WARM_START_DEVICES)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        self.k, self.tol, self.max_iter = k, float(tol), max_iter
        self.stability, self.smallest, self.prog_bar = stability, smallest, prog_bar
        self.warm_start, self.warm_start_device = warm_start, warm_start_device
        self.checkpoint_warm_start = checkpoint_warm_start
        self._warm = WarmStarts(warm_start_device, checkpoint_warm_start)
        self._final_probe = False  # Lightning forbids self.log in on_train_end

    def _eigenvalues(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batches: list[Any],
        key: str,
        **overrides: Any,
    ) -> Any:
        kwargs = {**self.probe_kwargs(trainer, pl_module), **overrides}
        named = select_parameters(unwrap_model(pl_module), kwargs["parameters"])
        names = tuple(name for name, _ in named)
        # this process's shard under FSDP2, whose warm starts are shards too
        size = sum(local_tensor(p).numel() for _, p in named)
        warm = self._warm.get(key, names, size) if self.warm_start else None
        kwargs.setdefault("return_eigenvectors", self.warm_start)
        result = hessian_eigenvalues(
            pl_module,
            self.probe_loss_fn(),
            BatchList(batches),
            kwargs.pop("k", self.k),
            self.tol,
            max_iter=self.max_iter,
            init=None if warm is None else warm.to(module_device(pl_module)),
            **kwargs,
        )
        if self.warm_start and result.warm_start is not None:
            self._warm.put(key, names, result.warm_start)
        return result

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> Measurement:
        share = (
            {"return_eigenvectors": True, "return_gradient": True} if self.gradient_share else {}
        )
        result = self._eigenvalues(
            trainer, pl_module, batches, "full", smallest=self.smallest, **share
        )
        metrics: dict[str, float | torch.Tensor] = {
            f"curvature/eigenvalue_{i + 1}": value for i, value in enumerate(result.eigenvalues)
        }
        hvps = result.num_hvps
        if self.smallest:
            metrics["curvature/eigenvalue_min"] = result.smallest_eigenvalue
        if self.gradient_share:
            assert result.eigenvectors is not None
            assert result.gradient is not None
            metrics["curvature/gradient_top_share"] = subspace_share(
                result.gradient, result.eigenvectors
            )
            self._basis = (trainer.global_step, result.eigenvectors)
        found = self._threshold(trainer, pl_module, self.stability)
        if self.stability and found is not None:
            hvps += self._stability(
                trainer, pl_module, batches, float(result.eigenvalues[0]), found, metrics
            )
        if self.update_sharpness:
            hvps += self._update_sharpness(trainer, pl_module, batches, found, metrics)
        for name, names in self.block_parameters(pl_module).items():
            block = self._eigenvalues(
                trainer, pl_module, batches, f"layer:{name}", k=1, parameters=names
            )
            metrics[f"curvature/eigenvalue_1/{name}"] = block.eigenvalues[0]
            hvps += block.num_hvps
        return Measurement(metrics, hvps)

    @override
    def expected_cost(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """~24 products a cold Lanczos run (the first probe), +10 an eigenvalue past one."""
        adam = self.stability and "Adam" in type(next(iter(trainer.optimizers), None)).__name__
        blocks = self.blocks.of_module(pl_module, self.parameters) if self.blocks.requested else {}
        hvps = (1 + adam + self.smallest + len(blocks)) * (24 + 10 * (self.k - 1))
        return self.hvp_gradients * (hvps + 2 * self.update_sharpness) * self.probe_batches

    @override
    def log_extras(self, trainer: pl.Trainer, step: int) -> None:
        if self.stability:  # the headline as a picture: legend, log axis (TensorBoard only)
            write_sharpness_picture(trainer, self, step)
        tag = self.tag("curvature/eigenvalue_1")
        top = self.last_metrics.get(tag)
        if self.prog_bar and not self._final_probe and top is not None:
            # (after the probe: its isolation silences the module's log)
            trainer.lightning_module.log(tag, top, prog_bar=True, logger=False)

    @override
    def check_model(self, pl_module: pl.LightningModule) -> None:
        super().check_model(pl_module)  # the patterns, the per_layer blocks
        size = self.measured_size(pl_module)
        if self.k > size:
            raise MisconfigurationException(
                f"`k` must be at most the number of measured parameters ({size}) of "
                f"{type(pl_module).__name__}, got k={self.k}."
            )

    parameter_change_effect = "probes measure the new set from this one on, starting cold"

    @override
    def resolve_parameters(
        self, pl_module: pl.LightningModule, step: int, effect: str | None = None
    ) -> bool:
        if not super().resolve_parameters(pl_module, step, effect):
            return False
        size = self.measured_size(pl_module)
        if self.k > size:
            why = f"at step {step} only {size} measured parameters are trainable, fewer than k"
            self.warn_once(f"k:{size}", f"{why}={self.k}: probes are skipped while so.")
        return self.k <= size

    def _stability(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batches: list[Any],
        top: float,
        found: StabilityThreshold,
        metrics: dict[str, float | torch.Tensor],
    ) -> int:
        if math.isinf(found.threshold):
            self.warn_once(
                "zero_lr",
                f"the learning rate is 0 at step {trainer.global_step}, so the stability "
                "threshold is infinite; the eigenvalues are logged, the threshold and the "
                "sharpness ratio are not.",
            )
            return 0
        if found.kind == "sgd":
            # η(λ₁ + wd) < 2 + 2β ⇔ λ₁ < threshold − wd: the threshold of λ₁ itself, so the
            # ratio is λ₁ / threshold exactly, as logged and charted.
            threshold = found.limit
            metrics["curvature/stability_threshold"] = threshold
            metrics["curvature/sharpness_ratio"] = top / threshold
            return 0
        metrics["curvature/stability_threshold"] = found.threshold
        if found.preconditioner is None:  # Adam before its first step: no preconditioner yet
            adam = f"step {trainer.global_step}: {type(trainer.optimizers[0]).__name__} has "
            said = "no preconditioner before its first step: λ₁(P⁻¹H), the ratio at the next probe."
            self.report.note_once(trainer, "adam", adam + said)
            return 0
        precond = self._eigenvalues(
            trainer, pl_module, batches, "preconditioned", k=1, preconditioner=found.preconditioner
        )
        metrics["curvature/preconditioned_eigenvalue_1"] = precond.eigenvalues[0]
        metrics["curvature/sharpness_ratio"] = float(precond.eigenvalues[0]) / found.threshold
        return int(precond.num_hvps)

    def warm_start_vectors(self, names: Sequence[str], size: int) -> torch.Tensor | None:
        """The last probe's top ``k + 1`` Ritz vectors over ``names`` (the landscape's too)."""
        return self._warm.get("full", names, size)

    @property
    def sharpness_quantity(self) -> str | None:
        """What this monitor puts on the raw sharpness chart: ``"λ₁"`` of the Hessian, if any.

        Example:
            >>> HessianEigenvalueMonitor().sharpness_quantity
            'λ₁'
        """
        return "λ₁" if self.stability and self.matrix[0] == "H" else None

    @override
    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Charts:
        science = eigenvalue_charts(
            trainer,
            pl_module,
            self.tag,
            matrix=self.matrix,
            k=self.k,
            batch_norm=self.batch_norm,
            name=self.name,
            stability=self.stability,
            smallest=self.smallest,
            blocks=self.blocks.requested,
            gradient_share=self.gradient_share,
            update_sharpness=self.update_sharpness,
        )
        return layout([{self.category("curvature"): science}, super().charts(trainer, pl_module)])

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._final_probe = True  # the final probe goes to the loggers, not the progress bar
        try:
            super().on_train_end(trainer, pl_module)
        finally:
            self._final_probe = False

    @override
    def extra_state(self) -> dict[str, Any]:
        # the update's copy too, if pending
        return {**self._warm.state_dict(), **super().extra_state()}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._warm.load_state_dict(state)
        super().load_extra_state(state)
