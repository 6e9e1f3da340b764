"""The one Hessian-vector product of the project.

:class:`HessianOperator` turns ``loss_fn(model, batch)`` into the linear map ``v -> H v`` on
flat vectors over the selected trainable parameters (Pearlmutter 1994:
``H v = ∇⟨∇L(w), v⟩``). Every estimator (Lanczos, trace, SLQ) calls its ``matvec``.

Backends (``backend=``):

* ``"retained_graph"``: the gradient graph is built once with ``create_graph=True`` and each
  product is one backward through it. Measured on a 2-core CPU it is the cheapest (about
  1.2-2x a plain gradient) but keeps the double graph alive while the operator is open.
* ``"double_backward"``: gradient and product recomputed for every product (about 2.5-3.5x
  a gradient), memory of one double graph at a time per batch.
* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad`` (3.5-4.3x on CPU).
  It cannot run through recurrent layers or ops without forward-mode derivatives.
* ``"finite_difference"``: the central difference ``(∇L(w + εv) − ∇L(w − εv)) / 2ε`` of
  two ordinary gradients (about 2x a gradient, the memory of training): it runs wherever
  training runs, also through kernels without a second derivative (fused attention, custom
  kernels). Its error is the truncation ``O(ε²)`` plus the rounding ``O(eps/ε)``; the
  step moves no parameter by more than ``0.3·eps^{1/3}·max(rms(w), 0.01)``
  (``_finite_difference_step``). On smooth models (tanh, GELU, softmax, LayerNorm,
  GPT-2, BERT) that is at most 3e-4 relative in float32 and 5e-10 in float64, along random
  vectors and the top eigenvector alike; a piecewise-linear model (ReLU, max-pooling) has kinks the
  perturbation crosses, so its products do not converge to autograd's Hessian at all, and
  the backend refuses such a model (piecewise-linear modules at construction, functional
  ``F.relu``/``max_pool`` found in the loss's graph on entering). The attention kernels are
  the caller's (``scaled_dot_product_attention`` may run its fused kernels, as in
  training; the other backends need the math kernel). Its accuracy is bounded by the dtype
  the model *computes* in: a forward that computes in bfloat16 or float16 (an autocast or
  a cast inside it) gives products no better than about ``eps^{2/3}`` relative (2.5e-2 in
  bfloat16, 1e-2 in float16) whatever the step (measured on the smooth test cases: 1-10%
  in bfloat16, 0.4-2.5% in float16); the backend then warns once per operator
  (:class:`~lightning_curvature.errors.CurvatureWarning`) and takes its step
  for that dtype.
* ``"auto"`` (default): ``"retained_graph"``; if the model has no double backward, it falls
  back to ``"forward_over_reverse"``, and if that has no forward-mode derivative either (the
  CPU flash kernel ``_scaled_dot_product_flash_attention_for_cpu`` that a model forcing
  fused attention runs has neither, nor have most fused kernels), to
  ``"finite_difference"`` for a smooth model; :attr:`HessianOperator.backend` says which ran.
  Over sharded parameters (FSDP2), ``"finite_difference"``.

**Sharded parameters (FSDP2).** Under ``torch.distributed.fsdp.fully_shard`` every parameter
is a ``DTensor`` shard and there is no double backward through the sharding hooks
(``autograd.grad(..., create_graph=True)`` reports the parameters unused; going through the
unsharded parameters with ``unshard()`` fails too, as FSDP frees their storage in its
backward hooks). Only ``"finite_difference"`` (and ``"auto"``, which picks it) can run; the
others are refused. Each process then holds its shard of every vector (:attr:`size` is the
local length, :attr:`shards` the split, see :mod:`~lightning_curvature.functional.linalg.sharded`):
the two gradients are ordinary ``loss.backward()`` calls of the model itself at weights
perturbed in place on the local shards, restored exactly from a saved copy after each, and
FSDP's reduce-scatter averages them across processes (every process probes its own batch, as
under DDP). ``.grad`` is saved before the probe and put back after it. The parameters must
be float32 or float64 (a finite difference in bf16 resolves nothing).

With ``curvature="ggn"`` the operator multiplies by the generalized Gauss–Newton matrix
``G = Jᵀ H_ℓ J`` instead (:mod:`~lightning_curvature.functional.operator.ggn`; ``loss_fn`` an
:class:`~lightning_curvature.functional.operator.ggn.OutputLoss`), with the same backends but
``"finite_difference"``: ``"retained_graph"`` keeps the outputs' graph and takes ``J v`` by
the double-vjp trick through it, ``"double_backward"`` rebuilds that graph for every
product, ``"forward_over_reverse"`` takes ``J v`` by ``torch.func.jvp``.

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
import warnings
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import _cur_sdpa_kernel_backends, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_curvature.errors import (
    CurvatureWarning,
    NonFiniteCurvatureError,
    PiecewiseLinearError,
)
from lightning_curvature.functional.linalg.sharded import VectorShards, fsdp_shards, local_tensor
from lightning_curvature.functional.model.batches import ProbeBatches, split_batches
from lightning_curvature.functional.model.functional_model import (
    FunctionalModel,
    LossFn,
    check_measurable,
    check_scalar_loss,
    probe_dtype,
)
from lightning_curvature.functional.model.parameters import (
    ParameterLayout,
    ParameterPatterns,
    select_parameters,
)
from lightning_curvature.functional.model.probe import BatchNormMode, probe_context, unwrap_model
from lightning_curvature.functional.operator.autodiff import pullback
from lightning_curvature.functional.operator.ggn import (
    CURVATURES,
    Curvature,
    GaussNewtonProducts,
    Linearized,
    OutputLoss,
)

__all__ = [
    "BACKENDS",
    "HVPBackend",
    "HessianOperator",
    "LossFn",
    "check_curvature",
    "check_smooth",
    "hessian_vector_product",
]

HVPBackend = Literal[
    "auto", "retained_graph", "double_backward", "forward_over_reverse", "finite_difference"
]
AllReduce = Callable[[torch.Tensor], torch.Tensor]
BACKENDS = (
    "auto",
    "retained_graph",
    "double_backward",
    "forward_over_reverse",
    "finite_difference",
)
_NO_SECOND_DERIVATIVE = (nn.EmbeddingBag,)  # their backward has no derivative in torch
# Modules whose kinks a finite difference crosses (its products are then not the Hessian).
_PIECEWISE_LINEAR = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.Hardtanh,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


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
        backend: Hessian-vector product strategy (see module docstring).
        batch_norm: BatchNorm mode during the probe (``"as_is"``, ``"eval"``, ``"train"``).
        dropout: keep dropout on during the probe (default off).
        all_reduce: optional function averaging a tensor across processes (DDP); every
            product and the loss-finiteness check go through it, so all ranks see the same
            operator. Not used over sharded parameters, whose products FSDP averages.
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
        NonFiniteCurvatureError: if the loss or a product is NaN or infinite.

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
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
        if not callable(loss_fn):
            raise TypeError(
                f"`loss_fn` must be callable as loss_fn(model, batch), got {loss_fn!r}."
            )
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
            backend = _sharded_backend(backend, curvature, self.dtype, self._parameters)
        if backend == "finite_difference":
            check_smooth(self.model)
        self.backend: HVPBackend = backend
        self._may_fall_back = backend == "auto"
        self._fallback_reason: RuntimeError | None = None
        self._graph_checked = False
        self.num_hvps = 0
        self.curvature: Curvature = curvature
        self._loss_fn = loss_fn
        self._ggn: GaussNewtonProducts | None = None
        self._linearized: list[Linearized] | None = None  # retained GGN graphs, one a batch
        self._probe: ProbeBatches = split_batches(batch, self.device)
        self._batch_norm = batch_norm
        self._dropout = dropout
        self._all_reduce = all_reduce
        self._stack: contextlib.ExitStack | None = None
        self._functional: FunctionalModel | None = None
        self._leaves: list[torch.Tensor] = []
        self._inputs: list[Any] = []
        self._retained: list[torch.Tensor] | None = None
        self._weight_scale: float | None = None  # rms(w) for the finite-difference step
        self._compute_dtype = self.dtype  # the narrowest dtype the model computes in (FD)
        self._saved: list[torch.Tensor] = []  # the local shards' values, while sharded
        self._owners: list[nn.Parameter] = []  # every parameter, whose .grad is saved
        self._fsdp: list[nn.Module] = []
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
        self._retained = None
        self._linearized = None
        self._ggn = None
        self._weight_scale = None
        self._saved = []
        self._leaves = []
        self._inputs = []
        self._functional = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def _prepare(self) -> None:
        if self._sharded:
            self._prepare_sharded()
            return
        ggn = isinstance(self._loss_fn, OutputLoss) and self.curvature == "ggn"
        called = self._loss_fn.output_fn if ggn else self._loss_fn  # type: ignore[attr-defined]
        self._functional = FunctionalModel(self.model, called, self._named)
        self._leaves = [p.requires_grad_(True) for p in self._functional.primals]
        self._inputs = [self._functional.inputs(b) for b in self._probe.batches]
        if ggn:
            self._prepare_ggn()
            return
        if self.backend in ("auto", "retained_graph"):
            try:
                self._retained = self._weighted_gradient(self._leaves)
                self.backend = "retained_graph"
            except _FallBack as fallback:
                self.backend, self._fallback_reason = "forward_over_reverse", fallback.reason
        if self.backend == "finite_difference":
            self._check_finite_loss(self._finite_difference_loss())
        elif self.backend != "retained_graph":
            loss = self._weighted_loss(self._leaves)
            self._check_graph(loss)
            self._check_finite_loss(loss.detach())

    def _prepare_sharded(self) -> None:
        """Save ``.grad`` (put back on exit) and the local shards; check the loss is finite."""
        assert self._stack is not None
        fsdp = _fsdp_modules(self.model)
        owners = list(self.model.parameters())
        grads = [p.grad for p in owners]

        def restore() -> None:
            _reshard(fsdp)  # the parameters registered again are the sharded ones
            for p, grad in zip(owners, grads, strict=True):
                p.grad = grad

        self._stack.callback(restore)
        for p in owners:
            p.grad = None
        self._owners, self._fsdp = owners, fsdp
        _reshard(fsdp)
        self._saved = [t.detach().clone() for t in self._locals]
        with _FloatingDtypes() as seen:  # with its graph: the kinks are looked for in it
            loss = self._module_loss()
        _check_no_kinks(loss, None)  # every parameter is measured over shards
        self._note_compute_dtype(seen.dtypes)
        _reshard(fsdp)
        self._check_finite_loss(loss.detach())

    def _module_loss(self) -> torch.Tensor:
        """The weighted probe loss of the model itself (its hooks, e.g. FSDP's, run)."""
        total = sum(
            w * check_scalar_loss(self._loss_fn(self.model, b))
            for b, w in zip(self._probe.batches, self._probe.weights, strict=True)
        )
        return total  # type: ignore[return-value]

    def _sharded_gradient(self, vs: list[torch.Tensor], step: float) -> list[torch.Tensor]:
        """This shard of ``∇L(w + step·v)``: the local shards moved in place, then restored."""
        try:
            with torch.no_grad():
                for local, saved, v in zip(self._locals, self._saved, vs, strict=True):
                    local.copy_(saved).add_(v, alpha=step)
            for batch, weight in zip(self._probe.batches, self._probe.weights, strict=True):
                loss = weight * check_scalar_loss(self._loss_fn(self.model, batch))
                loss.backward()  # type: ignore[no-untyped-call]
            grads = [
                torch.zeros_like(local) if p.grad is None else local_tensor(p.grad).detach()
                for p, local in zip(self._parameters, self._locals, strict=True)
            ]
        finally:
            with torch.no_grad():
                for local, saved in zip(self._locals, self._saved, strict=True):
                    local.copy_(saved)
            for p in self._owners:
                p.grad = None
            _reshard(self._fsdp)
        return grads

    def _prepare_ggn(self) -> None:
        """The outputs' graphs (kept for ``"retained_graph"``), checked, and the loss checked."""
        assert self._functional is not None
        assert isinstance(self._loss_fn, OutputLoss)
        self._ggn = GaussNewtonProducts(self._functional, self._loss_fn.loss, self._leaves)
        linearized = [self._ggn.linearize(batch) for batch in self._inputs]
        if self.backend != "forward_over_reverse":
            for at in linearized:
                self._check_graph(at.outputs)
        weights = self._probe.weights
        self._check_finite_loss(sum(w * at.loss for w, at in zip(weights, linearized, strict=True)))  # type: ignore[arg-type]
        if self.backend in ("auto", "retained_graph"):
            self._linearized, self.backend = linearized, "retained_graph"

    # -- loss and gradients ----------------------------------------------------------------
    # The model's own errors (in the forward) pass through as they are; only errors raised
    # while differentiating are explained, and only as a missing derivative where they are one.
    def _loss(self, leaves: Sequence[torch.Tensor], batch: Any) -> torch.Tensor:
        assert self._functional is not None
        return self._functional.loss(leaves, batch)

    def _weighted_loss(self, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        total = sum(
            w * self._loss(leaves, b)
            for b, w in zip(self._inputs, self._probe.weights, strict=True)
        )
        return total  # type: ignore[return-value]

    def _check_graph(self, loss: torch.Tensor) -> None:
        if self._graph_checked:
            return
        try:
            _check_twice_differentiable(loss, self._leaves)
        except _FirstOrderOnly as err:
            backend = "retained_graph" if self.backend == "auto" else self.backend
            raise self._explain(err, backend) from err
        self._graph_checked = True

    def _check_finite_loss(self, loss: torch.Tensor) -> None:
        self.loss = loss.detach()
        bad = (~torch.isfinite(self.loss)).to(self.dtype)
        if self._sharded:
            bad = self.shards.all_sum(bad)
        elif self._all_reduce is not None:
            bad = self._all_reduce(bad)
        if bad.item() > 0:
            raise NonFiniteCurvatureError(f"the probe loss is not finite ({self.loss.item()}).")

    def _first_backward(self, loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The gradient of ``loss`` with its graph (``create_graph=True``)."""
        try:
            return torch.autograd.grad(
                loss, self._leaves, create_graph=True, allow_unused=True, materialize_grads=True
            )
        except RuntimeError as err:
            if not _is_missing_derivative(err):
                raise
            if self.backend == "auto":  # building the retained graph: try forward mode
                raise _FallBack(err) from err
            raise self._explain(err, self.backend) from err

    def _weighted_sum(
        self, per_batch: Callable[[Any], Sequence[torch.Tensor]], items: Sequence[Any] = ()
    ) -> list[torch.Tensor]:
        """``Σ_b w_b · per_batch(b)`` over the probe's batches (or ``items``, one a batch)."""
        total: list[torch.Tensor] | None = None
        for batch, weight in zip(items or self._inputs, self._probe.weights, strict=True):
            scaled = [weight * t for t in per_batch(batch)]
            total = scaled if total is None else [t + s for t, s in zip(total, scaled, strict=True)]
        assert total is not None
        return total

    def _weighted_gradient(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradient with its graph (``create_graph``), the loss checked finite."""
        losses: list[torch.Tensor] = []

        def gradient(batch: Any) -> tuple[torch.Tensor, ...]:
            loss = self._loss(leaves, batch)
            losses.append(loss.detach())
            self._check_graph(loss)
            return self._first_backward(loss)

        total = self._weighted_sum(gradient)
        weights = self._probe.weights
        self._check_finite_loss(sum(w * loss for w, loss in zip(weights, losses, strict=True)))  # type: ignore[arg-type]
        return total

    def gradient(self) -> torch.Tensor:
        """The flat gradient ``∇L(w)`` of the probe loss (all-reduced like the products).

        Free with the ``"retained_graph"`` backend (the graph the products go through is
        built from it); one more gradient of the probe batches with the others. It is no
        Hessian-vector product and does not count in :attr:`num_hvps`. With
        ``curvature="ggn"`` it is the same loss gradient, ``Jᵀ ∂ℓ/∂z``.

        Raises:
            RuntimeError: if called outside the ``with`` block.
            NonFiniteCurvatureError: if the gradient is not finite.

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
        ggn = self._ggn
        if ggn is not None:  # the loss's gradient Jᵀ ∂ℓ/∂z through the outputs' graphs

            def through_outputs(at: Any) -> list[torch.Tensor]:
                return pullback([at.outputs], self._leaves, [at.gradient.detach()])

            linearized = self._linearized or [ggn.linearize(b) for b in self._inputs]
            grads = self._weighted_sum(through_outputs, linearized)
        elif self._retained is not None:
            grads = [g.detach() for g in self._retained]
        else:
            leaves = [leaf.detach().requires_grad_(True) for leaf in self._leaves]
            grads = self._gradient_at(leaves)
        flat = self.layout.flatten(grads).detach()
        if self._all_reduce is not None:
            flat = self._all_reduce(flat)
        if not bool(torch.isfinite(flat).all()):
            raise NonFiniteCurvatureError("the probe gradient is not finite.")
        return flat

    # -- products --------------------------------------------------------------------------
    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """Return ``H @ vector`` for a flat vector of length :attr:`size`.

        Raises:
            RuntimeError: if called outside the ``with`` block.
            NonFiniteCurvatureError: if the product is not finite.
        """
        if self._stack is None:
            raise RuntimeError(
                "HessianOperator.matvec must be called inside `with HessianOperator(...)`."
            )
        vs = self.layout.split(vector.to(device=self.device, dtype=self.dtype))
        if self._ggn is not None:
            hv = self._gauss_newton(vs)
        elif self.backend == "retained_graph":
            assert self._retained is not None
            try:
                hv = self._backward_through(self._retained, vs)
            except RuntimeError as err:
                if not _is_missing_derivative(err):
                    raise
                if not (self._may_fall_back and self.num_hvps == 0):
                    raise self._explain(err, "retained_graph") from err
                self.backend, self._retained = "forward_over_reverse", None
                self._fallback_reason = err
                hv = self._forward_over_reverse_or_difference(vs)
        elif self.backend == "double_backward":
            hv = self._double_backward(vs)
        elif self.backend == "finite_difference":
            hv = self._finite_difference(vs)
        else:
            hv = self._forward_over_reverse_or_difference(vs)
        self.num_hvps += 1
        flat = self.layout.flatten(hv).detach()
        if self._sharded:  # averaged by FSDP's reduce-scatter; one verdict for all
            bad = self.shards.any_true(not bool(torch.isfinite(flat).all()), self.device)
        else:
            if self._all_reduce is not None:
                flat = self._all_reduce(flat)
            bad = not bool(torch.isfinite(flat).all())
        if bad:
            raise NonFiniteCurvatureError("a Hessian-vector product is not finite.")
        return flat

    def _gauss_newton(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``G v``; ``"auto"`` turns to forward mode if the first reverse product cannot run."""
        ggn = self._ggn
        assert ggn is not None
        try:
            if self.backend == "forward_over_reverse":
                return self._weighted_sum(lambda batch: ggn.forward(batch, vs))
            if self._linearized is None:  # double_backward: the outputs' graph built anew
                return self._weighted_sum(lambda batch: ggn.reverse(ggn.linearize(batch), vs))
            return self._weighted_sum(lambda at: ggn.reverse(at, vs), self._linearized)
        except RuntimeError as err:
            if not _is_missing_derivative(err):
                raise
            if self.backend == "forward_over_reverse" or not (
                self._may_fall_back and self.num_hvps == 0
            ):
                raise self._explain(err, self.backend) from err
            self.backend, self._linearized = "forward_over_reverse", None
            self._fallback_reason = err
            return self._gauss_newton(vs)

    def _backward_through(
        self, grads: list[torch.Tensor], vs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        return pullback(grads, self._leaves, vs)

    def _double_backward(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        grads = self._weighted_gradient(self._leaves)
        try:
            return self._backward_through(grads, vs)
        except RuntimeError as err:
            if not _is_missing_derivative(err):
                raise
            raise self._explain(err, "double_backward") from err

    def _gradient_at(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """The plain (first-order) gradient of the weighted loss at other weights."""

        def gradient(batch: Any) -> tuple[torch.Tensor, ...]:
            loss = self._loss(leaves, batch)
            return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)

        return self._weighted_sum(gradient)

    def _finite_difference_loss(self) -> torch.Tensor:
        """The loss at ``w``, with the model's compute dtype and kinks checked (see module doc).

        Raises:
            PiecewiseLinearError: if a piecewise-linear op lies between the loss and the
                parameters.
        """
        with _FloatingDtypes() as seen:
            loss = self._weighted_loss(self._leaves)
        _check_no_kinks(loss, self._leaves)
        self._note_compute_dtype(seen.dtypes)
        return loss.detach()

    def _note_compute_dtype(self, dtypes: set[torch.dtype]) -> None:
        """Take the narrowest dtype the forward computed in for the finite-difference step.

        A bfloat16/float16 forward (a bf16 model, autocast, FSDP2's ``MixedPrecisionPolicy``)
        limits the products' accuracy: warned once per operator.
        """
        narrow = min(dtypes | {self.dtype}, key=lambda d: torch.finfo(d).bits)
        if torch.finfo(narrow).bits < torch.finfo(self.dtype).bits:
            self._compute_dtype = narrow
            accuracy = torch.finfo(narrow).eps ** (2 / 3)
            warnings.warn(
                f"backend='finite_difference': the model computes in {narrow}, so its "
                f"Hessian-vector products are no better than about {accuracy:.0e} relative "
                "(eps^(2/3), whatever the step; 1-10% measured in bfloat16): an eigenvalue "
                "`tol` below that cannot be met. Compute in "
                f"{self.dtype} for the probe, or use a double-backward `backend`.",
                CurvatureWarning,
                stacklevel=5,
            )

    def _forward_over_reverse_or_difference(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Forward over reverse; with ``backend="auto"``, finite differences where it has none."""
        try:
            return self._forward_over_reverse(vs)
        except RuntimeError as err:
            cause = err.__cause__
            missing = isinstance(cause, RuntimeError) and _is_missing_derivative(cause)
            if not (self._may_fall_back and self.num_hvps == 0 and missing):
                raise
            try:
                check_smooth(self.model)
                self._check_finite_loss(self._finite_difference_loss())
            except ValueError as kinked:
                raise RuntimeError(f"{err}\nbackend='auto' cannot fall back: {kinked}") from err
            self.backend = "finite_difference"
            return self._finite_difference(vs)

    def _finite_difference(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``(∇L(w + εv) − ∇L(w − εv)) / 2ε``.

        At fresh copies of the weights (never in place), or (sharded) at the local shards
        moved in place and restored exactly from their saved copy.
        """
        sharded = self._sharded
        primals = self._saved if sharded else [leaf.detach() for leaf in self._leaves]
        # The largest entry of v (of any shard): one device sync a product.
        largest = self.shards.max_of([v.abs().max() for v in vs if v.numel()], self.device)
        if largest == 0.0:
            return [torch.zeros_like(v) for v in vs]
        if self._weight_scale is None:  # the weights do not change while the operator is open
            self._weight_scale = self.shards.norm_of(primals) / self.shards.size**0.5
        step = _finite_difference_step(self._compute_dtype, self._weight_scale) / largest
        if sharded:
            upper = self._sharded_gradient(vs, step)
            lower = self._sharded_gradient(vs, -step)
        else:  # one perturbed copy of the weights alive at a time
            upper = self._gradient_at(self._moved(primals, vs, step))
            lower = self._gradient_at(self._moved(primals, vs, -step))
        return [u.sub_(d).div_(2 * step) for u, d in zip(upper, lower, strict=True)]

    @staticmethod
    def _moved(
        primals: list[torch.Tensor], vs: list[torch.Tensor], step: float
    ) -> list[torch.Tensor]:
        """Fresh leaves ``w + step·v`` (the weights themselves are never written)."""
        return [(p + step * v).requires_grad_(True) for p, v in zip(primals, vs, strict=True)]

    def _forward_over_reverse(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        primals = tuple(leaf.detach() for leaf in self._leaves)

        def product(batch: Any) -> tuple[torch.Tensor, ...]:
            def loss_of(params: tuple[torch.Tensor, ...]) -> torch.Tensor:
                return self._loss(params, batch)

            try:
                return torch.func.jvp(torch.func.grad(loss_of), (primals,), (tuple(vs),))[1]  # type: ignore[no-any-return]
            except RuntimeError as err:
                raise self._explain(err, "forward_over_reverse") from err

        return self._weighted_sum(product)

    def _explain(self, err: RuntimeError, backend: str) -> RuntimeError:
        measured = {id(p) for p in self._parameters}
        suspects = [
            f"{name!r} ({type(module).__name__})"
            for name, module in self.model.named_modules()
            if isinstance(module, _NO_SECOND_DERIVATIVE)
            and any(id(p) in measured for p in module.parameters(recurse=False))
        ]
        return _explain(err, backend, suspects, self._fallback_reason)


def _sharded_backend(
    backend: HVPBackend,
    curvature: Curvature,
    dtype: torch.dtype,
    parameters: Sequence[torch.Tensor],
) -> HVPBackend:
    """The backend over sharded parameters: finite differences, refusing what cannot run."""
    if curvature != "hessian":
        raise ValueError(
            f"curvature={curvature!r} is not available over sharded (FSDP2 DTensor) "
            "parameters: its Jacobian products go through torch.func, which the shards and "
            "FSDP's hooks do not allow; use curvature='hessian' (finite differences)."
        )
    if backend not in ("auto", "finite_difference"):
        raise ValueError(
            f"backend={backend!r} needs a double backward, which sharded (FSDP2 DTensor) "
            "parameters do not have; use backend='finite_difference' or 'auto' (which "
            "chooses it there)."
        )
    narrow = sorted({str(p.dtype) for p in parameters if p.dtype not in _FD_DTYPES})
    if narrow:
        raise ValueError(
            "finite-difference curvature over sharded parameters needs float32 or float64 "
            f"parameters (in {', '.join(narrow)} the difference of two gradients is mostly "
            "rounding); keep the sharded parameters in float32 (e.g. FSDP's "
            "MixedPrecisionPolicy computes in bf16 from float32 shards)."
        )
    return "finite_difference"


_FD_DTYPES = (torch.float32, torch.float64)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
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


# The finite-difference step: no parameter moves by more than STEP·eps^{1/3}·max(rms(w), FLOOR).
_STEP, _STEP_FLOOR = 0.3, 1e-2


def _finite_difference_step(dtype: torch.dtype, weight_rms: float) -> float:
    """The largest move of any one parameter in a finite-difference product.

    ``0.3·eps^{1/3}·max(rms(w), 0.01)`` for the dtype the model computes in (``eps^{1/3}``
    balances truncation ``O(ε²)`` and rounding ``O(eps/ε)``). It bounds the largest entry
    of ``εv``, not its norm: a vector concentrated on a few parameters (as Lanczos vectors
    near a sharp direction are) moves them little. A step of ``eps^{1/3}·max(‖w‖, 1)`` on
    ``‖εv‖`` put products along the top eigenvector of a 1,040-parameter GPT-2 37% off in
    float32 (8e-7 in float64); this one, 3e-4 (5e-10), and at most 2e-4 (3e-10) on random
    vectors of the smooth test cases, GPT-2 and BERT.

    Example:
        >>> round(_finite_difference_step(torch.float32, 1.0), 6)
        0.001476
    """
    return float(_STEP * torch.finfo(dtype).eps ** (1 / 3) * max(weight_rms, _STEP_FLOOR))


def check_curvature(curvature: Any, loss_fn: Any, backend: Any = "auto") -> None:
    """Refuse a ``curvature`` the operator cannot compute with ``loss_fn`` and ``backend``.

    Raises:
        ValueError: naming the argument and what it allows.

    Example:
        >>> check_curvature("ggn", lambda model, batch: model(batch).sum())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: curvature='ggn' needs the loss split at the model's outputs: ...
    """
    if curvature not in CURVATURES:
        raise ValueError(f"`curvature` must be one of {CURVATURES}, got {curvature!r}.")
    if curvature != "ggn":
        return
    if not isinstance(loss_fn, OutputLoss):
        raise ValueError(
            "curvature='ggn' needs the loss split at the model's outputs: pass "
            "`loss_fn=OutputLoss(output_fn, loss)` with output_fn(model, batch) -> "
            f"(outputs, targets) and loss(outputs, targets) -> scalar; got loss_fn={loss_fn!r}."
        )
    if backend == "finite_difference":
        allowed = tuple(b for b in BACKENDS if b != "finite_difference")
        raise ValueError(
            f"curvature='ggn' takes `backend` in {allowed} (a finite difference of gradients "
            "is a Hessian product), got 'finite_difference'."
        )


def check_smooth(model: nn.Module) -> None:
    """Refuse finite differences through piecewise-linear modules (named in the message).

    Raises:
        ValueError: naming every piecewise-linear module (ReLU, max-pooling, ...).

    Example:
        >>> check_smooth(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))  # smooth: nothing happens
    """
    kinked = [
        f"{name or type(model).__name__!r} ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, _PIECEWISE_LINEAR)
        or (isinstance(module, nn.EmbeddingBag) and module.mode == "max")
    ]
    if kinked:
        raise ValueError(
            "backend='finite_difference' needs a smooth model: a finite difference crosses "
            "the kinks of piecewise-linear modules, and its products then differ from the "
            f"Hessian autograd defines (by several times its size); found {', '.join(kinked)}. "
            "Use another `backend`, or smooth activations (GELU, SiLU, tanh)."
        )


class _FallBack(Exception):
    """Internal: ``backend="auto"`` found no double backward; use forward-over-reverse."""

    def __init__(self, reason: RuntimeError) -> None:
        super().__init__(str(reason))
        self.reason = reason


class _FirstOrderOnly(RuntimeError):
    """A custom ``autograd.Function`` on the path to the parameters is once differentiable."""


# Every backward decorated with torch's @once_differentiable shares this wrapper's code.
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__


def _nodes_reaching(loss: torch.Tensor, leaves: Sequence[torch.Tensor] | None) -> list[Any]:
    """The autograd nodes of ``loss``'s graph through which some of ``leaves`` is reached.

    ``leaves=None``: through which any leaf is reached (every parameter is measured). The
    walk is iterative: graphs can be deeper than Python's recursion limit.
    """
    targets = None if leaves is None else {id(leaf) for leaf in leaves}
    reaches: dict[Any, bool] = {}  # keyed by node: keeps each Python wrapper alive
    stack: list[tuple[Any, bool]] = [(loss.grad_fn, False)] if loss.grad_fn is not None else []
    while stack:
        node, children_done = stack.pop()
        children = [child for child, _ in node.next_functions if child is not None]
        if not children_done:
            if node in reaches:
                continue
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in reaches)
            continue
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        leaf = variable is not None and (targets is None or id(variable) in targets)
        reaches[node] = leaf or any(reaches.get(c, False) for c in children)
    return [node for node, reached in reaches.items() if reached]


def _check_twice_differentiable(loss: torch.Tensor, leaves: Sequence[torch.Tensor]) -> None:
    """Raise if a @once_differentiable custom Function lies between ``loss`` and ``leaves``.

    Its backward runs without building a graph, so a second backward through it does not
    fail: the gradient silently stops depending on the parameters and the Hessian terms
    through it come out as zero (forward-over-reverse loses them too). Only Functions whose
    inputs depend on a measured parameter count.
    """
    offenders: set[str] = set()
    for node in _nodes_reaching(loss, leaves):
        function = getattr(node, "_forward_cls", None)
        backward = getattr(function, "backward", None)
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE:
            offenders.add(getattr(function, "__qualname__", repr(function)))
    if offenders:
        raise _FirstOrderOnly(
            f"custom autograd.Function {', '.join(sorted(offenders))} has a @once_differentiable "
            "backward, which builds no graph: every backend would silently drop the second "
            "derivative through it. Give it a differentiable backward, or leave the "
            "parameters it depends on out with `parameters=`."
        )


# Backward nodes of piecewise-linear ops (functional F.relu, max_pool, ...; see _PIECEWISE_LINEAR).
_KINKED_NODES = ("Relu", "Threshold", "Hardtanh", "Shrink", "MaxPool", "Prelu", "Rrelu")


def _check_no_kinks(loss: torch.Tensor, leaves: Sequence[torch.Tensor] | None) -> None:
    """Refuse finite differences through piecewise-linear ops the parameters reach.

    ``leaves=None``: the ops any leaf of the graph reaches.

    Raises:
        PiecewiseLinearError: naming the autograd nodes (``ReluBackward0``, ...) found.
    """
    kinked = sorted(
        {
            type(node).__name__
            for node in _nodes_reaching(loss, leaves)
            if any(kind in type(node).__name__ for kind in _KINKED_NODES)
        }
    )
    if kinked:
        raise PiecewiseLinearError(
            "backend='finite_difference' needs a smooth model: a finite difference crosses "
            "the kinks of piecewise-linear ops, and its products then differ from the "
            f"Hessian autograd defines; the loss's graph has {', '.join(kinked)}. Use another "
            "`backend`, or smooth activations (GELU, SiLU, tanh)."
        )


class _FloatingDtypes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records the floating dtypes of every op's outputs (the dtypes a forward computes in)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.dtypes.add(tensor.dtype)
        return out


_MISSING_DERIVATIVE = (
    "not implemented",
    "double backward",
    "does not support",
    "must implement either the backward",  # a custom Function in a backward has none
)


def _is_missing_derivative(err: RuntimeError) -> bool:
    if isinstance(err, _FirstOrderOnly):  # wrong with every backend: no fallback
        return False
    return any(s in str(err) for s in _MISSING_DERIVATIVE)


def _explain(
    err: RuntimeError, backend: str, suspects: list[str], earlier: RuntimeError | None
) -> RuntimeError:
    named = (
        f"Measured modules without second derivatives: {', '.join(suspects)}; leave their "
        "weights out with `parameters=` (patterns for the other parameters).\n"
        if suspects
        else ""
    )
    before = f"backend='auto' tried 'retained_graph' first: {earlier}\n" if earlier else ""
    return RuntimeError(
        f"Hessian-vector products with backend={backend!r} cannot pass through this model: {err}\n"
        f"{named}{before}Known causes: nn.EmbeddingBag (exclude its weights with "
        "`parameters=`), reentrant activation checkpointing (disable it for the probe), "
        "custom autograd.Functions or fused kernels without second derivatives. "
        "Try another `backend`."
    )


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    vector: torch.Tensor | Sequence[torch.Tensor],
    *,
    parameters: ParameterPatterns = None,
    backend: HVPBackend = "auto",
    batch_norm: BatchNormMode = "as_is",
    curvature: Curvature = "hessian",
) -> torch.Tensor | list[torch.Tensor]:
    """One Hessian-vector product ``H v`` of ``loss_fn(model, batch)``.

    Args:
        model: the module.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: one batch or an iterable of batches.
        vector: a flat vector over the measured parameters, or one tensor per parameter
            (in ``named_parameters`` order); the result has the same form.
        parameters: glob pattern(s) selecting the measured parameters.
        backend: see :class:`HessianOperator`.
        batch_norm: BatchNorm mode during the probe.
        curvature: ``"hessian"``, or ``"ggn"`` for a Gauss–Newton product ``G v`` (``loss_fn``
            an :class:`~lightning_curvature.functional.operator.ggn.OutputLoss`).

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> hessian_vector_product(net, lambda m, b: m(b).pow(2).mean(), x, [torch.ones(1, 2)])
        [tensor([[1., 4.]])]
    """
    with HessianOperator(
        model,
        loss_fn,
        batch,
        parameters=parameters,
        backend=backend,
        batch_norm=batch_norm,
        curvature=curvature,
    ) as operator:
        flat_input = isinstance(vector, torch.Tensor)
        flat = vector if flat_input else operator.layout.flatten(vector)  # type: ignore[arg-type]
        if flat.numel() != operator.size:  # type: ignore[union-attr]
            raise ValueError(
                f"`vector` has {flat.numel()} entries but the measured parameters have "  # type: ignore[union-attr]
                f"{operator.size}."
            )
        product = operator.matvec(flat)  # type: ignore[arg-type]
        return product if flat_input else [t.clone() for t in operator.layout.split(product)]
