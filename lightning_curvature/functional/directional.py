"""Curvature along chosen directions, with the one Hessian-vector product of the package.

Two instruments that the top eigenvalue alone does not give (batch sharpness, the third,
is :mod:`~lightning_curvature.functional.batch_sharpness`):

* **Directional curvature** ``vᵀHv / ‖v‖²``: the Rayleigh quotient of the Hessian along one
  direction, e.g. the optimizer's last update ``u`` (one Hessian-vector product). Full-batch
  gradient descent on a quadratic is unstable along ``u`` when ``η uᵀHu/‖u‖² > 2``.
* **Subspace share** ``‖P_k g‖² / ‖g‖²``: the fraction of a gradient's squared norm inside
  the span of the top-k Hessian eigenvectors (Gur-Ari, Roberts & Dyer 2018, "Gradient
  descent happens in a tiny subspace"); no product at all once the eigenvectors exist.

Inner products and norms sum slices of 2¹⁶ entries in float64
(:mod:`~lightning_curvature.functional.linalg.reductions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_curvature.checks import check_tensor
from lightning_curvature.functional.linalg.reductions import inner_products
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.parameters import ParameterPatterns
from lightning_curvature.functional.model.probe import BatchNormMode
from lightning_curvature.functional.operator.backends import AllReduce, HVPBackend
from lightning_curvature.functional.operator.ggn import Curvature
from lightning_curvature.functional.operator.operator import HessianOperator
from lightning_curvature.functional.operator.options import OperatorOptions

__all__ = ["DirectionalCurvature", "directional_curvature", "quadratic_form", "subspace_share"]


@dataclass(frozen=True)
class DirectionalCurvature:
    """Result of :func:`directional_curvature`.

    Attributes:
        quadratic_form: ``vᵀHv`` (slices summed in float64, returned in the compute dtype).
        squared_norm: ``‖v‖²`` (likewise).
        num_hvps: Hessian-vector products used (1).

    Example:
        >>> DirectionalCurvature(torch.tensor(6.0), torch.tensor(2.0), 1).value
        tensor(3.)
    """

    quadratic_form: torch.Tensor
    squared_norm: torch.Tensor
    num_hvps: int

    @property
    def value(self) -> torch.Tensor:
        """``vᵀHv / ‖v‖²``: NaN for a zero direction."""
        if float(self.squared_norm) == 0.0:
            return torch.full_like(self.quadratic_form, math.nan)
        return self.quadratic_form / self.squared_norm


def quadratic_form(operator: HessianOperator, vector: torch.Tensor) -> torch.Tensor:
    """``vᵀHv`` with one product (slices summed in float64)."""
    vector = vector.to(device=operator.device, dtype=operator.dtype)
    return inner_products(vector, operator.matvec(vector))


def directional_curvature(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    direction: torch.Tensor,
    *,
    parameters: ParameterPatterns = None,
    backend: HVPBackend = "auto",
    batch_norm: BatchNormMode = "as_is",
    all_reduce: AllReduce | None = None,
    curvature: Curvature = "hessian",
    options: OperatorOptions | None = None,
) -> DirectionalCurvature:
    """The curvature ``vᵀHv / ‖v‖²`` of ``loss_fn`` along ``direction`` (one product).

    Args:
        model: the module; its trainable parameters are measured.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: one batch or an iterable of batches.
        direction: a flat vector over the measured parameters (``named_parameters`` order),
            e.g. the difference of the weights across an optimizer step.
        parameters: glob pattern(s) selecting the measured parameters.
        backend: Hessian-vector product strategy (see :class:`HessianOperator`).
        batch_norm: BatchNorm mode during the probe.
        all_reduce: averages a tensor across processes (DDP).
        curvature: ``"hessian"``, or ``"ggn"`` for ``vᵀGv/‖v‖²`` of the generalized
            Gauss–Newton matrix (``loss_fn`` an :class:`~lightning_curvature.OutputLoss`).
        options: the operator's settings as one ``OperatorOptions`` instead of keywords.

    Raises:
        ValueError: if ``direction`` is not a finite flat vector over the measured parameters
            (a zero one gives a NaN quotient, as :func:`subspace_share` of a zero vector).
        NonFiniteCurvatureError: if the loss or the product is not finite.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)  # H = 2 XᵀX / n = diag(1, 4)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> out = directional_curvature(net, lambda m, b: m(b).pow(2).mean(), x,
        ...                             torch.tensor([1.0, 1.0]))
        >>> out.value, out.num_hvps  # (1 + 4) / 2
        (tensor(2.5000), 1)
    """
    check_tensor("direction", direction, values=False)  # its values: with the operator's layout
    settings = OperatorOptions.of(options, parameters, backend, batch_norm, curvature, all_reduce)
    with settings.operator(model, loss_fn, batch) as operator:
        operator.shards.check_vector("direction", direction, operator.device)
        form = quadratic_form(operator, direction)
        vector = direction.to(device=operator.device, dtype=operator.dtype)
        squared = inner_products(vector, vector)
        return DirectionalCurvature(
            form.to(operator.dtype), squared.to(operator.dtype), operator.num_hvps
        )


def subspace_share(vector: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``‖P v‖² / ‖v‖²``: the share of ``vector``'s squared norm in the span of ``basis``.

    Gur-Ari, Roberts & Dyer (2018) found that during training the gradient lies mostly in the
    span of the top Hessian eigenvectors (as many as there are classes). ``basis`` holds
    orthonormal rows (``(k, P)``), e.g. ``hessian_eigenvalues(...).eigenvectors``, whose
    Ritz vectors are orthonormal to rounding (full reorthogonalisation). NaN for a zero
    vector.

    Args:
        vector: ``(P,)``, e.g. a gradient over the measured parameters.
        basis: ``(k, P)`` orthonormal rows (or one ``(P,)`` unit vector).

    Raises:
        ValueError: if either is not a non-empty tensor of finite entries, or the shapes do
            not match.

    Example:
        >>> subspace_share(torch.tensor([3.0, 4.0, 0.0]), torch.eye(3)[:1])  # 9 / 25
        tensor(0.3600, dtype=torch.float64)
    """
    check_tensor("vector", vector)
    check_tensor("basis", basis)
    rows = basis.reshape(-1, basis.shape[-1]) if basis.dim() else basis
    if vector.dim() != 1 or basis.dim() not in (1, 2) or rows.shape[-1] != vector.shape[0]:
        raise ValueError(
            f"`basis` must be (k, P) and `vector` (P,), got {tuple(basis.shape)} and "
            f"{tuple(vector.shape)}."
        )
    vector = vector.to(device=rows.device, dtype=rows.dtype)
    squared = inner_products(vector, vector)
    if float(squared) == 0.0:
        return torch.full_like(squared, math.nan)
    return inner_products(rows, vector).square().sum() / squared
