"""``SpectralDensityMonitor``: the Hessian eigenvalue density over training."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.operator_monitor import OperatorMonitor
from lightning_curvature.callbacks.reporting.dashboard import (
    Charts,
    batch_norm_note,
    exact,
    layout,
    multiline,
    raw_threshold,
)
from lightning_curvature.callbacks.reporting.logging import tensorboard_writers
from lightning_curvature.callbacks.reporting.rendering import density_image
from lightning_curvature.callbacks.schedule import EveryNSteps
from lightning_curvature.checks import check_budget
from lightning_curvature.functional.density import (
    SpectralDensity,
    check_density_arguments,
    spectral_density,
)
from lightning_curvature.functional.model.batches import BatchList

__all__ = ["SpectralDensityMonitor"]


class SpectralDensityMonitor(OperatorMonitor):
    """Eigenvalue spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    Costs ``num_steps × num_runs`` Hessian-vector products per probe (80 by default): run it
    rarely. Beyond 30-80 steps the start-vector variance dominates, so add runs, not steps.
    With a TensorBoard logger the density also appears as a histogram (bucket counts are
    estimated eigenvalue counts, ``weight × P``) and as an image on a log scale; the raw
    nodes and weights of the last probe are kept in :attr:`last_density`. The image has
    labelled axes, the quadrature nodes as a rug (outliers always show), ``λ_max`` and, for
    SGD, the stability threshold ``(2 + 2β)/η − wd`` marked.

    Args:
        num_steps: Lanczos steps per run.
        num_runs: independent runs averaged.
        num_points: grid points of the smoothed density.
        every_n_steps: probe every this many optimizer steps (``"auto"``: 2000, as the
            density costs ``num_steps × num_runs`` products, so it is meant to be rare).
        **kwargs: cadence, probe data, loss, ``curvature`` (``"ggn"``: the density of the
            generalized Gauss–Newton matrix, see ``OperatorMonitor``) and the rest: see
            ``CurvatureMonitor``.

    Logged metrics:
        - ``curvature/density_max`` and ``curvature/density_min``: extreme quadrature nodes
          (``λ_max`` and ``λ_min`` estimates)
        - ``probe_cost/density_hvps`` and ``probe_cost/density_seconds``: cost of the
          probe
        - TensorBoard only: histogram ``curvature/spectral_density`` and image
          ``curvature/spectral_density_image`` (one tag each: TensorBoard keys data by tag)
        - with ``curvature="ggn"``: every tag with ``ggn_`` before its name
          (``curvature/ggn_density_max``, …)

    Raises:
        MisconfigurationException: on invalid arguments (at construction), or without a
            logger, under a sharded strategy, or with manual optimization and no
            ``loss_fn`` (at setup).

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = SpectralDensityMonitor(num_steps=40, every_n_steps=1000)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=1, enable_progress_bar=False)
    """

    shardable = True  # FSDP2: finite differences over sharded vectors

    cost_name = "density"
    default_every_n_steps = 2000
    state_key_arguments = ("num_steps", "num_runs")

    def __init__(
        self,
        num_steps: int = 80,
        num_runs: int = 1,
        *,
        num_points: int = 200,
        every_n_steps: EveryNSteps = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, **kwargs)
        try:
            check_density_arguments(num_steps, num_runs, min_steps=2)  # one node: no density
            check_budget("num_points", num_points, 2)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        self.num_steps, self.num_runs, self.num_points = num_steps, num_runs, num_points
        self.last_density: SpectralDensity | None = None

    @override
    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Charts:
        note = batch_norm_note(pl_module, self.batch_norm)
        title = f"spectrum edges λ_min, λ_max (SLQ){note}"
        if self.curvature == "ggn":
            title = f"GGN {title}"
        edges = multiline(*(exact(self.tag(f"curvature/density_{e}")) for e in ("max", "min")))
        science = {self.category("curvature"): {title: edges}}
        return layout([science, super().charts(trainer, pl_module)])

    @override
    def expected_cost(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """``num_steps × num_runs`` products of the probe batches.

        Example:
            >>> SpectralDensityMonitor(num_steps=40).expected_cost(None, None)
            100.0
        """
        return self.hvp_gradients * self.num_steps * self.num_runs * self.probe_batches

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> Measurement:
        self.last_density = spectral_density(
            pl_module,
            self.probe_loss_fn(),
            BatchList(batches),
            self.num_steps,
            self.num_runs,
            **self.probe_kwargs(trainer, pl_module),
        )
        nodes = self.last_density.nodes
        return Measurement(
            {"curvature/density_max": nodes.max(), "curvature/density_min": nodes.min()},
            self.last_density.num_hvps,
        )

    @override
    def log_extras(self, trainer: pl.Trainer, step: int) -> None:
        esd = self.last_density
        if esd is None:
            return
        grid, density = esd.density(num_points=self.num_points)
        spacing = float(grid[1] - grid[0])
        counts = density * spacing * esd.num_parameters
        markers = {"lambda_max": float(esd.nodes.max())}
        threshold = raw_threshold(trainer)
        if threshold is not None:
            markers["threshold"] = threshold
        title = f"{self.matrix} eigenvalue density (SLQ), step {step}"
        image = density_image(grid, density, nodes=esd.nodes, markers=markers, title=title)
        for writer in tensorboard_writers(trainer):
            writer.add_histogram_raw(
                self.tag("curvature/spectral_density"),
                min=float(grid[0]),
                max=float(grid[-1]),
                num=float(counts.sum()),
                sum=float((counts * grid).sum()),
                sum_squares=float((counts * grid**2).sum()),
                bucket_limits=(grid + spacing / 2).tolist(),
                bucket_counts=counts.tolist(),
                global_step=step,
            )
            writer.add_image(self.tag("curvature/spectral_density_image"), image, global_step=step)
