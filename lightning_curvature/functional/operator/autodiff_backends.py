"""The exact curvature-vector products by automatic differentiation, one product at a time.

Pearlmutter's ``H v = ∇⟨∇L(w), v⟩`` (1994) three ways (their costs are in
:mod:`~lightning_curvature.functional.operator.backends`):

* ``"retained_graph"``: one backward through the gradient graph built once with
  ``create_graph=True`` (:meth:`AutodiffProducts.retain`,
  :meth:`AutodiffProducts.retained_product`);
* ``"double_backward"``: the gradient with its graph and that backward, both for every
  product (:meth:`AutodiffProducts.double_backward`);
* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``
  (:meth:`AutodiffProducts.forward_over_reverse`).

With ``curvature="ggn"`` the same three run the Gauss–Newton products of
:mod:`~lightning_curvature.functional.operator.ggn` (:meth:`AutodiffProducts.gauss_newton`):
``"retained_graph"`` keeps the outputs' graph and takes ``J v`` by the double-vjp trick
through it, ``"double_backward"`` rebuilds that graph for every product,
``"forward_over_reverse"`` takes ``J v`` by ``torch.func.jvp``.

Errors raised while differentiating are explained as a missing second derivative only where
they are one (:mod:`~lightning_curvature.functional.operator.graph_checks`); with
``backend="auto"`` a missing double backward while the retained graph is built raises
:class:`~lightning_curvature.functional.operator.backends.FallBack` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_curvature.functional.model.parameters import ParameterLayout
from lightning_curvature.functional.operator.autodiff import pullback, pullback_into
from lightning_curvature.functional.operator.backends import FallBack, HVPBackend
from lightning_curvature.functional.operator.ggn import (
    GaussNewtonProducts,
    Linearized,
    LossOnOutputs,
)
from lightning_curvature.functional.operator.graph_checks import (
    DerivativeChecks,
    is_missing_derivative,
)
from lightning_curvature.functional.operator.probe_loss import ProbeLoss

__all__ = ["AutodiffProducts"]


class AutodiffProducts:
    """The exact products of one open operator, and the graphs they keep.

    Args:
        losses: the probe loss (or the outputs, for the GGN) at the measured parameters
            ``losses.leaves``.
        checks: the operator's graph checks and error explanations.
        check_finite_loss: the operator's check that a probe loss is finite (all-reduced).

    Attributes:
        retained: the gradient with its graph (``"retained_graph"``), else ``None``.
        ggn: the Gauss–Newton products (``curvature="ggn"``), else ``None``.
        linearized: the outputs' graphs, one a batch (``"retained_graph"`` with the GGN).
    """

    def __init__(
        self,
        losses: ProbeLoss,
        checks: DerivativeChecks,
        check_finite_loss: Callable[[torch.Tensor], None],
    ) -> None:
        self.losses = losses
        self._checks = checks
        self._check_finite_loss = check_finite_loss
        self.retained: list[torch.Tensor] | None = None
        self.ggn: GaussNewtonProducts | None = None
        self.linearized: list[Linearized] | None = None

    def retain(self, backend: HVPBackend) -> None:
        """Build the gradient graph the ``"retained_graph"`` products go through.

        Raises:
            FallBack: with ``backend="auto"``, if the model has no double backward.
        """
        self.retained = self.weighted_gradient(backend)

    def open_gauss_newton(self, loss: LossOnOutputs, backend: HVPBackend) -> HVPBackend:
        """The outputs' graphs (kept for ``"retained_graph"``), checked, and the loss checked.

        Returns:
            the backend that runs (``"auto"`` runs ``"retained_graph"``).
        """
        losses = self.losses
        self.ggn = GaussNewtonProducts(losses.functional, loss, losses.leaves)
        losses.rewind()
        linearized = [self.ggn.linearize(batch) for batch in losses.inputs]
        if backend != "forward_over_reverse":
            for at in linearized:
                self._checks.check_graph(at.outputs, losses.leaves, backend)
        weights = losses.weights
        self._check_finite_loss(sum(w * at.loss for w, at in zip(weights, linearized, strict=True)))  # type: ignore[arg-type]
        if backend in ("auto", "retained_graph"):
            self.linearized, backend = linearized, "retained_graph"
        return backend

    def first_backward(self, loss: torch.Tensor, backend: HVPBackend) -> tuple[torch.Tensor, ...]:
        """The gradient of ``loss`` with its graph (``create_graph=True``)."""
        try:
            return torch.autograd.grad(
                loss,
                self.losses.leaves,
                create_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
        except RuntimeError as err:
            if not is_missing_derivative(err):
                raise
            if backend == "auto":  # building the retained graph: try forward mode
                raise FallBack(err) from err
            raise self._checks.explain(err, backend) from err

    def weighted_gradient(self, backend: HVPBackend) -> list[torch.Tensor]:
        """The gradient with its graph (``create_graph``), the loss checked finite."""
        leaves = self.losses.leaves
        losses: list[torch.Tensor] = []

        def gradient(batch: Any) -> tuple[torch.Tensor, ...]:
            loss = self.losses.loss(leaves, batch)
            losses.append(loss.detach())
            self._checks.check_graph(loss, leaves, backend)
            return self.first_backward(loss, backend)

        total = self.losses.weighted_sum(gradient)
        weights = self.losses.weights
        self._check_finite_loss(sum(w * loss for w, loss in zip(weights, losses, strict=True)))  # type: ignore[arg-type]
        return total

    def gradient(self) -> list[torch.Tensor]:
        """``∇L(w)``: through the outputs' graphs (GGN), from the retained graph, or anew."""
        losses, ggn = self.losses, self.ggn
        if ggn is not None:  # the loss's gradient Jᵀ ∂ℓ/∂z through the outputs' graphs

            def through_outputs(at: Any) -> list[torch.Tensor]:
                return pullback([at.outputs], losses.leaves, [at.gradient.detach()])

            if self.linearized is None:
                losses.rewind()
            linearized = self.linearized or [ggn.linearize(b) for b in losses.inputs]
            return losses.weighted_sum(through_outputs, linearized)
        if self.retained is not None:
            return [g.detach() for g in self.retained]
        leaves = [leaf.detach().requires_grad_(True) for leaf in losses.leaves]
        return losses.gradient_at(leaves)

    def _flat_pullback(self, outputs: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
        """The pullback of ``vs`` to the leaves, flat: straight into one buffer where it can.

        Into one buffer (:func:`pullback_into`) where the leaves share a dtype; a float64
        leaf kept in a float32 probe (never narrowed) gets its pieces concatenated.
        """
        leaves = self.losses.leaves
        if any(leaf.dtype != leaves[0].dtype for leaf in leaves):
            return ParameterLayout.flatten(pullback(outputs, leaves, vs))
        out = leaves[0].new_zeros(sum(leaf.numel() for leaf in leaves))
        return pullback_into(out, outputs, leaves, vs)

    def retained_product(self, vs: list[torch.Tensor]) -> torch.Tensor:
        """``H v``, flat: one backward through the retained gradient graph."""
        assert self.retained is not None
        return self._flat_pullback(self.retained, vs)

    def retained_products(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``H v`` of a batch of vectors (a leading dimension): one batched backward."""
        assert self.retained is not None
        return pullback(self.retained, self.losses.leaves, vs, batched=True)

    def double_backward(self, vs: list[torch.Tensor]) -> torch.Tensor:
        """``H v``, flat, through a gradient graph built for this product alone."""
        grads = self.weighted_gradient("double_backward")
        try:
            return self._flat_pullback(grads, vs)
        except RuntimeError as err:
            if not is_missing_derivative(err):
                raise
            raise self._checks.explain(err, "double_backward") from err

    def forward_over_reverse(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``H v`` as ``torch.func.jvp`` of ``torch.func.grad``; every error explained."""
        primals = tuple(leaf.detach() for leaf in self.losses.leaves)

        def product(batch: Any) -> tuple[torch.Tensor, ...]:
            def loss_of(params: tuple[torch.Tensor, ...]) -> torch.Tensor:
                return self.losses.loss(params, batch)

            try:
                return torch.func.jvp(torch.func.grad(loss_of), (primals,), (tuple(vs),))[1]  # type: ignore[no-any-return]
            except RuntimeError as err:
                raise self._checks.explain(err, "forward_over_reverse") from err

        return self.losses.weighted_sum(product)

    def gauss_newton(self, vs: list[torch.Tensor], backend: HVPBackend) -> list[torch.Tensor]:
        """``G v``: in forward mode, or through the outputs' graphs (kept, else built anew)."""
        ggn = self.ggn
        assert ggn is not None
        if backend == "forward_over_reverse":
            return self.losses.weighted_sum(lambda batch: ggn.forward(batch, vs))
        if self.linearized is None:  # double_backward: the outputs' graph built anew
            return self.losses.weighted_sum(lambda batch: ggn.reverse(ggn.linearize(batch), vs))
        return self.losses.weighted_sum(lambda at: ggn.reverse(at, vs), self.linearized)
