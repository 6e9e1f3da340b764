"""``HessianEigenvalueMonitor``: sharpness against the optimizer's edge of stability."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_curvature.callbacks.dashboard import (
    Charts,
    batch_norm_note,
    exact,
    family,
    layout,
    multiline,
    threshold_label,
)
from lightning_curvature.callbacks.layers import PerLayerMonitor
from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.operator_monitor import OperatorMonitor
from lightning_curvature.callbacks.schedule import EveryNSteps
from lightning_curvature.functional.batches import BatchList
from lightning_curvature.functional.eigenvalues import (
    check_eigenvalue_arguments,
    hessian_eigenvalues,
)
from lightning_curvature.functional.parameters import PerLayer, select_parameters
from lightning_curvature.functional.probe import BatchNormMode, unwrap_model
from lightning_curvature.functional.stability import stability_threshold

__all__ = ["HessianEigenvalueMonitor"]


class HessianEigenvalueMonitor(PerLayerMonitor, OperatorMonitor):
    """Top-k Hessian eigenvalues (sharpness) next to the optimizer's stability threshold.

    Lanczos with full reorthogonalisation, warm-started from the previous probe's top
    ``k + 1`` Ritz vectors (about 6-9 Hessian-vector products per probe once warm, 7-16
    cold, for ``tol=1e-3``; the run goes on until the eigenvalue below the top k has
    converged too, so that an eigenvalue the start vector barely saw is not missed). The
    threshold is read from the first optimizer at the probe's step: ``2/lr`` for SGD,
    ``(2 + 2β)/lr`` with heavy-ball momentum β, ``(2 + 2β)/((1 + 2β) lr)`` with Nesterov
    momentum, plus coupled weight decay; for Adam/AdamW the preconditioned sharpness
    ``λ₁(P⁻¹H)`` (one more Lanczos run) is compared with ``(2 + 2β₁)/((1 − β₁) lr)`` =
    38/lr (Cohen et al. 2021, 2022).

    Args:
        k: number of top eigenvalues.
        tol: relative error bound of each eigenvalue.
        max_iter: most Hessian-vector products per Lanczos run (default ``30 + 8k``).
        stability: log the stability threshold and the sharpness ratio.
        smallest: also log the smallest (most negative) eigenvalue.
        per_layer: blocks of measured parameters with a top eigenvalue of their own (one
            more Lanczos run each, on the Hessian of the block), logged under
            ``curvature/eigenvalue_1/<name>``: ``True`` (one per module), a list of
            parameter-name patterns, or a dict of tag name to pattern(s); see
            :mod:`~lightning_curvature.callbacks.layers`.
        warm_start: start each Lanczos run from the previous run's top ``k + 1`` Ritz
            vectors (``HessianEigenvalues.warm_start``).
        prog_bar: show ``eigenvalue_1`` in the progress bar.
        every_n_steps: probe every this many optimizer steps (``"auto"``: 500, as a warm
            probe takes about 6-9 Hessian-vector products, some 10-20 gradients of the probe
            batch, so about 2-4% of training where a step is one such gradient).
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
        - ``probe_cost/eigenvalue_hvps`` and ``probe_cost/eigenvalue_seconds``: cost of the probe
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
        prog_bar: bool = False,
        every_n_steps: EveryNSteps = "auto",
        batch_norm: BatchNormMode = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            per_layer=per_layer, every_n_steps=every_n_steps, batch_norm=batch_norm, **kwargs
        )
        try:
            check_eigenvalue_arguments(k, tol, max_iter)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        self.k, self.tol, self.max_iter = k, float(tol), max_iter
        self.stability, self.smallest, self.warm_start, self.prog_bar = (
            stability,
            smallest,
            warm_start,
            prog_bar,
        )
        self._warm: dict[str, torch.Tensor] = {}
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
        warm = self._warm.get(key) if self.warm_start else None
        size = sum(
            p.numel() for _, p in select_parameters(unwrap_model(pl_module), kwargs["parameters"])
        )
        if warm is not None and warm.shape[-1] != size:
            warm = None  # the trainable parameters changed (e.g. unfreezing): start cold
        result = hessian_eigenvalues(
            pl_module,
            self.probe_loss_fn(),
            BatchList(batches),
            kwargs.pop("k", self.k),
            self.tol,
            max_iter=self.max_iter,
            init=None if warm is None else warm.to(pl_module.device),
            return_eigenvectors=self.warm_start,
            **kwargs,
        )
        if self.warm_start and result.warm_start is not None:
            self._warm[key] = result.warm_start.detach()
        return result

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> Measurement:
        result = self._eigenvalues(trainer, pl_module, batches, "full", smallest=self.smallest)
        metrics: dict[str, float | torch.Tensor] = {
            f"curvature/eigenvalue_{i + 1}": value for i, value in enumerate(result.eigenvalues)
        }
        hvps = result.num_hvps
        if self.smallest:
            metrics["curvature/eigenvalue_min"] = result.smallest_eigenvalue
        if self.stability and trainer.optimizers:
            hvps += self._stability(
                trainer, pl_module, batches, float(result.eigenvalues[0]), metrics
            )
        for name, names in self.blocks.of_module(pl_module, self.parameters).items():
            block = self._eigenvalues(
                trainer, pl_module, batches, f"layer:{name}", k=1, parameters=names
            )
            metrics[f"curvature/eigenvalue_1/{name}"] = block.eigenvalues[0]
            hvps += block.num_hvps
        return Measurement(metrics, hvps)

    @override
    def log_extras(self, trainer: pl.Trainer, step: int) -> None:
        tag = self.tag("curvature/eigenvalue_1")
        top = self.last_metrics.get(tag)
        if self.prog_bar and not self._final_probe and top is not None:
            # (after the probe: its isolation silences the module's log)
            trainer.lightning_module.log(tag, top, prog_bar=True, logger=False)

    @override
    def check_model(self, pl_module: pl.LightningModule) -> None:
        size = self.measured_size(pl_module)
        if self.k > size:
            raise MisconfigurationException(
                f"`k` must be at most the number of measured parameters ({size}) of "
                f"{type(pl_module).__name__}, got k={self.k}."
            )
        super().check_model(pl_module)  # the per_layer blocks

    def _stability(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batches: list[Any],
        top: float,
        metrics: dict[str, float | torch.Tensor],
    ) -> int:
        measured = [p for _, p in select_parameters(unwrap_model(pl_module), self.parameters)]
        found = stability_threshold(trainer.optimizers[0], measured)
        if found is None:
            self.warn_once(
                "optimizer",
                f"no stability threshold is known for {type(trainer.optimizers[0]).__name__}.",
            )
            return 0
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
        if found.preconditioner is None:
            return 0  # Adam before its first step has no preconditioner yet
        precond = self._eigenvalues(
            trainer, pl_module, batches, "preconditioned", k=1, preconditioner=found.preconditioner
        )
        metrics["curvature/preconditioned_eigenvalue_1"] = precond.eigenvalues[0]
        metrics["curvature/sharpness_ratio"] = float(precond.eigenvalues[0]) / found.threshold
        return int(precond.num_hvps)

    @override
    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Charts:
        # Adam's threshold is one of λ₁(P⁻¹H), SGD's one of λ₁(H): each chart holds the
        # quantity its threshold refers to, and the raw spectrum has a chart of its own.
        note = batch_norm_note(pl_module, self.batch_norm)
        symbol = self.matrix[0]  # H or G
        top_of = "λ₁" if symbol == "H" else f"λ₁({symbol})"
        ratio, threshold = self.tag("curvature/sharpness_ratio"), None
        if self.stability and trainer.optimizers:
            threshold = threshold_label(trainer.optimizers[0])
        science: dict[str, list[Any]] = {}
        if threshold is not None and isinstance(trainer.optimizers[0], torch.optim.SGD):
            science[f"sharpness {top_of} vs. stability threshold {threshold}{note}"] = multiline(
                exact(self.tag("curvature/eigenvalue_1")),
                exact(self.tag("curvature/stability_threshold")),
            )
            science[f"sharpness ratio {top_of} / threshold"] = multiline(exact(ratio))
        elif threshold is not None:
            science[f"preconditioned sharpness λ₁(P⁻¹{symbol}) vs. threshold {threshold}{note}"] = (
                multiline(
                    exact(self.tag("curvature/preconditioned_eigenvalue_1")),
                    exact(self.tag("curvature/stability_threshold")),
                )
            )
            science[f"sharpness ratio λ₁(P⁻¹{symbol}) / threshold"] = multiline(exact(ratio))
        spectrum = [family(self.tag("curvature/eigenvalue_"), r"\d+")]
        if self.smallest:
            spectrum.append(exact(self.tag("curvature/eigenvalue_min")))
        matrix = self.matrix
        top = f"top {matrix} eigenvalue λ₁" if self.k == 1 else f"top {self.k} {matrix} eigenvalues"
        smallest = " and the smallest" if self.smallest else ""
        science[f"{top}{smallest} (raw {symbol}){note}"] = multiline(*spectrum)
        if self.blocks.requested:
            science["top eigenvalue per block"] = multiline(
                family(self.tag("curvature/eigenvalue_1/"), ".+")
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
        return {"warm_start": {key: value.cpu() for key, value in self._warm.items()}}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._warm = dict(state.get("warm_start", {}))
