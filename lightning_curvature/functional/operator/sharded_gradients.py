"""Gradients and losses of an FSDP2-sharded model at weights displaced in place on its shards.

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

The same displacement (:meth:`ShardedGradients.displaced`, the only one of the package over
shards) serves the forward passes of loss slices and critical sharpness
(:meth:`ShardedGradients.loss_at`, through
:class:`~lightning_curvature.functional.operator.displaced_loss.DisplacedLoss`): the loss of
the model itself at ``w + t·d`` for a direction held as this process's shard, the model's
weights ``w`` bit for bit again after each point.

Inside a probe's agreement every sharded module's forward and every backward starts with a
status collective (:func:`~lightning_curvature.functional.distributed.agreement.checked_forwards`),
so a process that failed before one of FSDP's all-gathers or reduce-scatters (a
``training_step`` that raises before its forward, a loss that is not a scalar or not
finite) meets its peers there instead of leaving them in FSDP's collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

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
        self.loss = torch.zeros((), dtype=torch.float64)  # this process's share, last gradient
        self._random: TorchRandomState | None = None  # the draws every gradient starts from
        self._owners: list[nn.Parameter] = []  # every parameter, whose .grad is saved
        self._fsdp: list[nn.Module] = []

    def enter(self, stack: contextlib.ExitStack) -> None:
        """Save ``.grad`` and the local shards; put ``.grad`` back when ``stack`` closes.

        What every use of the shards at other weights starts with: the finite difference's
        gradients (:meth:`open`) and the forward passes of loss slices and critical sharpness
        (:class:`~lightning_curvature.functional.operator.displaced_loss.DisplacedLoss`).
        Every sharded module's forward then starts with a status collective of the probe.
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

    def open(
        self,
        stack: contextlib.ExitStack,
        note_compute_dtype: Callable[[set[torch.dtype]], None],
    ) -> torch.Tensor:
        """:meth:`enter`, then the probe loss at ``w`` with its graph checked (for products).

        Returns:
            the probe loss (detached), its graph checked for kinks and the dtypes its forward
            computed in passed to ``note_compute_dtype``.

        Raises:
            ValueError: if the loss depends on no parameter.
            PiecewiseLinearError: if a kinked op lies in the loss's graph.
        """
        self.enter(stack)
        with FloatingDtypes() as seen:  # with its graph: the kinks are looked for in it
            loss = self._module_loss()
        nodes = nodes_reaching(loss, None)  # every parameter is measured over shards
        check_reaches(nodes, [f"{len(self._parameters)} sharded parameters"])
        self.suspects = check_no_kinks(nodes)
        note_compute_dtype(seen.dtypes)
        _reshard(self._fsdp)
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

    @contextlib.contextmanager
    def displaced(self, vs: Sequence[torch.Tensor] | None, step: float) -> Iterator[None]:
        """The local shards at ``w + step·v`` (``None``: at ``w``) inside the block.

        The one displacement of FSDP2 shards: written in place from the saved copy, and
        restored by copying it back (never by subtracting), so the weights after the block
        are ``w`` bit for bit; ``.grad`` is cleared and the modules resharded after it.
        """
        try:
            with torch.no_grad():
                if vs is None:
                    for local, saved in zip(self._locals, self.saved, strict=True):
                        local.copy_(saved)
                else:
                    for local, saved, v in zip(self._locals, self.saved, vs, strict=True):
                        local.copy_(saved).add_(v, alpha=step)
            self._rewind()
            yield
        finally:
            with torch.no_grad():
                for local, saved in zip(self._locals, self.saved, strict=True):
                    local.copy_(saved)
            for p in self._owners:
                p.grad = None
            _reshard(self._fsdp)

    def _weighted_losses(self, finite: bool = True) -> Iterator[torch.Tensor]:
        """Each batch's weighted loss times this process's share (``finite``: checked so)."""
        for batch, weight in zip(self._probe.batches, self._probe.weights, strict=True):
            loss = weight * check_scalar_loss(call_loss(self._loss_fn, self._model, batch))
            loss = loss if self._share == 1.0 else loss * self._share
            if finite and not bool(torch.isfinite(loss)):
                raise NonFiniteCurvatureError(f"the probe loss is not finite ({float(loss)}).")
            yield loss

    def gradient(self, vs: Sequence[torch.Tensor] | None, step: float) -> list[torch.Tensor]:
        """This shard of ``∇L(w + step·v)`` (``vs=None``: of ``∇L(w)``), FSDP's mean.

        :attr:`loss` is then this process's share of the loss there (summed over the
        processes and divided by their number, the union batch's).
        """
        total = torch.zeros((), dtype=torch.float64)
        with self.displaced(vs, step):
            for loss in self._weighted_losses():
                check_agreement()  # before FSDP's reduce-scatter: a failure above is met here
                loss.backward()  # type: ignore[no-untyped-call]
                total = total.to(loss.device) + loss.detach().double()
            grads = [
                torch.zeros_like(local) if p.grad is None else local_tensor(p.grad).detach()
                for p, local in zip(self._parameters, self._locals, strict=True)
            ]
        self.loss = total
        return grads

    def loss_at(self, vs: Sequence[torch.Tensor] | None, step: float = 1.0) -> torch.Tensor:
        """This process's share of the loss at ``w + step·v`` (``None``: at ``w``), forwards only.

        Summed over the processes and divided by their number, the union batch's loss.
        Under ``torch.no_grad``: FSDP's all-gathers run, no reduce-scatter. A loss that is
        not finite is returned as it is (the sum is then not finite on every process).
        """
        total = torch.zeros((), dtype=torch.float64)
        with self.displaced(vs, step), torch.no_grad():
            for loss in self._weighted_losses(finite=False):
                total = total.to(loss.device) + loss.detach().double()
        return total


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
