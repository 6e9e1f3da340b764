"""Which backend takes each product of an open operator, and ``backend="auto"``'s way down.

:class:`BackendDispatch` opens the backend a
:class:`~lightning_curvature.functional.operator.operator.HessianOperator` runs (the
retained graph, the probe loss for the recomputing backends, the finite difference's loss
with its graph checked, the shards' gradients under FSDP2, the GGN's outputs) and sends
each product to it. With ``backend="auto"`` it goes down the backends where one cannot run,
before the first product is returned: ``"retained_graph"``, then ``"forward_over_reverse"``
(no double backward), then ``"finite_difference"`` (no forward-mode derivative either, or a
double backward torch computes wrong), each step said once
(:mod:`~lightning_curvature.functional.operator.fallback`). It also tells the operator's
self-check (:mod:`~lightning_curvature.functional.operator.self_check`) what it needs: the
dtype the model computes in and the suspects of the loss's graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_curvature.functional.model.batches import ProbeBatches
from lightning_curvature.functional.model.functional_model import FunctionalModel, LossFn
from lightning_curvature.functional.model.parameters import ParameterLayout
from lightning_curvature.functional.operator.autodiff_backends import AutodiffProducts
from lightning_curvature.functional.operator.backends import FallBack, HVPBackend
from lightning_curvature.functional.operator.fallback import Fallback, first_line
from lightning_curvature.functional.operator.finite_difference import FiniteDifferenceProducts
from lightning_curvature.functional.operator.ggn import Curvature, OutputLoss
from lightning_curvature.functional.operator.graph_checks import (
    DerivativeChecks,
    FloatingDtypes,
    WrongSecondDerivative,
    is_missing_derivative,
)
from lightning_curvature.functional.operator.kinks import check_smooth
from lightning_curvature.functional.operator.probe_loss import ProbeLoss
from lightning_curvature.functional.operator.self_check import ProductCheck, rounding_dtype
from lightning_curvature.functional.operator.sharded_gradients import ShardedGradients

__all__ = ["BackendDispatch"]


class BackendDispatch:
    """The backend of one operator, opened, and each product sent to it.

    Args:
        model: the (unwrapped) module.
        named: the measured parameters with their names.
        backend: the backend asked for (``"auto"`` resolved on :meth:`open`).
        finite_difference: the operator's finite-difference products (step, compute dtype).
        check: the operator's self-check (told the compute dtype and the graph's suspects).
        check_finite_loss: the operator's check that a probe loss is finite (all-reduced).

    Attributes:
        backend: the backend that runs.
        fallback: ``backend="auto"``'s fallback and its note.
        checks: the checks of the loss's graph and the explanations of a failure.
        autodiff: the exact products and their graphs (``None`` until open, sharded or closed).
    """

    def __init__(
        self,
        model: nn.Module,
        named: Sequence[tuple[str, nn.Parameter]],
        backend: HVPBackend,
        finite_difference: FiniteDifferenceProducts,
        check: ProductCheck,
        check_finite_loss: Callable[[torch.Tensor], None],
    ) -> None:
        self._model = model
        self._named = named
        self.backend: HVPBackend = backend
        self.fallback = Fallback(backend)
        self._names = [name for name, _ in named]
        self.checks = DerivativeChecks(model, [p for _, p in named], self._names)
        self._finite_difference = finite_difference
        self._check = check
        self._check_finite_loss = check_finite_loss
        self._losses: ProbeLoss | None = None  # the probe loss at any weights, while open
        self.autodiff: AutodiffProducts | None = None
        self._sharded: ShardedGradients | None = None  # while open and sharded

    def open_sharded(self, stack: contextlib.ExitStack, sharded: ShardedGradients) -> torch.Tensor:
        """Open finite differences over FSDP2 shards; return the probe loss."""
        self._sharded = sharded
        loss = sharded.open(stack, self._finite_difference.note_compute_dtype)
        self._rounds_in(self._finite_difference.compute_dtype, sharded.saved)
        self._check.suspects = sharded.suspects
        return loss

    def open(self, loss_fn: LossFn, probe: ProbeBatches, curvature: Curvature) -> None:
        """Build what the backend's products go through, checking the loss and its graph.

        Raises:
            ValueError: if the loss reaches none of the measured parameters, or (finite
                differences) a kinked op lies in its graph.
            RuntimeError: if no backend can pass through the model (explained).
        """
        ggn = isinstance(loss_fn, OutputLoss) and curvature == "ggn"
        called = loss_fn.output_fn if ggn else loss_fn  # type: ignore[attr-defined]
        losses = ProbeLoss(FunctionalModel(self._model, called, self._named), probe)
        self._losses = losses
        autodiff = AutodiffProducts(losses, self.checks, self._check_finite_loss)
        self.autodiff = autodiff
        if ggn:
            assert isinstance(loss_fn, OutputLoss)
            self.backend = autodiff.open_gauss_newton(loss_fn.loss, self.backend)
            self._rounds_in(losses.leaves[0].dtype, losses.leaves)
            return
        if self.backend == "finite_difference":
            self._open_finite_differences()
            return
        with FloatingDtypes() as seen:  # the self-check's tolerance is for the compute dtype
            if self.backend in ("auto", "retained_graph"):
                try:
                    autodiff.retain(self.backend)
                    self.backend = "retained_graph"
                except FallBack as fallback:
                    self.checks.earlier = fallback.reason
                    self._fall_back(fallback.reason)
                except WrongSecondDerivative as wrong:
                    reason = f"torch's double backward is wrong here ({wrong.reason})"
                    self._fall_back_to_finite_differences(wrong, reason)
                    return
            if self.backend != "retained_graph":
                loss = losses.weighted_loss(losses.leaves)
                self.checks.check_graph(loss, losses.leaves, self.backend)
                self._check_finite_loss(loss.detach())
        dtypes = seen.dtypes | {losses.leaves[0].dtype}
        self._rounds_in(min(dtypes, key=lambda d: torch.finfo(d).bits), losses.leaves)
        self._check.suspects = self.checks.suspects

    def _open_finite_differences(self) -> None:
        """The loss at ``w`` for finite differences, its graph checked (kinks, dependence)."""
        assert self._losses is not None
        finite_difference = self._finite_difference
        self._check_finite_loss(finite_difference.loss(self._losses, self._names))
        self._rounds_in(finite_difference.compute_dtype, self._losses.leaves)
        self._check.suspects = finite_difference.suspects

    def _rounds_in(self, dtype: torch.dtype, tensors: Sequence[torch.Tensor]) -> None:
        """Tell the self-check the dtype the products round in (TF32 counted)."""
        device = tensors[0].device if tensors else torch.device("cpu")
        self._check.compute_dtype = rounding_dtype(dtype, device, self._model)

    def gradient(self) -> list[torch.Tensor]:
        """``∇L(w)`` by the backend that runs (sharded: this shard of FSDP's mean)."""
        if self._sharded is not None:
            return self._sharded.gradient(None, 0.0)
        assert self.autodiff is not None
        return self.autodiff.gradient()

    def close(self) -> None:
        """Free the graphs and the copies of the weights."""
        self.autodiff = self._losses = self._sharded = None

    def _fall_back(self, err: RuntimeError) -> None:
        self.backend = "forward_over_reverse"
        self.fallback.to(self.backend, f"it has no double backward ({first_line(err)})")

    def _fall_back_to_finite_differences(self, err: RuntimeError, reason: str) -> None:
        """``"auto"`` to finite differences (a smooth model only), said once.

        Raises:
            RuntimeError: if the model has kinks, naming them and ``err``.
        """
        try:
            check_smooth(self._model)
            self._open_finite_differences()
        except ValueError as kinked:
            raise RuntimeError(f"{err}\nbackend='auto' cannot fall back: {kinked}") from err
        self.backend = "finite_difference"
        self.fallback.to(self.backend, reason)

    # -- products --------------------------------------------------------------------------
    def product(self, vs: list[torch.Tensor], first: bool) -> torch.Tensor:
        """``H v``, flat, by the backend that runs.

        ``first``: the operator's first product, the last chance of ``"auto"`` to fall back;
        once it has run, a fallback is said (once, naming the backend that ran).
        """
        may_fall_back = self.fallback.allowed and first
        hv = self._product(vs, may_fall_back)
        if may_fall_back:
            self.fallback.announce()
        return hv

    @property
    def batches_products(self) -> bool:
        """Whether :meth:`products` takes several vectors at once (the retained graph, H).

        The retained gradient graph of the Hessian on one process's parameters: not sharded,
        not the GGN.
        """
        autodiff = self.autodiff
        return (
            self.backend == "retained_graph"
            and autodiff is not None
            and autodiff.retained is not None
            and autodiff.ggn is None
            and self._sharded is None
        )

    def products(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``H v`` of a batch of vectors (a leading dimension) in one batched backward.

        Raises:
            RuntimeError: where the backward cannot be vectorised (an op without a batching
                rule that cannot fall back), explained like a single product's error.
        """
        assert self.batches_products
        assert self.autodiff is not None
        try:
            return self.autodiff.retained_products(vs)
        except RuntimeError as err:
            if not is_missing_derivative(err):
                raise
            raise self.checks.explain(err, "retained_graph") from err

    def _product(self, vs: list[torch.Tensor], may_fall_back: bool) -> torch.Tensor:
        """Flat: the exact backward products are taken into one buffer, the others joined."""
        autodiff = self.autodiff
        flatten = ParameterLayout.flatten
        if autodiff is not None and autodiff.ggn is not None:
            return flatten(self._gauss_newton(vs, may_fall_back))
        if self.backend == "retained_graph":
            assert autodiff is not None
            try:
                return autodiff.retained_product(vs)
            except RuntimeError as err:
                if not is_missing_derivative(err):
                    raise
                if not may_fall_back:
                    raise self.checks.explain(err, "retained_graph") from err
                autodiff.retained, self.checks.earlier = None, err
                self._fall_back(err)
                return flatten(self._forward_over_reverse_or_difference(vs, may_fall_back))
        if self.backend == "double_backward":
            assert autodiff is not None
            return autodiff.double_backward(vs)
        if self.backend == "finite_difference":
            return flatten(self.finite_difference_product(vs))
        return flatten(self._forward_over_reverse_or_difference(vs, may_fall_back))

    def _gauss_newton(self, vs: list[torch.Tensor], may_fall_back: bool) -> list[torch.Tensor]:
        """``G v``; ``"auto"`` turns to forward mode if the first reverse product cannot run."""
        autodiff = self.autodiff
        assert autodiff is not None
        try:
            return autodiff.gauss_newton(vs, self.backend)
        except RuntimeError as err:
            if not is_missing_derivative(err):
                raise
            if self.backend == "forward_over_reverse" or not may_fall_back:
                raise self.checks.explain(err, self.backend) from err
            autodiff.linearized, self.checks.earlier = None, err
            self._fall_back(err)
            return self._gauss_newton(vs, False)

    def _forward_over_reverse_or_difference(
        self, vs: list[torch.Tensor], may_fall_back: bool
    ) -> list[torch.Tensor]:
        """Forward over reverse; with ``backend="auto"``, finite differences where it has none."""
        assert self.autodiff is not None
        try:
            return self.autodiff.forward_over_reverse(vs)
        except RuntimeError as err:
            cause = err.__cause__
            if not (may_fall_back and isinstance(cause, RuntimeError)):
                raise
            if not is_missing_derivative(cause):
                raise
            earlier = self.checks.earlier
            before = f"a double backward ({first_line(earlier)}) nor " if earlier else ""
            reason = f"it has neither {before}a forward-mode derivative ({first_line(cause)})"
            self._fall_back_to_finite_differences(err, reason)
            return self.finite_difference_product(vs)

    def finite_difference_product(
        self, vs: list[torch.Tensor], scale: float = 1.0
    ) -> list[torch.Tensor]:
        """The finite difference, its gradients at this shard or at copies of the weights."""
        source = self._sharded or self._losses
        assert source is not None
        return self._finite_difference.product(vs, source, scale)
