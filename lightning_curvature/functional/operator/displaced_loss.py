"""The probe loss at displaced weights ``w + δ``, by forward passes alone, and ``∇L(w)``.

What the loss-landscape slices (:mod:`~lightning_curvature.functional.landscape`) and the
critical-sharpness line search (:mod:`~lightning_curvature.functional.critical_sharpness`)
evaluate. The model is called through the one functional adapter of the package
(:class:`~lightning_curvature.functional.model.functional_model.FunctionalModel`, through
:class:`~lightning_curvature.functional.operator.probe_loss.ProbeLoss`), at the detached
measured parameters plus a flat displacement, so the user's parameters, ``.grad`` and
buffers are never written; and under the conditions of every probe
(:func:`~lightning_curvature.functional.model.probe.probe_context`: RNG forked, autocast off,
dropout off, BatchNorm in the requested mode with its running statistics untouched), so a
point of a slice sees the same function as the Hessian-vector products of the operator.

A loss at displaced weights is one forward pass over the probe's batches, under
``torch.no_grad`` (no graph kept); :attr:`DisplacedLoss.num_forwards` counts them. Nothing
here needs a second derivative, so attention runs on the kernels the caller (training) runs,
fused ones included, not on the math kernel the probe selects for the products. With
``all_reduce`` (DDP) every loss and the gradient are averaged over the processes, each
weighted by its share of the examples
(:class:`~lightning_curvature.functional.distributed.union.UnionMean`), so every rank sees
the union batch's loss and takes the same decisions. A non-finite loss is returned
as it is: what it means (bad luck, or a step that blew the model up) is the caller's call.

Over sharded (FSDP2) parameters a displacement is this process's shard of ``δ`` (``layout``
is the local one, :attr:`DisplacedLoss.shards` the split): the forward passes gather the
shards inside the model's own hooks, so the point ``w + δ`` is written into the local shards
in place and restored from a saved copy after each forward, by the one displacement of the
finite-difference backend's gradients
(:meth:`~lightning_curvature.functional.operator.sharded_gradients.ShardedGradients.displaced`);
each process's loss, weighted by its share of the examples, is summed over the processes
(every process must then evaluate the same points, in the same order).
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.nn.attention import _cur_sdpa_kernel_backends, sdpa_kernel

from lightning_curvature.functional.distributed.union import UnionMean
from lightning_curvature.functional.linalg.sharded import VectorShards, fsdp_shards, local_tensor
from lightning_curvature.functional.model.batches import split_batches
from lightning_curvature.functional.model.functional_model import (
    FunctionalModel,
    LossFn,
    probe_dtype,
)
from lightning_curvature.functional.model.parameters import (
    ParameterLayout,
    ParameterPatterns,
    select_parameters,
)
from lightning_curvature.functional.model.probe import BatchNormMode, probe_context, unwrap_model
from lightning_curvature.functional.operator.backends import AllReduce
from lightning_curvature.functional.operator.probe_loss import ProbeLoss
from lightning_curvature.functional.operator.sharded_gradients import ShardedGradients

__all__ = ["DisplacedLoss"]


class DisplacedLoss:
    """``L(w + δ)`` of ``loss_fn(model, batch)`` for flat displacements ``δ``; a context manager.

    Args:
        model: the module (``torch.compile`` and DDP wrappers are looked through).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: one batch or an iterable of batches (size-weighted mean loss).
        parameters: glob pattern(s) of the measured parameters (all trainable by default).
        batch_norm: BatchNorm mode during the probe (running statistics never change).
        all_reduce: averages a tensor over processes (DDP); each process's loss and gradient
            enter weighted by its share of the examples. Not used over sharded parameters,
            whose losses are summed over the shards' processes.

    Attributes:
        layout: the measured parameters' flat layout (``layout.size`` entries in ``δ``; this
            process's shards over FSDP2 parameters).
        shards: how ``δ`` and the gradient are split across processes (whole unless the
            parameters are FSDP2 shards): their inner products go through it.
        dtype: the probe dtype (float64 for a float64 model, else float32).
        device: the parameters' device.
        num_forwards: forward passes of the probe's batches so far (a gradient counts one).

    Raises:
        ValueError: if only some measured parameters are FSDP2 shards.

    Example:
        >>> net = nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(2.0)
        >>> with DisplacedLoss(net, lambda m, b: m(b).pow(2).mean(), torch.ones(3, 1)) as loss:
        ...     loss.at(torch.tensor([1.0])), loss.gradient(), loss.num_forwards  # (w + 1)², 2w
        (tensor(9.), (tensor(4.), tensor([4.])), 2)
        >>> net.weight.tolist()  # never moved
        [[2.0]]
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        *,
        parameters: ParameterPatterns = None,
        batch_norm: BatchNormMode = "as_is",
        all_reduce: AllReduce | None = None,
    ) -> None:
        self.model = unwrap_model(model)
        named = select_parameters(self.model, parameters)
        sharding = fsdp_shards([p for _, p in named])
        self._locals = [local_tensor(p) for _, p in named]  # the parameters if whole
        self.layout = ParameterLayout.from_named(
            [(name, t) for (name, _), t in zip(named, self._locals, strict=True)]
        )
        self.shards = sharding or VectorShards.single(self.layout.size)
        self._parameters = [p for _, p in named]
        self.device = named[0][1].device
        self._loss_fn = loss_fn
        self._functional = None if sharding else FunctionalModel(self.model, loss_fn, named)
        self.dtype = probe_dtype(self._parameters)
        self._batches = split_batches(batch, self.device)
        self._batch_norm = batch_norm
        self._all_reduce = all_reduce
        self._union: UnionMean | None = None  # while open, with all_reduce
        self._stack: contextlib.ExitStack | None = None
        self._losses: ProbeLoss | None = None
        self._sharded: ShardedGradients | None = None  # while open over FSDP2 shards
        self.num_forwards = 0

    def __enter__(self) -> DisplacedLoss:
        stack = contextlib.ExitStack()
        self._stack = stack
        try:  # a failure here leaves nothing entered: modes and kernels put back
            callers_kernels = _cur_sdpa_kernel_backends()
            stack.enter_context(probe_context(self.model, batch_norm=self._batch_norm))
            stack.enter_context(sdpa_kernel(callers_kernels))  # first order: training's kernels
            if self._functional is None:  # FSDP2: the local shards displaced in place
                union = UnionMean.of(self._shard_mean, self._batches.size, self.device)
                self._sharded = ShardedGradients(  # each loss weighted by its share
                    self.model,
                    self._loss_fn,
                    self._batches,
                    self._parameters,
                    self._locals,
                    union.share,
                )
                self._sharded.enter(stack)
                return self
            self._losses = ProbeLoss(self._functional, self._batches)
            if self._all_reduce is not None:  # (one collective: the processes' example counts)
                self._union = UnionMean.of(self._all_reduce, self._batches.size, self.device)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._losses = self._sharded = None
        self._union = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def _open(self) -> ProbeLoss | ShardedGradients:
        opened = self._losses or self._sharded
        if opened is None:
            raise RuntimeError("DisplacedLoss must be used inside `with DisplacedLoss(...)`.")
        return opened

    def _shard_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the shards' processes over their number (a tensor of our own)."""
        return self.shards.all_sum(tensor) / self.shards.num_shards

    def _mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._sharded is not None:  # its losses carry this process's share already
            return self._shard_mean(tensor)
        return tensor if self._union is None else self._union(tensor)

    def at(self, displacement: torch.Tensor | None = None) -> torch.Tensor:
        """The probe loss at ``w + displacement`` (``None``: at ``w``), one forward pass.

        Raises:
            ValueError: if ``displacement`` is not a flat vector over the measured parameters.
        """
        losses = self._open()
        step = None
        if displacement is not None:
            if displacement.shape != (self.layout.size,):
                raise ValueError(
                    f"a displacement must have shape ({self.layout.size},) over the "
                    f"measured parameters, got {tuple(displacement.shape)}."
                )
            step = self.layout.split(displacement.to(device=self.device, dtype=self.dtype))
        if isinstance(losses, ShardedGradients):
            loss = losses.loss_at(step)
        else:
            leaves: list[torch.Tensor] = list(losses.leaves)
            with torch.no_grad():
                if step is not None:
                    leaves = [p + d for p, d in zip(leaves, step, strict=True)]
                loss = losses.weighted_loss(leaves).detach()
        self.num_forwards += 1
        return self._mean(loss)

    def gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L(w), ∇L(w))``: the loss and its flat first-order gradient (one forward and backward).

        No graph is kept and no second derivative is needed, so this runs wherever training's
        own backward does (fused attention kernels excepted: the probe selects the math one).
        Over FSDP2 shards, this process's shard of the gradient (FSDP's mean).
        """
        losses = self._open()
        self.num_forwards += 1
        if isinstance(losses, ShardedGradients):  # the gradient is FSDP's mean already
            grads = losses.gradient(None, 0.0)
            return self._mean(losses.loss.to(self.device)), self.layout.flatten(grads)
        leaves = list(losses.leaves)

        def loss_and_gradient(batch: Any) -> tuple[torch.Tensor, ...]:
            loss = losses.loss(leaves, batch)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
            return (loss.detach(), *(g.detach() for g in grads))

        loss, *grads = losses.weighted_sum(loss_and_gradient)
        return self._mean(loss), self._mean(self.layout.flatten(grads))
