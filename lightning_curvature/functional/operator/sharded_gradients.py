"""Gradients of an FSDP2-sharded model at weights perturbed in place, for finite differences.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor`` shard and there
is no double backward through the sharding hooks (``autograd.grad(..., create_graph=True)``
reports the parameters unused; going through the unsharded parameters with ``unshard()``
fails too, as FSDP frees their storage in its backward hooks). Only ``"finite_difference"``
(and ``"auto"``, which picks it) can run; the others are refused
(:func:`~lightning_curvature.functional.operator.backends.sharded_backend`). Each process
then holds its shard of every vector (:attr:`HessianOperator.size` is the local length,
:attr:`HessianOperator.shards` the split, see
:mod:`~lightning_curvature.functional.linalg.sharded`): the two gradients are ordinary
``loss.backward()`` calls of the model itself at weights perturbed in place on the local
shards, restored exactly from a saved copy after each, and FSDP's reduce-scatter averages
them across processes (every process probes its own batch, as under DDP). ``.grad`` is saved
before the probe and put back after it. The parameters must be float32 or float64 (a finite
difference in bf16 resolves nothing).

Inside a probe's agreement every sharded module's forward and every backward starts with a
status collective (:func:`~lightning_curvature.functional.distributed.agreement.checked_forwards`),
so a process that failed before one of FSDP's all-gathers or reduce-scatters (a
``training_step`` that raises before its forward, a loss that is not a scalar or not
finite) meets its peers there instead of leaving them in FSDP's collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_curvature.errors import NonFiniteCurvatureError
from lightning_curvature.functional.distributed.agreement import check_agreement, checked_forwards
from lightning_curvature.functional.linalg.sharded import local_tensor
from lightning_curvature.functional.model.batches import ProbeBatches
from lightning_curvature.functional.model.functional_model import (
    LossFn,
    call_loss,
    check_scalar_loss,
)
from lightning_curvature.functional.operator.graph_checks import (
    FloatingDtypes,
    check_reaches,
    nodes_reaching,
)
from lightning_curvature.functional.operator.kinks import check_no_kinks
from lightning_curvature.functional.operator.probe_loss import TorchRandomState

__all__ = ["ShardedGradients", "fsdp_modules"]


class ShardedGradients:
    """This shard of the probe loss's gradient at the local shards moved in place.

    Args:
        model: the (unwrapped) FSDP2 model.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        probe: the probe's batches and their weights.
        parameters: the measured parameters (``DTensor`` shards).
        local_tensors: this process's piece of each (aliases of their storage).
        share: this process's examples over the mean number per process: its loss's weight,
            so that FSDP's mean of the gradients is the union batch's (1: equal sizes).

    Attributes:
        saved: copies of the local shards' values (taken by :meth:`open`), the weights ``w``.
        suspects: the ops of the loss's graph named if the self-check fails (see
            :func:`~lightning_curvature.functional.operator.kinks.kink_suspects`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        probe: ProbeBatches,
        parameters: Sequence[torch.Tensor],
        local_tensors: Sequence[torch.Tensor],
        share: float = 1.0,
    ) -> None:
        self._model = model
        self._share = share
        self._loss_fn = loss_fn
        self._probe = probe
        self._parameters = parameters
        self._locals = local_tensors
        self.saved: list[torch.Tensor] = []
        self.suspects: list[str] = []
        self._random: TorchRandomState | None = None  # the draws every gradient starts from
        self._owners: list[nn.Parameter] = []  # every parameter, whose .grad is saved
        self._fsdp: list[nn.Module] = []

    def open(
        self,
        stack: contextlib.ExitStack,
        note_compute_dtype: Callable[[set[torch.dtype]], None],
    ) -> torch.Tensor:
        """Save ``.grad`` (put back when ``stack`` closes) and the local shards.

        Returns:
            the probe loss (detached), its graph checked for kinks and the dtypes its forward
            computed in passed to ``note_compute_dtype``.

        Raises:
            ValueError: if the loss depends on no parameter.
            PiecewiseLinearError: if a kinked op lies in the loss's graph.
        """
        fsdp = fsdp_modules(self._model)
        owners = list(self._model.parameters())
        grads = [p.grad for p in owners]

        def restore() -> None:
            _reshard(fsdp)  # the parameters registered again are the sharded ones
            for p, grad in zip(owners, grads, strict=True):
                p.grad = grad

        stack.callback(restore)
        stack.enter_context(checked_forwards(fsdp))
        for p in owners:
            p.grad = None
        self._owners, self._fsdp = owners, fsdp
        _reshard(fsdp)
        self.saved = [t.detach().clone() for t in self._locals]
        self._random = TorchRandomState(self.saved[0].device if self.saved else torch.device("cpu"))
        with FloatingDtypes() as seen:  # with its graph: the kinks are looked for in it
            loss = self._module_loss()
        nodes = nodes_reaching(loss, None)  # every parameter is measured over shards
        check_reaches(nodes, [f"{len(self._parameters)} sharded parameters"])
        self.suspects = check_no_kinks(nodes)
        note_compute_dtype(seen.dtypes)
        _reshard(fsdp)
        return loss.detach()

    def _rewind(self) -> None:
        if self._random is not None:
            self._random.restore()

    def _module_loss(self) -> torch.Tensor:
        """The weighted probe loss of the model itself (its hooks, e.g. FSDP's, run)."""
        self._rewind()
        total = sum(
            w * check_scalar_loss(call_loss(self._loss_fn, self._model, b))
            for b, w in zip(self._probe.batches, self._probe.weights, strict=True)
        )
        return total  # type: ignore[return-value]

    def gradient(self, vs: list[torch.Tensor], step: float) -> list[torch.Tensor]:
        """This shard of ``∇L(w + step·v)``: the local shards moved in place, then restored."""
        try:
            with torch.no_grad():
                for local, saved, v in zip(self._locals, self.saved, vs, strict=True):
                    local.copy_(saved).add_(v, alpha=step)
            self._rewind()
            for batch, weight in zip(self._probe.batches, self._probe.weights, strict=True):
                loss = weight * check_scalar_loss(call_loss(self._loss_fn, self._model, batch))
                loss = loss if self._share == 1.0 else loss * self._share
                if not bool(torch.isfinite(loss)):
                    raise NonFiniteCurvatureError(f"the probe loss is not finite ({float(loss)}).")
                check_agreement()  # before FSDP's reduce-scatter: a failure above is met here
                loss.backward()  # type: ignore[no-untyped-call]
            grads = [
                torch.zeros_like(local) if p.grad is None else local_tensor(p.grad).detach()
                for p, local in zip(self._parameters, self._locals, strict=True)
            ]
        finally:
            with torch.no_grad():
                for local, saved in zip(self._locals, self.saved, strict=True):
                    local.copy_(saved)
            for p in self._owners:
                p.grad = None
            _reshard(self._fsdp)
        return grads


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 (``fully_shard``) modules of ``model``, outermost first.

    Example:
        >>> fsdp_modules(nn.Linear(1, 1))
        []
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _reshard(modules: Sequence[nn.Module]) -> None:
    """Put FSDP2 modules back in their sharded state (a no-op for those already in it).

    FSDP keeps the root's gathered parameters after a forward; the perturbations act on the
    local shards, so a stale gathered copy must never be reused.
    """
    for module in modules:
        module.reshard()  # type: ignore[operator]
