"""Gradient coherence from the gradients training computes anyway: no extra forward or backward.

What ``GradientCoherenceMonitor(source="accumulation")`` and ``(source="ddp")`` build:

* ``"accumulation"``: free under gradient accumulation. Each micro-batch gradient that the
  training step computes anyway is one sample, read by hooks as it passes
  (:mod:`~lightning_curvature.callbacks.gradient_capture`), and ``.grad`` and the optimizer
  see exactly what they would without the monitor.
* ``"ddp"``: free under DDP. Each process's own gradient of the step, before DDP averages
  it, is one sample; the statistics need only scalar sums over processes, because
  ``‖Σ g_r‖²`` is the squared norm of ``world_size`` times the averaged ``.grad`` that every
  process holds after the backward. The mean cosine and the SNR need gradient-sized sums,
  so they are not logged in this mode.
* ``"accumulation"`` under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``): FSDP2
  averages each micro-batch's gradient over the processes inside the backward, so a sample
  is the gradient of the step's ``i``-th micro-batch over all processes (their union: what a
  single process training on the union would sample), ``m = accumulate_grad_batches``
  samples of ``world_size × b`` examples. (Under DDP each process's micro-batch gradient is a
  sample: ``m = accumulate_grad_batches × world_size`` of ``b`` examples.) Each process
  reads its shard of every sample
  (:class:`~lightning_curvature.callbacks.gradient_capture.ShardGradients`); the squared
  norms are sums over the shards, all-reduced in one collective, and nothing gathers a full
  gradient. The mean cosine needs each sample's full norm before its shard is added (one
  more collective per micro-batch) and the SNR a mean over all coordinates; they are not
  logged in this mode.
* ``"ddp"`` is refused under FSDP2: FSDP2 reduce-scatters each process's gradient inside the
  backward, so the per-process gradients it samples are never whole anywhere.

These sources see the gradients training computes: dropout on, BatchNorm in training mode,
the loss as ``training_step`` returns it. They read no probe batch, so the probe options of
:class:`~lightning_curvature.callbacks.coherence.GradientCoherenceMonitor` do not apply.

This module is the monitor: its arguments, the checks at setup, the hooks, and the
statistics of each step's samples over all processes; reading the samples from the backward
passes is the job of :mod:`~lightning_curvature.callbacks.training_samples`.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_curvature.callbacks.agreement import process_sum
from lightning_curvature.callbacks.coherence import GradientCoherenceMonitor
from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.schedule import EveryNSteps
from lightning_curvature.callbacks.trainer import check_strategy
from lightning_curvature.callbacks.training_samples import (
    StepSamples,
    is_sharded,
    loss_scale,
    replicated,
)
from lightning_curvature.functional.coherence import CoherenceMode
from lightning_curvature.functional.model.batches import batch_size
from lightning_curvature.functional.model.parameters import PerLayer, select_parameters
from lightning_curvature.functional.model.probe import unwrap_model

__all__ = ["TrainingGradientCoherenceMonitor", "TrainingSource"]

TrainingSource = Literal["accumulation", "ddp"]
_TRAINING_SOURCES = get_args(TrainingSource)
# The options that only mean something for probe batches, each at the value that asks for
# nothing (the defaults of GradientCoherenceMonitor and CurvatureMonitor: LightningCLI passes
# every argument of the signature, so these are accepted; a test keeps them equal).
PROBE_OPTIONS: dict[str, Any] = {
    "mode": "auto",
    "micro_batch_size": 8,
    "chunk_size": None,
    "probe": "fixed",
    "probe_batches": 1,
    "probe_dataloader": None,
    "loss_fn": None,
    "batch_norm": "eval",
    "on_train_end": False,
}


_DDP_UNDER_FSDP2 = (
    "source='ddp' reads each process's whole gradient before the all-reduce, and FSDP2 "
    "reduce-scatters it inside the backward, so it is never whole; source='accumulation' "
    "measures under FSDP2 (with accumulate_grad_batches >= 2)."
)


_UNKNOWN_SIZE = (
    "a training batch has no tensor with a leading (example) dimension, so its number of "
    "examples is unknown; nothing is logged (the noise scale is counted in examples)."
)


class TrainingGradientCoherenceMonitor(GradientCoherenceMonitor, sources=_TRAINING_SOURCES):
    """The gradient statistics of training's own micro-batch or per-process gradients.

    Built by ``GradientCoherenceMonitor(source="accumulation")`` or ``(source="ddp")``; it
    logs the tags of :class:`~lightning_curvature.callbacks.coherence.GradientCoherenceMonitor`
    (without ``gradient/mean_cosine`` and ``gradient/snr`` for ``"ddp"`` and under FSDP2).

    Args:
        source: ``"accumulation"`` (default: needs ``accumulate_grad_batches ≥ 2``, or
            several DDP processes; under FSDP2 one sample per micro-batch over all
            processes) or ``"ddp"`` (needs at least 2 DDP processes); both need automatic
            optimization.
        mode: accepted at ``"auto"`` only (the samples are training's own gradients).
        per_layer: as for ``GradientCoherenceMonitor``.
        every_n_steps: measure every this many optimizer steps (``"auto"``: 500).
        **kwargs: cadence, ``name``, ``parameters`` and ``seed``: see ``CurvatureMonitor``.
            The probe options (``micro_batch_size``, ``chunk_size``, ``probe``,
            ``probe_batches``, ``probe_dataloader``, ``loss_fn``, ``batch_norm``,
            ``on_train_end``) are refused unless at their defaults.

    Raises:
        MisconfigurationException: on invalid or probe-only arguments (at construction), or
            without a logger, under FSDP1/DeepSpeed, with ``"ddp"`` under FSDP2, with
            manual optimization, or when
            there are fewer than 2 samples a step to read (at setup).

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = TrainingGradientCoherenceMonitor("ddp", every_n_steps=100)
        >>> monitor.source, GradientCoherenceMonitor(source="ddp").skipped_statistics
        ('ddp', ('mean_cosine', 'snr'))
    """

    def __init__(
        self,
        source: TrainingSource = "accumulation",
        mode: CoherenceMode = "auto",
        *,
        per_layer: PerLayer = False,
        every_n_steps: EveryNSteps = "auto",
        **kwargs: Any,
    ) -> None:
        if source not in _TRAINING_SOURCES:
            raise MisconfigurationException(
                f"`source` must be one of {_TRAINING_SOURCES}, got {source!r}."
            )
        options = {"mode": mode, **kwargs}
        given = [
            name
            for name, neutral in PROBE_OPTIONS.items()
            if name in options
            and not (type(options[name]) is type(neutral) and options[name] == neutral)
        ]
        if given:
            raise MisconfigurationException(
                f"source={source!r} reads the gradients training computes, so "
                f"{', '.join(f'`{n}`' for n in given)} (probe-batch options) do not apply; "
                f"got {', '.join(f'{n}={options[n]!r}' for n in given)}. Use source='probe'."
            )
        rest = {name: value for name, value in kwargs.items() if name not in PROBE_OPTIONS}
        super().__init__(source, per_layer=per_layer, every_n_steps=every_n_steps, **rest)
        self._step: StepSamples | None = None
        self._dropped = -1  # a step given up midway (its parameters changed)
        self._sharded = False

    @property
    @override
    def skipped_statistics(self) -> tuple[str, ...]:
        return ("mean_cosine", "snr") if self.source == "ddp" or self._sharded else ()

    @override
    def check_sharding(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # No Hessian-vector products, so neither a backend nor a smooth model is needed.
        why = _DDP_UNDER_FSDP2 if self.source == "ddp" else None
        check_strategy(trainer, type(self).__name__, why)

    @property
    @override
    def uses_probe_data(self) -> bool:
        return False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
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
        self._sharded = is_sharded(trainer)
        if self._sharded and trainer.accumulate_grad_batches < 2:
            raise MisconfigurationException(
                "source='accumulation' under FSDP2 takes each micro-batch gradient over all "
                "processes (FSDP2 averages them inside the backward) as one sample and needs "
                f"accumulate_grad_batches >= 2; got {trainer.accumulate_grad_batches}."
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

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self._sharded:
            return
        named = select_parameters(unwrap_model(pl_module), self.parameters)
        problem = replicated(named, trainer.world_size)
        if problem is not None:
            raise MisconfigurationException(
                f"source='accumulation' under {type(trainer.strategy).__name__} sums each "
                "gradient's squared norm over the processes' shards, so every measured "
                f"parameter must be sharded once over all {trainer.world_size} processes; "
                f"{problem}. Apply fully_shard to the whole model in `configure_model`, or "
                "choose the measured ones with `parameters=`."
            )

    # -- the samples, read from training's backward passes -------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        dropped = self._dropped == trainer.global_step  # (its later micro-batches)
        if self._step is None and not dropped and self.is_due(trainer, batch_idx):
            self._step = self._start_step(trainer, pl_module)
        if self._step is not None:
            self._step.micro_batch_size = batch_size(batch)

    parameter_change_effect = "the steps from this one on measure the new set"

    def _start_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> StepSamples | None:
        if not self.resolve_parameters(pl_module, trainer.global_step):
            return None  # nothing measured is trainable now (said once, on the change)
        return StepSamples.start(
            self.measured_tensors(pl_module),
            self.source,
            sharded=self._sharded,
            per_layer=self.measured_blocks,
        )

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        step = self._step
        if step is not None and not all(p.requires_grad for p in step.gradients.parameters):
            # frozen since the step began (a module hook of this step): its samples would mix
            # two sets of parameters, so the step is dropped
            self._step, self._dropped = None, trainer.global_step
            effect = "this step is not measured, the next ones measure the new set"
            self.resolve_parameters(pl_module, trainer.global_step, effect)
        elif step is not None:
            step.gradients.attach()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._step
        if step is None or not step.gradients.attached:
            return
        step.add_backward(trainer, self.source)

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

    def _measure_step(self, trainer: pl.Trainer, step: StepSamples) -> Measurement | None:
        if self._sharded:
            return self._measure_sharded(trainer, step)
        sums = step.sums
        if step.local is not None and step.local_size > 0:
            sums.add(step.local, step.local_size)
        unknown = torch.tensor(float(step.unknown_size), device=sums.count.device)
        unknown = process_sum(trainer)(unknown)
        total = self.summed_over_processes(trainer, sums)
        if not self.enough_samples(total, trainer.global_step):
            return None
        if loss_scale(trainer) != 1.0 and not all(
            bool(torch.isfinite(value).all()) for value in total.states().values()
        ):
            return None  # the grad scaler skips this step too: routine, no warning
        if float(unknown) > 0:
            self.warn_once("size", _UNKNOWN_SIZE)
            return None
        if step.local is None:
            return Measurement(self.metrics(total.compute()))
        # "ddp": Σ_r g_r = world_size · (DDP's averaged gradient), which every process holds.
        averaged = step.averaged if step.averaged is not None else torch.zeros_like(step.local)
        s2, blocks = total.squared_norms(averaged * total.num_samples)
        result = total.compute(sum_sq_norm=s2, block_sum_sq_norm=blocks or None)
        return Measurement(self.metrics(result))

    def _measure_sharded(self, trainer: pl.Trainer, step: StepSamples) -> Measurement | None:
        """The statistics from this process's shards, with one all-reduce of scalars.

        Sample ``i`` is the micro-batch gradient over all processes, so ``m`` and the sizes
        are the same on every process, and the squared norms are sums over the shards.
        """
        sums, local = step.sums, step.local
        assert local is not None
        s2, blocks = sums.squared_norms(local)  # this shard's part of ‖Σ g_i‖² (and blocks)
        block_s1 = sums.block_sq_norm_sum
        m = len(step.norms)
        parts = [
            torch.stack([*step.norms, s2]),  # this shard's ‖g_i‖² of each sample, ‖Σ g_i‖²
            *(value.reshape(1) for value in blocks.values()),
            *([block_s1] if block_s1 is not None else []),
            torch.tensor([*step.sizes, float(step.unknown_size)]).to(s2),
        ]
        flat = process_sum(trainer)(torch.cat(parts))
        norms, s2 = flat[:m], flat[m]
        n_blocks = len(blocks)
        block_s2 = dict(zip(blocks, flat[m + 1 : m + 1 + n_blocks], strict=True))
        rest = flat[m + 1 + n_blocks :]
        if block_s1 is not None:
            block_s1, rest = rest[:n_blocks], rest[n_blocks:]
        sizes, unknown = rest[:-1], rest[-1]
        states = {
            "count": sums.count,  # m micro-batches, each one sample over every process
            "inverse_size_sum": (1.0 / sizes).sum(),
            "sq_norm_sum": norms.sum(),
            "nonzero_count": sums.count,  # used by the mean cosine only, not logged here
            **({"block_sq_norm_sum": block_s1} if block_s1 is not None else {}),
        }
        total = sums.with_states(states)
        if not self.enough_samples(total, trainer.global_step):
            return None
        if loss_scale(trainer) != 1.0 and not bool(torch.isfinite(flat).all()):
            return None  # the grad scaler skips this step too: routine, no warning
        if float(unknown) > 0:
            self.warn_once("size", _UNKNOWN_SIZE)
            return None
        if bool((norms == 0).any()) and bool((norms > 0).any()):
            self.warn_once(
                "sync",
                "a micro-batch's gradient over all processes left .grad exactly unchanged "
                "while another did not: FSDP2 skipped its gradient reduction "
                "(set_requires_gradient_sync(False)?), so the micro-batches cannot be told "
                "apart; nothing is logged for such steps.",
            )
            return None
        result = total.compute(sum_sq_norm=s2, block_sum_sq_norm=block_s2 or None)
        return Measurement(self.metrics(result))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._step is not None and self._step.gradients.attached:
            self._step.gradients.detach()
        self._step = None
        super().on_train_end(trainer, pl_module)
