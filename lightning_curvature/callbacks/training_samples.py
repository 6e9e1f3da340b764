"""One optimizer step's gradient samples, read from training's own backward passes.

The reading half of
:class:`~lightning_curvature.callbacks.training_coherence.TrainingGradientCoherenceMonitor`
(whose module docstring says what each source takes as a sample): :class:`StepSamples`
starts a step's sums, reads the gradient of each backward pass as it goes by
(:mod:`~lightning_curvature.callbacks.gradient_capture`) and adds it as its source takes it,
with Lightning's scaling undone: one sample per micro-batch (``"accumulation"``), or this
process's gradient of the step (``"ddp"``), or this process's shard of each micro-batch's
gradient over all processes (``"accumulation"`` under FSDP2, where :func:`is_sharded`; the
squared norms are then sums over the shards, full norms only where :func:`replicated` finds
nothing).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch

from lightning_curvature.callbacks.gradient_capture import (
    BackwardGradients,
    ShardGradients,
    local_flat_grad,
    local_shards,
)
from lightning_curvature.functional.gradients.accumulator import GradientSums
from lightning_curvature.functional.model.functional_model import probe_dtype
from lightning_curvature.functional.model.parameters import ParameterLayout, PerLayer

__all__ = ["StepSamples", "is_sharded", "loss_scale", "replicated"]


@dataclass
class StepSamples:
    """Gradient samples of one optimizer step, read from training's backward passes.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> step = StepSamples.start([("w", w)], "accumulation", sharded=False, per_layer=False)
        >>> for scale in (1.0, 3.0):  # two micro-batches of 4 examples
        ...     step.micro_batch_size = 4
        ...     step.gradients.attach()
        ...     (scale * w).sum().backward()
        ...     step.add_backward(pl.Trainer(logger=False), "accumulation")
        >>> step.sums.num_samples, step.sums.sum
        (2, tensor([4., 4.]))
    """

    gradients: BackwardGradients | ShardGradients
    sums: GradientSums  # sharded: over this process's shards, the counts over its micro-batches
    local: torch.Tensor | None  # "ddp": this process's gradient of the step; sharded: Σ g_i
    sizes: list[float] = field(default_factory=list)  # sharded: each micro-batch's examples
    norms: list[torch.Tensor] = field(default_factory=list)  # sharded: this shard's ‖g_i‖²
    local_size: float = 0.0
    averaged: torch.Tensor | None = None  # "ddp": DDP's averaged .grad after the last backward
    micro_batch_size: int | None = None  # examples of the micro-batch being computed
    unknown_size: bool = False
    seconds: float = 0.0

    @classmethod
    def start(
        cls,
        named: Sequence[tuple[str, torch.Tensor]],
        source: str,
        *,
        sharded: bool,
        per_layer: PerLayer,
    ) -> StepSamples:
        """Empty samples of a step over the measured parameters ``named``.

        Args:
            named: the measured parameters, by name, in layout order.
            source: ``"accumulation"`` or ``"ddp"``.
            sharded: the parameters are FSDP2 shards (:func:`is_sharded`).
            per_layer: the blocks with a coherence of their own.
        """
        params = [p for _, p in named]
        shards = local_shards(params)  # the parameters themselves unless sharded
        layout = ParameterLayout.from_named(
            [(name, shard) for (name, _), shard in zip(named, shards, strict=True)]
        )
        dtype = probe_dtype(shards)
        vectors = source == "accumulation" and not sharded
        device = shards[0].device
        sums = GradientSums.zeros(
            max(layout.size, 1),  # a process may hold no entry of a tiny model
            dtype=dtype,
            device=device,
            vectors=vectors,
            blocks=layout.groups(per_layer),
            mode=source,
        )
        local = None if vectors else torch.zeros(max(layout.size, 1), dtype=dtype, device=device)
        reader = ShardGradients if sharded else BackwardGradients
        return cls(reader(params, dtype), sums, local)

    def add_backward(self, trainer: pl.Trainer, source: str) -> None:
        """Add the gradient of the backward pass that just ended, as ``source`` takes it."""
        started = time.perf_counter()
        gradient = self.gradients.detach()  # this micro-batch's, times Lightning's scaling
        if self.micro_batch_size is None:
            self.unknown_size = True
        size = float(self.micro_batch_size or 1)
        scale = loss_scale(trainer)
        if source == "accumulation":  # undo the 1/accumulate_grad_batches too
            gradient.mul_(trainer.accumulate_grad_batches / scale)
            if self.local is not None:  # sharded: this shard of g_i, Σ g_i and ‖g_i‖²
                gradient = _padded(gradient, self.local.numel())
                self.local.add_(gradient)
                self.sizes.append(size)
                self.norms.append(torch.dot(gradient, gradient))
            self.sums.add(gradient, size)
        elif self.local is not None:  # "ddp": the step's gradient is the mean of its
            # micro-batches, as Lightning's
            self.local.add_(gradient, alpha=1.0 / scale)
            self.local_size += size
            # After the step's last backward .grad is DDP's average of the steps' gradients;
            # read here, before anything after the backward (a SAM pass) replaces it.
            self.averaged = local_flat_grad(self.gradients.parameters, self.local.dtype) / scale
        self.seconds += time.perf_counter() - started


def _padded(vector: torch.Tensor, size: int) -> torch.Tensor:
    """``vector`` with zeros after it up to ``size`` (a process that holds no entry)."""
    if vector.numel() == size:
        return vector
    return torch.cat([vector, vector.new_zeros(size - vector.numel())])


def replicated(named: Sequence[tuple[str, torch.Tensor]], world_size: int) -> str | None:
    """The first parameter not split into one distinct shard per process, if any.

    Sums over the shards of all processes are full squared norms only when every process
    holds its own piece of every parameter: a plain tensor (not given to ``fully_shard``)
    or a replicated placement would be counted once per copy.

    Example:
        >>> replicated([("w", torch.zeros(2))], world_size=2)
        "'w' is not sharded (not under fully_shard)"
    """
    from torch.distributed.tensor import DTensor

    for name, p in named:
        if not isinstance(p, DTensor):
            return f"{name!r} is not sharded (not under fully_shard)"
        if p.device_mesh.size() != world_size or not all(x.is_shard() for x in p.placements):
            return f"{name!r} has placements {p.placements} over a mesh of {p.device_mesh.size()}"
    return None


def is_sharded(trainer: pl.Trainer) -> bool:
    """Whether the parameters are FSDP2 shards (``ModelParallelStrategy``).

    Example:
        >>> is_sharded(pl.Trainer(logger=False))
        False
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def loss_scale(trainer: pl.Trainer) -> float:
    """The grad scaler's scale (``16-mixed``), by which backward's gradients are multiplied.

    Example:
        >>> loss_scale(pl.Trainer(logger=False))
        1.0
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())
