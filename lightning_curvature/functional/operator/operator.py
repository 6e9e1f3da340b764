"""The one Hessian-vector product of the project: its public face and its lifecycle.

:class:`HessianOperator` turns ``loss_fn(model, batch)`` into the linear map ``v -> H v`` on
flat vectors over the selected trainable parameters (Pearlmutter 1994:
``H v = ∇⟨∇L(w), v⟩``). Every estimator (Lanczos, trace, SLQ) calls its ``matvec``;
:func:`~lightning_curvature.functional.operator.hvp.hessian_vector_product` takes one
product. The operator opens the probe (entering it), hands each product to its backend and,
with ``backend="auto"``, falls back to the next backend on the first product that cannot run
(saying so once, :attr:`HessianOperator.fallback`). Every product passes the self-check of
:mod:`~lightning_curvature.functional.operator.self_check` (symmetry with the product before
it; finite differences also at half the step on the first product) or raises
:class:`~lightning_curvature.errors.CurvatureCheckError`.
The backends, their costs and the fallback order are in
:mod:`~lightning_curvature.functional.operator.backends`; the exact ones in
:mod:`~lightning_curvature.functional.operator.autodiff_backends`, the finite difference in
:mod:`~lightning_curvature.functional.operator.finite_difference`, its gradients over
sharded (FSDP2) parameters in :mod:`~lightning_curvature.functional.operator.sharded_gradients`,
the checks of the graph in :mod:`~lightning_curvature.functional.operator.graph_checks` and
:mod:`~lightning_curvature.functional.operator.kinks`, the fallback's note in
:mod:`~lightning_curvature.functional.operator.fallback`.

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
from lightning_curvature.functional.linalg.reductions import all_finite, inner_products
from lightning_curvature.functional.linalg.sharded import VectorShards, fsdp_shards, local_tensor
from lightning_curvature.functional.model.batches import ProbeBatches, split_batches
from lightning_curvature.functional.model.functional_model import (
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
from lightning_curvature.functional.operator.backends import (
    AllReduce,
    HVPBackend,
    check_curvature,
    check_settings,
    sharded_backend,
)
from lightning_curvature.functional.operator.dispatch import BackendDispatch
from lightning_curvature.functional.operator.finite_difference import FiniteDifferenceProducts
from lightning_curvature.functional.operator.ggn import Curvature
from lightning_curvature.functional.operator.kinks import check_smooth
from lightning_curvature.functional.operator.self_check import ProductCheck
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
        dropout: keep dropout on during the probe (default off). One set of masks per
            probe: every product (and both gradients of a finite difference) starts from the
            random state the probe opened with, so the operator is the Hessian of the loss
            with those masks fixed (symmetric); the next probe draws other masks.
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
        backend: the backend that runs (``"auto"`` resolved once the operator is open).
        fallback: why ``backend="auto"`` runs another backend than its first choice
            (``"retained_graph"``), empty if it does not; said once by a
            :class:`~lightning_curvature.errors.CurvatureWarning`.
        num_hvps: products taken, the self-check's own included (finite differences take
            the first product of a probe at half the step too: one more).

    Raises:
        ValueError: on an unknown ``backend`` or ``curvature``, ``curvature="ggn"`` without
            an ``OutputLoss`` or with ``backend="finite_difference"``, no trainable
            parameters, complex measured parameters, an empty batch iterable, or a loss
            that is not a scalar; over sharded parameters, on a backend other than
            ``"auto"``/``"finite_difference"``, ``curvature="ggn"``, a piecewise-linear
            model or parameters narrower than float32; on entering, a loss that reaches
            none of the measured parameters.
        NonFiniteCurvatureError: if this process's loss or product is NaN or infinite.
        CurvatureCheckError: if the products fail their self-check (not derivatives: a kink
            at the finite difference's step, a wrong double backward).

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
        self._self_check = ProductCheck(self.shards, sharded=self._sharded)
        finite_difference = FiniteDifferenceProducts(
            self.dtype, self.shards, self.device, [p.shape for p in self._parameters]
        )
        self._finite_difference = finite_difference
        self._dispatch = BackendDispatch(
            self.model,
            self._named,
            backend,
            finite_difference,
            self._self_check,
            self._check_finite_loss,
        )
        self.num_hvps = 0
        self.curvature: Curvature = curvature
        self._loss_fn = loss_fn
        self._probe: ProbeBatches = split_batches(batch, self.device)
        self._batch_norm = batch_norm
        self._dropout = dropout
        self._all_reduce = all_reduce
        self._mean: UnionMean | None = None  # the union batch's mean, while open (DDP)
        self._stack: contextlib.ExitStack | None = None
        self.loss: torch.Tensor | None = None

    @property
    def backend(self) -> HVPBackend:
        """The backend that runs (``"auto"`` until the operator is open, then the one chosen)."""
        return self._dispatch.backend

    @property
    def fallback(self) -> str:
        """Why ``backend="auto"`` runs another backend than ``"retained_graph"`` (or ``""``)."""
        return self._dispatch.fallback.note

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
        self._dispatch.close()
        self._mean = None
        self._finite_difference.scales = None
        self._self_check.forget()
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
            sharded = ShardedGradients(
                self.model, self._loss_fn, self._probe, self._parameters, self._locals, mean.share
            )
            self._check_finite_loss(self._dispatch.open_sharded(self._stack, sharded))
        else:
            self._dispatch.open(self._loss_fn, self._probe, self.curvature)
        self._curvature_scale()

    def _curvature_scale(self) -> None:
        """Tell the self-check ``|L| / max(rms(w), 0.01)²``, the same on every process.

        The scale below which a Hessian is zero to rounding (a block no loss reaches but by
        cancellations): there products are rounding alone, symmetric or not.
        """
        assert self.loss is not None
        flat = [t.detach().reshape(-1) for t in self._locals]  # no float64 copy of a layer
        squares = torch.stack([inner_products(t, t) for t in flat]).sum()
        local = torch.stack([self.loss.abs().double().reshape(()), squares])
        if self._sharded:
            total = self.shards.all_sum(local)
            loss, squares = total[0] / self.shards.num_shards, total[1]
        else:
            loss = self._mean(local[:1])[0] if self._mean is not None else local[0]
        rms = max(float(squares / self.shards.size) ** 0.5, 0.01)
        self._self_check.curvature_scale = float(loss) / rms**2

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
        ``curvature="ggn"`` it is the same loss gradient, ``Jᵀ ∂ℓ/∂z``. Over sharded (FSDP2)
        parameters, this process's shard of the union batch's gradient.

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
        grads = self._dispatch.gradient()
        flat = self.layout.flatten(grads).detach()
        if not all_finite(flat):
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
        vector = vector.to(device=self.device, dtype=self.dtype)
        self._self_check.prepare(vector)  # the previous product is not held through this one
        vs = self.layout.split(vector)
        flat = self._dispatch.product(vs, first=self.num_hvps == 0).detach()
        self.num_hvps += 1
        if not all_finite(flat):  # this process's (sharded: FSDP's average)
            raise NonFiniteCurvatureError("a Hessian-vector product is not finite.")
        flat = flat if self._mean is None else self._mean(flat)
        self._check_product(vs, vector, flat)
        return flat

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H`` times each row of ``vectors`` (``count × size``), as :meth:`matvec` would.

        Where the backend allows it (the retained gradient graph of the Hessian on one
        process), the rows after the operator's first product go through one batched
        backward (``is_grads_batched``); elsewhere they are taken one at a time. Every row
        is checked and counted as one product.

        Example:
            >>> net = nn.Linear(2, 1, bias=False)
            >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
            >>> with HessianOperator(net, lambda m, b: m(b).pow(2).mean(), x) as H:
            ...     H.matmat(torch.eye(2)), H.num_hvps  # H = 2 XᵀX / n = diag(1, 4)
            (tensor([[1., 0.],
                    [0., 4.]]), 2)
        """
        rows = vectors.to(device=self.device, dtype=self.dtype)
        if self.num_hvps == 0 and len(rows) > 0:  # the first product may still fall back
            return torch.cat([self.matvec(rows[0])[None], self.matmat(rows[1:])])
        if not self._dispatch.batches_products or self._mean is not None or len(rows) < 2:
            return torch.stack([self.matvec(row) for row in rows]) if len(rows) else rows.clone()
        count = len(rows)
        slices = self.layout.slices.values()
        vs = [
            rows[:, s].reshape(count, *shape)
            for s, shape in zip(slices, self.layout.shapes, strict=True)
        ]
        flat = torch.cat([p.reshape(count, -1) for p in self._dispatch.products(vs)], 1).detach()
        self.num_hvps += count
        if not all_finite(flat):
            raise NonFiniteCurvatureError("a Hessian-vector product is not finite.")
        for row, product in zip(rows, flat, strict=True):
            self._check_product(vs, row, product)  # (vs serves a finite difference only)
        return flat

    def _check_product(
        self, vs: list[torch.Tensor], vector: torch.Tensor, hv: torch.Tensor
    ) -> None:
        """The self-check of a product (and, for the first finite difference, half the step)."""
        check = self._self_check
        check.backend = self.backend
        if self.backend == "finite_difference" and self.num_hvps == 1 and check.halves:
            half = self.layout.flatten(self._dispatch.finite_difference_product(vs, 0.5))
            if not all_finite(half):  # this process's, agreed by all
                raise NonFiniteCurvatureError("a Hessian-vector product is not finite.")
            half = half if self._mean is None else self._mean(half)
            self.num_hvps += 1
            check.halved(hv, half)
        check.symmetric(vector, hv)
