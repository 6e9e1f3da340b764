"""The generalized Gauss–Newton matrix ``G = Jᵀ H_ℓ J`` of a loss written on the model's outputs.

For ``L(w) = ℓ(f(w, x), y)`` with ``J = ∂f/∂w`` and ``H_ℓ = ∂²ℓ/∂f²`` (Schraudolph 2002;
Martens 2020, "New insights and perspectives on the natural gradient method"), the Hessian
is ``G + Σ_i (∂ℓ/∂f_i) ∇²_w f_i``: ``G`` drops the second-order term of the model. ``G`` is
positive semi-definite whenever ``ℓ`` is convex in the outputs (cross-entropy on logits, mean
squared error), and equals the Hessian where that term vanishes (a model linear in ``w``,
or zero residuals).

The split of the loss is the user's to state, as an :class:`OutputLoss`: ``output_fn(model,
batch) -> (outputs, targets)`` and ``loss(outputs, targets) -> scalar``. It is also a plain
``loss_fn`` (``loss(*output_fn(model, batch))``), so the Hessian and the GGN of one loss come
from one object. A product ``G v`` is ``Jᵀ (H_ℓ (J v))``:

* ``J v``: the double-vjp trick (``Jᵀ u`` built with ``create_graph`` and differentiated
  with respect to ``u``) through the outputs' graph, or ``torch.func.jvp``
  (``backend="forward_over_reverse"``);
* ``H_ℓ u``: a double backward through the loss on the outputs only (small);
* ``Jᵀ``: one backward through the outputs' graph.

:class:`~lightning_curvature.functional.operator.operator.HessianOperator` runs these products with
``curvature="ggn"``, inside the same probe conditions, batches, all-reduce and checks as its
Hessian products, so every estimator measures ``G`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_curvature.functional.model.functional_model import FunctionalModel, check_scalar_loss
from lightning_curvature.functional.operator.autodiff import pullback

__all__ = ["CURVATURES", "Curvature", "GaussNewtonProducts", "Linearized", "OutputLoss"]

#: The matrix the operator multiplies by: the Hessian, or the generalized Gauss–Newton.
Curvature = Literal["hessian", "ggn"]
CURVATURES = ("hessian", "ggn")

OutputFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Any]]
LossOnOutputs = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class OutputLoss:
    """A loss split at the model's outputs: ``loss(*output_fn(model, batch))``.

    What ``curvature="ggn"`` needs to know (the Hessian of ``loss`` in the outputs is
    ``H_ℓ``); it is also an ordinary ``loss_fn`` for the Hessian.

    Args:
        output_fn: ``output_fn(model, batch) -> (outputs, targets)``; ``outputs`` a floating
            tensor that depends on the parameters, ``targets`` anything ``loss`` takes.
        loss: ``loss(outputs, targets) -> scalar tensor``, convex in ``outputs`` for a
            positive semi-definite GGN (e.g. ``F.cross_entropy``, ``F.mse_loss``).

    Raises:
        TypeError: if either is not callable.

    Example:
        >>> import torch.nn.functional as F
        >>> split = OutputLoss(lambda model, batch: (model(batch[0]), batch[1]), F.mse_loss)
        >>> net = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(1.0)
        >>> split(net, (torch.ones(3, 2), torch.zeros(3, 1))).item()  # mean of (1 + 1)²
        4.0
        >>> from lightning_curvature import hessian_eigenvalues
        >>> x = torch.diag(torch.tensor([1.0, 2.0]))  # linear model: GGN = Hessian = diag(2, 8)/2
        >>> out = hessian_eigenvalues(net, split, (x, torch.zeros(2, 1)), k=2, curvature="ggn")
        >>> out.eigenvalues.round(decimals=4).tolist()
        [4.0, 1.0]
    """

    output_fn: OutputFn
    loss: LossOnOutputs

    def __post_init__(self) -> None:
        for name, value, form in (
            ("output_fn", self.output_fn, "output_fn(model, batch) -> (outputs, targets)"),
            ("loss", self.loss, "loss(outputs, targets) -> scalar"),
        ):
            if not callable(value):
                raise TypeError(f"`{name}` must be callable as {form}, got {value!r}.")

    def __repr__(self) -> str:
        # By the functions' names: a monitor's checkpoint key holds it, the same every run.
        names = (getattr(f, "__qualname__", repr(f)) for f in (self.output_fn, self.loss))
        return f"OutputLoss({', '.join(names)})"

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``loss(*output_fn(model, batch))``."""
        outputs, targets = split_outputs(self.output_fn(model, batch))
        return self.loss(outputs, targets)


def split_outputs(result: Any) -> tuple[torch.Tensor, Any]:
    """``(outputs, targets)`` as ``output_fn`` returned them, or a ``ValueError`` saying what.

    Example:
        >>> split_outputs((torch.zeros(2), None))
        (tensor([0., 0.]), None)
    """
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not isinstance(result[0], torch.Tensor)
        or not result[0].is_floating_point()
    ):
        got = type(result).__name__ if not isinstance(result, tuple) else f"{len(result)}-tuple"
        raise ValueError(
            "`output_fn` must return a pair (outputs, targets) with `outputs` a floating "
            f"tensor; it returned a {got}."
        )
    return result[0], result[1]


@dataclass(frozen=True)
class Linearized:
    """One batch's outputs with their graph, and the gradient of the loss in them.

    Attributes:
        outputs: the model's outputs, with their graph to the measured parameters.
        point: the outputs detached (the variable of ``ℓ``).
        loss: ``ℓ(point, targets)``, detached.
        gradient: ``∂ℓ/∂point`` with its graph (for ``H_ℓ u``).
    """

    outputs: torch.Tensor
    point: torch.Tensor
    loss: torch.Tensor
    gradient: torch.Tensor


class GaussNewtonProducts:
    """Products ``G_b v`` of one batch at a time (the operator sums them over batches).

    Args:
        functional: ``output_fn`` as a function of the measured parameters.
        loss: ``loss(outputs, targets)``.
        leaves: the measured parameters the graphs are built from (``requires_grad``).

    Example:
        >>> from lightning_curvature.functional.model.parameters import select_parameters
        >>> net = nn.Linear(2, 1, bias=False)  # ½‖Xw‖²/n, X = diag(1, 2): G = H = diag(1, 4)/2
        >>> split = OutputLoss(lambda m, x: (m(x), None), lambda z, _: 0.5 * z.pow(2).mean())
        >>> functional = FunctionalModel(net, split.output_fn, select_parameters(net))
        >>> leaves = [p.requires_grad_(True) for p in functional.primals]
        >>> products = GaussNewtonProducts(functional, split.loss, leaves)
        >>> x = torch.diag(torch.tensor([1.0, 2.0]))
        >>> products.reverse(products.linearize(x), [torch.ones(1, 2)])
        [tensor([[0.5000, 2.0000]])]
    """

    def __init__(
        self, functional: FunctionalModel, loss: LossOnOutputs, leaves: Sequence[torch.Tensor]
    ) -> None:
        self._functional = functional
        self._loss = loss
        self._leaves = list(leaves)

    def _outputs(self, primals: Sequence[torch.Tensor], batch: Any) -> tuple[torch.Tensor, Any]:
        return split_outputs(self._functional.call(primals, batch))

    def _at(self, outputs: torch.Tensor, targets: Any) -> Linearized:
        point = outputs.detach().requires_grad_(True)
        loss = check_scalar_loss(self._loss(point, targets))
        (gradient,) = torch.autograd.grad(
            loss, point, create_graph=True, allow_unused=True, materialize_grads=True
        )
        return Linearized(outputs, point, loss.detach(), gradient)

    def linearize(self, batch: Any) -> Linearized:
        """The outputs on ``batch`` (through ``functional.inputs``) with their graph."""
        return self._at(*self._outputs(self._leaves, batch))

    @staticmethod
    def _loss_hessian(at: Linearized, u: torch.Tensor) -> torch.Tensor:
        """``H_ℓ u`` (zero where ``ℓ`` is linear in the outputs)."""
        return pullback([at.gradient], [at.point], [u])[0]

    def reverse(self, at: Linearized, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``G_b v`` through ``at``'s graph, ``J v`` by the double-vjp trick (reverse mode).

        ``u ↦ Jᵀ u`` is linear in ``u``; built with its graph from a dummy ``u``, its
        vector-Jacobian product with ``v`` is ``J v``.
        """
        dummy = torch.zeros_like(at.outputs, requires_grad=True)
        transposed = pullback([at.outputs], self._leaves, [dummy], create_graph=True)
        (jv,) = pullback(transposed, [dummy], vs)
        return pullback([at.outputs], self._leaves, [self._loss_hessian(at, jv)])

    def forward(self, batch: Any, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``G_b v`` with ``J v`` by ``torch.func.jvp`` (forward mode) and ``Jᵀ`` by ``vjp``."""
        primals = tuple(leaf.detach() for leaf in self._leaves)

        def outputs_of(*params: torch.Tensor) -> tuple[torch.Tensor, Any]:
            return self._outputs(params, batch)

        outputs, jv, targets = torch.func.jvp(outputs_of, primals, tuple(vs), has_aux=True)  # type: ignore[misc]
        u = self._loss_hessian(self._at(outputs, targets), jv)
        _, pullback, _ = torch.func.vjp(outputs_of, *primals, has_aux=True)  # type: ignore[misc]
        return list(pullback(u))
