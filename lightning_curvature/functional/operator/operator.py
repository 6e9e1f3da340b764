"""The one Hessian-vector product of the project: its public face and its lifecycle.

:class:`HessianOperator` turns ``loss_fn(model, batch)`` into the linear map ``v -> H v`` on
flat vectors over the selected trainable parameters (Pearlmutter 1994:
``H v = ∇⟨∇L(w), v⟩``). Every estimator (Lanczos, trace, SLQ) calls its ``matvec``;
:func:`~lightning_curvature.functional.operator.hvp.hessian_vector_product` takes one
product. The operator opens the probe (entering it), hands each product to its backend and,
with ``backend="auto"``, falls back to the next backend on the first product that cannot run.
The backends, their costs and the fallback order are in
:mod:`~lightning_curvature.functional.operator.backends`; the exact ones in
:mod:`~lightning_curvature.functional.operator.autodiff_backends`, the finite difference in
:mod:`~lightning_curvature.functional.operator.finite_difference`, its gradients over
sharded (FSDP2) parameters in :mod:`~lightning_curvature.functional.operator.sharded_gradients`,
and the checks of the graph in :mod:`~lightning_curvature.functional.operator.graph_checks`.

With ``curvature="ggn"`` the operator multiplies by the generalized Gauss–Newton matrix
``G = Jᵀ H_ℓ J`` instead (:mod:`~lightning_curvature.functional.operator.ggn`; ``loss_fn`` an
:class:`~lightning_curvature.functional.operator.ggn.OutputLoss`), with the same backends but
``"finite_difference"``.

The model is called through the one functional adapter of the package,
:class:`~lightning_curvature.functional.model.functional_model.FunctionalModel`: detached aliases of
the parameters' storage (no data is copied for fp32/fp64 models), so autograd never touches
the user's parameters or their ``.grad``, and one dtype policy (every floating parameter,
buffer and input narrower than the probe dtype is promoted to it: fp32 for a bf16/fp16
model). Errors the model raises in its forward pass through unchanged; errors raised while
differentiating are explained as a missing second derivative only where they are one.
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.nn.attention import _cur_sdpa_kernel_backends, sdpa_kernel

from lightning_curvature.checks import check_callable
from lightning_curvature.errors import NonFiniteCurvatureError
from lightning_curvature.functional.distributed.union import UnionMean
from lightning_curvature.functional.linalg.sharded import VectorShards, fsdp_shards, local_tensor
from lightning_curvature.functional.model.batches import ProbeBatches, split_batches
from lightning_curvature.functional.model.functional_model import (
    FunctionalModel,
    LossFn,
    check_measurable,
    probe_dtype,
)
from lightning_curvature.functional.model.parameters import (
    ParameterLayout,
    ParameterPatterns,
    select_parameters,
)
from lightning_curvature.functional.model.probe import BatchNormMode, probe_context, unwrap_model
from lightning_curvature.functional.operator.autodiff_backends import AutodiffProducts
from lightning_curvature.functional.operator.backends import (
    AllReduce,
    FallBack,
    HVPBackend,
    check_curvature,
    check_settings,
    sharded_backend,
)
from lightning_curvature.functional.operator.finite_difference import FiniteDifferenceProducts
from lightning_curvature.functional.operator.ggn import Curvature, OutputLoss
from lightning_curvature.functional.operator.graph_checks import (
    DerivativeChecks,
    check_smooth,
    is_missing_derivative,
)
from lightning_curvature.functional.operator.probe_loss import ProbeLoss
from lightning_curvature.functional.operator.sharded_gradients import ShardedGradients

__all__ = ["HessianOperator"]


class HessianOperator:
    """Hessian of ``loss_fn(model, batch)`` over trainable parameters, as ``v -> H v``.

    Use it as a context manager: entering it puts the model in probe conditions
    (:func:`~lightning_curvature.functional.model.probe.probe_context`) and builds the gradient
    graph for the ``"retained_graph"`` backend; leaving it frees the graph and restores the
    model exactly.

    Args:
        model: the module (``torch.compile`` and DDP wrappers are looked through).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: one batch or an iterable of batches (size-weighted mean loss).
        parameters: glob pattern(s) of parameter names to measure; all trainable by default.
        backend: Hessian-vector product strategy (see
            :mod:`~lightning_curvature.functional.operator.backends`).
        batch_norm: BatchNorm mode during the probe (``"as_is"``, ``"eval"``, ``"train"``).
        dropout: keep dropout on during the probe (default off).
        all_reduce: optional function averaging a tensor across processes (DDP); every
            product and gradient goes through it, each process's weighted by its share of
            the examples (:class:`~lightning_curvature.functional.distributed.union.UnionMean`),
            so all ranks see the operator of the union of their batches. Not used over
            sharded parameters, whose products FSDP averages (each process's loss weighted
            by its share there). A failure on one process is
            agreed by all inside an
            :class:`~lightning_curvature.functional.distributed.agreement.Agreement`'s probe
            (the callbacks run every probe in one).
        curvature: ``"hessian"`` (default) or ``"ggn"``: the generalized Gauss–Newton
            matrix ``Jᵀ H_ℓ J``, for a ``loss_fn`` that is an
            :class:`~lightning_curvature.functional.operator.ggn.OutputLoss`.

    Attributes:
        shards: how the vectors ``matvec`` takes are split across processes (whole here
            unless the parameters are FSDP2 shards).

    Raises:
        ValueError: on an unknown ``backend`` or ``curvature``, ``curvature="ggn"`` without
            an ``OutputLoss`` or with ``backend="finite_difference"``, no trainable
            parameters, complex measured parameters, an empty batch iterable, or a loss
            that is not a scalar; over sharded parameters, on a backend other than
            ``"auto"``/``"finite_difference"``, ``curvature="ggn"``, a piecewise-linear
            model or parameters narrower than float32.
        NonFiniteCurvatureError: if this process's loss or product is NaN or infinite.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()
        >>> with HessianOperator(net, loss_fn, x) as H:  # H = 2 XᵀX / n = diag(1, 4)
        ...     H.matvec(torch.tensor([1.0, 1.0]))
        tensor([1., 4.])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        *,
        parameters: ParameterPatterns = None,
        backend: HVPBackend = "auto",
        batch_norm: BatchNormMode = "as_is",
        dropout: bool = False,
        all_reduce: AllReduce | None = None,
        curvature: Curvature = "hessian",
    ) -> None:
        check_settings(
            parameters=parameters,
            backend=backend,
            batch_norm=batch_norm,
            dropout=dropout,
            curvature=curvature,
            all_reduce=all_reduce,
        )
        check_callable("loss_fn", loss_fn, "loss_fn(model, batch)")
        check_curvature(curvature, loss_fn, backend)
        self.model = unwrap_model(model)
        self._named = select_parameters(self.model, parameters)
        check_measurable(self._named)
        self._parameters = [p for _, p in self._named]
        sharding = fsdp_shards(self._parameters)
        self._locals = [local_tensor(p) for p in self._parameters]  # the parameters if whole
        self.layout = ParameterLayout.from_named(
            [(name, t) for (name, _), t in zip(self._named, self._locals, strict=True)]
        )
        self.shards = sharding or VectorShards.single(self.layout.size)
        self._sharded = sharding is not None  # FSDP2 DTensor parameters (one shard or more)
        self.device = self._parameters[0].device
        self.dtype = probe_dtype(self._parameters)
        if sharding is not None:
            backend = sharded_backend(backend, curvature, self.dtype, self._parameters)
        if backend == "finite_difference":
            check_smooth(self.model)
        self.backend: HVPBackend = backend
        self._may_fall_back = backend == "auto"
        self._checks = DerivativeChecks(self.model, self._parameters)  # and why auto fell back
        self.num_hvps = 0
        self.curvature: Curvature = curvature
        self._loss_fn = loss_fn
        self._probe: ProbeBatches = split_batches(batch, self.device)
        self._batch_norm = batch_norm
        self._dropout = dropout
        self._all_reduce = all_reduce
        self._mean: UnionMean | None = None  # the union batch's mean, while open (DDP)
        self._stack: contextlib.ExitStack | None = None
        self._losses: ProbeLoss | None = None  # the probe loss at any weights, while open
        self._autodiff: AutodiffProducts | None = None  # the exact products and their graphs
        self._finite_difference = FiniteDifferenceProducts(self.dtype, self.shards, self.device)
        self._sharded_gradients: ShardedGradients | None = None  # while open and sharded
        self.loss: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Length of the vectors ``matvec`` takes: the measured parameters (this shard's)."""
        return self.layout.size

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> HessianOperator:
        stack = contextlib.ExitStack()
        callers_kernels = _cur_sdpa_kernel_backends()
        stack.enter_context(
            probe_context(self.model, batch_norm=self._batch_norm, dropout=self._dropout)
        )
        if self.backend == "finite_difference":  # first-order only: the training kernels
            stack.enter_context(sdpa_kernel(callers_kernels))
        self._stack = stack
        try:
            self._prepare()
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
        self._autodiff = None
        self._mean = None
        self._finite_difference.weight_scale = None
        self._sharded_gradients = None
        self._losses = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def _prepare(self) -> None:
        if self._all_reduce is not None and not self._sharded:
            self._mean = UnionMean.of(self._all_reduce, self._probe.size, self.device)
        if self._sharded:
            assert self._stack is not None
            shards = self.shards  # FSDP averages the gradients: each loss weighted by its share
            mean = UnionMean.of(
                lambda t: shards.all_sum(t) / shards.num_shards, self._probe.size, self.device
            )
            self._sharded_gradients = ShardedGradients(
                self.model, self._loss_fn, self._probe, self._parameters, self._locals, mean.share
            )
            finite_difference = self._finite_difference
            loss = self._sharded_gradients.open(self._stack, finite_difference.note_compute_dtype)
            self._check_finite_loss(loss)
            return
        ggn = isinstance(self._loss_fn, OutputLoss) and self.curvature == "ggn"
        called = self._loss_fn.output_fn if ggn else self._loss_fn  # type: ignore[attr-defined]
        losses = ProbeLoss(FunctionalModel(self.model, called, self._named), self._probe)
        self._losses = losses
        autodiff = AutodiffProducts(losses, self._checks, self._check_finite_loss)
        self._autodiff = autodiff
        if ggn:
            assert isinstance(self._loss_fn, OutputLoss)
            self.backend = autodiff.open_gauss_newton(self._loss_fn.loss, self.backend)
            return
        if self.backend in ("auto", "retained_graph"):
            try:
                autodiff.retain(self.backend)
                self.backend = "retained_graph"
            except FallBack as fallback:
                self.backend, self._checks.earlier = "forward_over_reverse", fallback.reason
        if self.backend == "finite_difference":
            self._check_finite_loss(self._finite_difference.loss(losses))
        elif self.backend != "retained_graph":
            loss = losses.weighted_loss(losses.leaves)
            self._checks.check_graph(loss, losses.leaves, self.backend)
            self._check_finite_loss(loss.detach())

    def _check_finite_loss(self, loss: torch.Tensor) -> None:
        """This process's loss (the agreement of a probe makes every process skip with it)."""
        self.loss = loss.detach()
        if not bool(torch.isfinite(self.loss).all()):
            raise NonFiniteCurvatureError(f"the probe loss is not finite ({self.loss.item()}).")

    def gradient(self) -> torch.Tensor:
        """The flat gradient ``∇L(w)`` of the probe loss (the union batch's, like the products).

        Free with the ``"retained_graph"`` backend (the graph the products go through is
        built from it); one more gradient of the probe batches with the others. It is no
        Hessian-vector product and does not count in :attr:`num_hvps`. With
        ``curvature="ggn"`` it is the same loss gradient, ``Jᵀ ∂ℓ/∂z``.

        Raises:
            RuntimeError: if called outside the ``with`` block.
            NonFiniteCurvatureError: if this process's gradient is not finite.

        Example:
            >>> net = nn.Linear(2, 1, bias=False)
            >>> with torch.no_grad():
            ...     _ = net.weight.fill_(1.0)
            >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
            >>> with HessianOperator(net, lambda m, b: m(b).pow(2).mean(), x) as H:
            ...     H.gradient()  # 2 XᵀX w / n = (1, 4)
            tensor([1., 4.])
        """
        if self._stack is None:
            raise RuntimeError(
                "HessianOperator.gradient must be called inside `with HessianOperator(...)`."
            )
        assert self._autodiff is not None
        grads = self._autodiff.gradient()
        flat = self.layout.flatten(grads).detach()
        if not bool(torch.isfinite(flat).all()):
            raise NonFiniteCurvatureError("the probe gradient is not finite.")
        return flat if self._mean is None else self._mean(flat)

    # -- products --------------------------------------------------------------------------
    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """Return ``H @ vector`` for a flat vector of length :attr:`size`.

        Raises:
            RuntimeError: if called outside the ``with`` block.
            NonFiniteCurvatureError: if this process's product is not finite.
        """
        if self._stack is None:
            raise RuntimeError(
                "HessianOperator.matvec must be called inside `with HessianOperator(...)`."
            )
        vs = self.layout.split(vector.to(device=self.device, dtype=self.dtype))
        autodiff = self._autodiff
        if autodiff is not None and autodiff.ggn is not None:
            hv = self._gauss_newton(vs)
        elif self.backend == "retained_graph":
            assert autodiff is not None
            try:
                hv = autodiff.retained_product(vs)
            except RuntimeError as err:
                if not is_missing_derivative(err):
                    raise
                if not (self._may_fall_back and self.num_hvps == 0):
                    raise self._checks.explain(err, "retained_graph") from err
                self.backend, autodiff.retained = "forward_over_reverse", None
                self._checks.earlier = err
                hv = self._forward_over_reverse_or_difference(vs)
        elif self.backend == "double_backward":
            assert autodiff is not None
            hv = autodiff.double_backward(vs)
        elif self.backend == "finite_difference":
            hv = self._finite_difference_product(vs)
        else:
            hv = self._forward_over_reverse_or_difference(vs)
        self.num_hvps += 1
        flat = self.layout.flatten(hv).detach()
        if not bool(torch.isfinite(flat).all()):  # this process's (sharded: FSDP's average)
            raise NonFiniteCurvatureError("a Hessian-vector product is not finite.")
        return flat if self._mean is None else self._mean(flat)

    def _gauss_newton(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``G v``; ``"auto"`` turns to forward mode if the first reverse product cannot run."""
        autodiff = self._autodiff
        assert autodiff is not None
        try:
            return autodiff.gauss_newton(vs, self.backend)
        except RuntimeError as err:
            if not is_missing_derivative(err):
                raise
            if self.backend == "forward_over_reverse" or not (
                self._may_fall_back and self.num_hvps == 0
            ):
                raise self._checks.explain(err, self.backend) from err
            self.backend, autodiff.linearized = "forward_over_reverse", None
            self._checks.earlier = err
            return self._gauss_newton(vs)

    def _forward_over_reverse_or_difference(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Forward over reverse; with ``backend="auto"``, finite differences where it has none."""
        assert self._autodiff is not None
        try:
            return self._autodiff.forward_over_reverse(vs)
        except RuntimeError as err:
            cause = err.__cause__
            missing = isinstance(cause, RuntimeError) and is_missing_derivative(cause)
            if not (self._may_fall_back and self.num_hvps == 0 and missing):
                raise
            try:
                check_smooth(self.model)
                self._check_finite_loss(self._finite_difference.loss(self._autodiff.losses))
            except ValueError as kinked:
                raise RuntimeError(f"{err}\nbackend='auto' cannot fall back: {kinked}") from err
            self.backend = "finite_difference"
            return self._finite_difference_product(vs)

    def _finite_difference_product(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The finite difference, its gradients at this shard or at copies of the weights."""
        source = self._sharded_gradients if self._sharded else self._losses
        assert source is not None
        return self._finite_difference.product(vs, source)
