"""``GradientCoherenceMonitor``: how much the examples agree on the direction to move.

Three sources of gradient samples (``source=``):

* ``"probe"`` (default): per-example gradients (``torch.func.vmap``) of the probe batch, or
  micro-batch gradients where vmap cannot go (BatchNorm in train mode, models it cannot
  trace); the probe batch is fixed by default, so values are comparable over time.
* ``"accumulation"``: free under gradient accumulation. Each micro-batch gradient that the
  training step computes anyway is one sample, read by hooks as it passes
  (:mod:`~lightning_curvature.callbacks.gradient_capture`): no extra forward or backward,
  and ``.grad`` and the optimizer see exactly what they would without the monitor.
* ``"ddp"``: free under DDP. Each process's own gradient of the step, before DDP averages
  it, is one sample; the statistics need only scalar all-reduces, because ``‖Σ g_r‖²`` is
  the squared norm of ``world_size`` times the averaged ``.grad`` that every process holds
  after the backward. The mean cosine and the SNR need gradient-sized sums, so they are not
  logged in this mode.

The free sources see the gradients training computes: dropout on, BatchNorm in training mode,
the loss as ``training_step`` returns it. Samples of all processes are combined through a
torchmetrics ``Metric`` whose states reduce with ``"sum"``
(:class:`~lightning_curvature.callbacks.gradient_sums_metric.GradientSumsMetric`), so under
DDP every process logs the statistics of the union of their samples.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_curvature.callbacks.base import CurvatureMonitor
from lightning_curvature.callbacks.dashboard import (
    COST_CATEGORY,
    Charts,
    exact,
    family,
    layout,
    multiline,
)
from lightning_curvature.callbacks.gradient_capture import BackwardGradients
from lightning_curvature.callbacks.gradient_sums_metric import GradientSumsMetric
from lightning_curvature.callbacks.layers import LayerBlocks
from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.schedule import EveryNSteps
from lightning_curvature.functional.batches import BatchList, batch_size
from lightning_curvature.functional.functional_model import probe_dtype
from lightning_curvature.functional.gradient_statistics import (
    CoherenceMode,
    GradientCoherence,
    GradientSums,
    check_coherence_arguments,
    gradient_sums,
)
from lightning_curvature.functional.parameters import ParameterLayout, select_parameters
from lightning_curvature.functional.probe import unwrap_model

__all__ = ["CoherenceSource", "GradientCoherenceMonitor"]

CoherenceSource = Literal["probe", "accumulation", "ddp"]
_SOURCES = ("probe", "accumulation", "ddp")
# Arguments of the base class that only mean something for probe batches, and its defaults.
_PROBE_ONLY = ("probe", "probe_batches", "probe_dataloader", "loss_fn", "batch_norm")
_BASE_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(CurvatureMonitor.__init__).parameters.items()
}


@dataclass
class _StepSamples:
    """Gradient samples of one optimizer step, read from training's backward passes."""

    gradients: BackwardGradients
    sums: GradientSums
    local: torch.Tensor | None  # "ddp": this process's gradient of the step, summed so far
    local_size: float = 0.0
    averaged: torch.Tensor | None = None  # "ddp": DDP's averaged .grad after the last backward
    micro_batch_size: int | None = None  # examples of the micro-batch being computed
    unknown_size: bool = False
    seconds: float = 0.0


def _flat_grad(parameters: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``.grad`` of ``parameters`` as one flat vector (zeros where there is none)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
            for p in parameters
        ]
    )


def _loss_scale(trainer: pl.Trainer) -> float:
    """The grad scaler's scale (``16-mixed``), by which backward's gradients are multiplied."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


class GradientCoherenceMonitor(CurvatureMonitor):
    r"""Gradient coherence, mean cosine, noise scale and SNR of training's gradient samples.

    From ``m`` gradient samples ``g_i`` of ``b`` examples each (definitions and references in
    :func:`~lightning_curvature.functional.gradient_statistics.gradient_coherence`):

    * ``gradient/coherence``: m-coherence ``‖Σg_i‖² / Σ‖g_i‖²`` (Chatterjee & Zielinski 2020,
      2022): 1 when the samples are orthogonal, ``m`` when identical. Real labels give
      high coherence early in training, shuffled labels about 1.
    * ``gradient/mean_cosine``: mean pairwise cosine over ``i ≠ j``.
    * ``gradient/noise_scale``: ``B_simple = tr Σ / ‖G‖²`` in examples (McCandlish et al.
      2018): the batch size beyond which larger batches stop paying. Its parts are logged too,
      because near convergence ``‖G‖²`` is small next to its noise and the ratio is
      meaningless: it is not logged where the unbiased ``‖G‖²`` is ``≤ 0``. Smooth the parts
      before dividing.
    * ``gradient/snr``: mean over coordinates of ``ḡ_j² / σ_j²`` (Liu et al. 2020).

    Args:
        source: ``"probe"`` (default), ``"accumulation"`` or ``"ddp"``; see the module
            docstring. The free sources need ``accumulate_grad_batches ≥ 2`` (or DDP) and
            DDP respectively, and automatic optimization.
        mode: for ``source="probe"``: ``"auto"`` (per-example, falling back to micro-batches
            with one warning), ``"per_example"`` or ``"micro_batch"``.
        micro_batch_size: for ``source="probe"``: examples per micro-batch sample where
            micro-batches are used (``None``: one sample per probe batch).
        chunk_size: for ``source="probe"``: examples per ``vmap`` call (memory
            ``chunk_size × P``); default about 16 MiB of gradients on CPU.
        per_layer: ``True`` for one coherence per module, or parameter-name patterns (list,
            or dict of tag name to pattern) for one per block.
        every_n_steps: measure every this many optimizer steps (``"auto"``: 500).
        **kwargs: cadence, probe data, loss and the rest: see ``CurvatureMonitor``
            (the probe-data arguments apply to ``source="probe"`` only; ``backend`` does not
            apply: no Hessian-vector products are computed).

    Logged metrics:
        - ``gradient/coherence``, ``gradient/mean_cosine``, ``gradient/noise_scale``,
          ``gradient/snr`` (the last two of these not with ``source="ddp"``: cosine, SNR)
        - ``gradient/grad_norm_sq`` and ``gradient/trace_sigma``: unbiased ``‖G‖²`` and
          ``tr Σ``, the parts of the noise scale
        - ``gradient/num_samples`` and ``gradient/sample_size``: ``m`` and ``b`` (examples
          per sample; 1 for per-example gradients)
        - ``gradient/coherence/<name>`` (with ``per_layer``)
        - ``probe_cost/coherence_seconds``: cost of the measurement

    Raises:
        MisconfigurationException: on invalid arguments (at construction), or without a
            logger, under a sharded strategy, with manual optimization (free sources, or the
            probe without ``loss_fn``), or when the source has no samples to read (at setup).

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = GradientCoherenceMonitor(every_n_steps=50, per_layer=True)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=1, enable_progress_bar=False)
        >>> free = GradientCoherenceMonitor(source="accumulation", every_n_steps=10)
        >>> trainer = pl.Trainer(callbacks=[free], accumulate_grad_batches=4, max_steps=1)
    """

    cost_name = "coherence"
    counts_hvps = False
    default_every_n_steps = 500
    state_key_arguments = ("source", "mode", "micro_batch_size", "chunk_size", "per_layer")

    def __init__(
        self,
        source: CoherenceSource = "probe",
        mode: CoherenceMode = "auto",
        *,
        micro_batch_size: int | None = 8,
        chunk_size: int | None = None,
        per_layer: bool | Sequence[str] | Mapping[str, str] = False,
        every_n_steps: EveryNSteps = "auto",
        **kwargs: Any,
    ) -> None:
        if source not in _SOURCES:
            raise MisconfigurationException(f"`source` must be one of {_SOURCES}, got {source!r}.")
        if kwargs.get("backend", _BASE_DEFAULTS["backend"]) != _BASE_DEFAULTS["backend"]:
            raise MisconfigurationException(
                "`backend` chooses how Hessian-vector products are computed; "
                "GradientCoherenceMonitor computes none, so it takes no `backend`; got "
                f"backend={kwargs['backend']!r}."
            )
        # (LightningCLI passes every argument, defaults included: compare with the defaults.)
        given = [
            name
            for name in (*_PROBE_ONLY, "on_train_end")
            if name in kwargs and kwargs[name] != _BASE_DEFAULTS[name]
        ]
        if source != "probe" and given:
            raise MisconfigurationException(
                f"source={source!r} reads the gradients training computes, so "
                f"{', '.join(f'`{n}`' for n in given)} (probe-batch options) do not apply; "
                f"got {', '.join(f'{n}={kwargs[n]!r}' for n in given)}. Use source='probe'."
            )
        super().__init__(every_n_steps=every_n_steps, **kwargs)
        try:
            check_coherence_arguments(mode, micro_batch_size, chunk_size)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        if source != "probe" and (mode != "auto" or chunk_size is not None):
            raise MisconfigurationException(
                f"`mode` and `chunk_size` apply to source='probe' only; with source={source!r} "
                "the samples are training's own micro-batch or per-process gradients."
            )
        self.source: CoherenceSource = source
        self.mode: CoherenceMode = mode
        self.micro_batch_size = micro_batch_size
        self.chunk_size = chunk_size
        self._blocks = LayerBlocks.of(per_layer)
        self.per_layer = self._blocks.spec  # as given: True/False or tag name to pattern
        self._metric: GradientSumsMetric | None = None
        self._metric_layout: tuple[Any, ...] = ()
        self._step: _StepSamples | None = None

    @override
    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Charts:
        def chart(*names: str) -> list[Any]:
            return multiline(*(exact(self.tag(f"gradient/{name}")) for name in names))

        science = {"gradient coherence (m-coherence)": chart("coherence")}
        if self.source != "ddp":
            science["mean pairwise cosine of the gradients"] = chart("mean_cosine")
        science["noise scale B_simple = tr Σ / ‖G‖² (examples)"] = chart("noise_scale")
        science["noise scale parts ‖G‖² and tr Σ"] = chart("grad_norm_sq", "trace_sigma")
        if self.source != "ddp":
            science["gradient SNR (mean over coordinates)"] = chart("snr")
        if self._blocks.patterns:
            science["gradient coherence per block"] = multiline(
                family(self.tag("gradient/coherence/"), ".+")
            )
        samples = {"gradient samples m, examples per sample b": chart("num_samples", "sample_size")}
        return layout(
            [
                {self.category("gradient"): science},
                super().charts(trainer, pl_module),
                {COST_CATEGORY: samples},
            ]
        )

    @property
    @override
    def uses_probe_data(self) -> bool:
        return self.source == "probe"

    @override
    def check_model(self, pl_module: pl.LightningModule) -> None:
        super().check_model(pl_module)
        named = select_parameters(unwrap_model(pl_module), self.parameters)
        self._blocks.check([name for name, _ in named])

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.source == "probe":
            return
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"source={self.source!r} reads the backward passes of automatic optimization; "
                "with manual optimization use source='probe' with `loss_fn=`."
            )
        if self.source == "ddp" and trainer.world_size < 2:
            raise MisconfigurationException(
                "source='ddp' takes each process's gradient as one sample and needs at least "
                f"2 processes; the Trainer has world_size={trainer.world_size}."
            )
        if (
            self.source == "accumulation"
            and trainer.accumulate_grad_batches * trainer.world_size < 2
        ):
            raise MisconfigurationException(
                "source='accumulation' takes each micro-batch gradient of a step as one sample "
                "and needs accumulate_grad_batches >= 2 (or several processes); got "
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}."
            )

    # -- the statistics, from any source ---------------------------------------------------
    def _summed_over_processes(self, sums: GradientSums) -> GradientSums:
        """``sums`` of every process (torchmetrics sums the states under DDP)."""
        layout = (set(sums.states()), sums.blocks, sums.size, sums.count.device)
        if self._metric is None or self._metric_layout != layout:
            self._metric = GradientSumsMetric(sums).to(sums.count.device)
            self._metric_layout = layout
        self._metric.update(sums)
        try:
            return self._metric.summed()
        finally:
            self._metric.reset()

    def _metrics(
        self, result: GradientCoherence, skip: tuple[str, ...] = ()
    ) -> dict[str, float | torch.Tensor]:
        metrics: dict[str, float | torch.Tensor] = {
            f"gradient/{name}": getattr(result, name)
            for name in (
                "coherence",
                "mean_cosine",
                "noise_scale",
                "snr",
                "grad_norm_sq",
                "trace_sigma",
            )
            if name not in skip
        }
        if "gradient/noise_scale" in metrics and not bool(result.grad_norm_sq > 0):
            # ‖G‖² ≤ 0: the signal is below its noise (near convergence) and tr Σ/‖G‖² has no
            # meaning; its parts are still logged.
            del metrics["gradient/noise_scale"]
        metrics["gradient/num_samples"] = float(result.num_samples)
        metrics["gradient/sample_size"] = result.sample_size
        for block, value in result.per_layer.items():
            metrics[f"gradient/coherence/{self._blocks.tag(block)}"] = value
        return metrics

    def _enough(self, sums: GradientSums, step: int) -> bool:
        if sums.num_samples >= 2:
            return True
        self.warn_once(
            "samples",
            f"step {step} gave {sums.num_samples} gradient sample(s) from source="
            f"{self.source!r}; at least 2 are needed, so nothing is logged for it.",
        )
        return False

    # -- source="probe" -------------------------------------------------------------------
    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> Measurement | None:
        sums = gradient_sums(
            pl_module,
            self.probe_loss_fn(),
            BatchList(batches),
            mode=self.mode,
            micro_batch_size=self.micro_batch_size,
            chunk_size=self.chunk_size,
            per_layer=self._blocks.patterns,
            parameters=self.parameters,
            batch_norm=self.batch_norm,
        )
        total = self._summed_over_processes(sums)
        if not self._enough(total, trainer.global_step):
            return None
        return Measurement(self._metrics(total.compute()))

    # -- the free sources: samples read from training's backward passes ---------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.source == "probe":
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            return
        if self._step is None and self.is_due(trainer, batch_idx):
            self._step = self._start_step(pl_module)
        if self._step is not None:
            self._step.micro_batch_size = batch_size(batch)

    def _start_step(self, pl_module: pl.LightningModule) -> _StepSamples:
        named = select_parameters(unwrap_model(pl_module), self.parameters)
        layout = ParameterLayout.from_named(named)
        params = [p for _, p in named]
        dtype = probe_dtype(params)
        blocks = layout.groups(self._blocks.patterns) if self._blocks.patterns else {}
        vectors = self.source == "accumulation"
        sums = GradientSums.zeros(
            layout.size,
            dtype=dtype,
            device=params[0].device,
            vectors=vectors,
            blocks=blocks,
            mode=self.source,
        )
        local = None if vectors else torch.zeros(layout.size, dtype=dtype, device=params[0].device)
        return _StepSamples(BackwardGradients(params, dtype), sums, local)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._step is not None:
            self._step.gradients.attach()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._step
        if step is None or not step.gradients.attached:
            return
        started = time.perf_counter()
        gradient = step.gradients.detach()  # this micro-batch's, times Lightning's scaling
        if step.micro_batch_size is None:
            step.unknown_size = True
        size = float(step.micro_batch_size or 1)
        scale = _loss_scale(trainer)
        if step.local is None:  # "accumulation": undo the 1/accumulate_grad_batches too
            step.sums.add(gradient.mul_(trainer.accumulate_grad_batches / scale), size)
        else:  # "ddp": the step's gradient is the mean of its micro-batches, as Lightning's
            step.local.add_(gradient, alpha=1.0 / scale)
            step.local_size += size
            # After the step's last backward .grad is DDP's average of the steps' gradients;
            # read here, before anything after the backward (a SAM pass) replaces it.
            step.averaged = _flat_grad(step.gradients.parameters, step.local.dtype) / scale
        step.seconds += time.perf_counter() - started

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        if step.gradients.attached:
            step.gradients.detach()
        self.record_measurement(
            trainer,
            pl_module,
            lambda: self._measure_step(trainer, step),
            seconds_before=step.seconds,
        )

    def _measure_step(self, trainer: pl.Trainer, step: _StepSamples) -> Measurement | None:
        sums = step.sums
        if step.local is not None and step.local_size > 0:
            sums.add(step.local, step.local_size)
        unknown = torch.tensor(float(step.unknown_size), device=sums.count.device)
        unknown = trainer.strategy.reduce(unknown, reduce_op="sum")
        total = self._summed_over_processes(sums)
        if not self._enough(total, trainer.global_step):
            return None
        if _loss_scale(trainer) != 1.0 and not all(
            bool(torch.isfinite(value).all()) for value in total.states().values()
        ):
            return None  # the grad scaler skips this step too: routine, no warning
        if float(unknown) > 0:
            self.warn_once(
                "size",
                "a training batch has no tensor with a leading (example) dimension, so its "
                "number of examples is unknown; nothing is logged (the noise scale is "
                "counted in examples).",
            )
            return None
        if step.local is None:
            return Measurement(self._metrics(total.compute()))
        # "ddp": Σ_r g_r = world_size · (DDP's averaged gradient), which every process holds.
        averaged = step.averaged if step.averaged is not None else torch.zeros_like(step.local)
        s2, blocks = total.squared_norms(averaged * total.num_samples)
        result = total.compute(sum_sq_norm=s2, block_sum_sq_norm=blocks or None)
        return Measurement(self._metrics(result, skip=("mean_cosine", "snr")))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._step is not None and self._step.gradients.attached:
            self._step.gradients.detach()
        self._step = None
        super().on_train_end(trainer, pl_module)
