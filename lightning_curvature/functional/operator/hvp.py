"""One Hessian-vector product of a model's loss, through an operator opened for it alone.

:func:`hessian_vector_product` is the one-shot form of
:class:`~lightning_curvature.functional.operator.operator.HessianOperator`: it opens the
operator, takes ``H v`` (or ``G v``) for one vector, flat or one tensor per parameter, and
closes it. Several products of one loss are cheaper through the operator itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_curvature.checks import check_tensor
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.parameters import ParameterPatterns
from lightning_curvature.functional.model.probe import BatchNormMode
from lightning_curvature.functional.operator.backends import HVPBackend
from lightning_curvature.functional.operator.ggn import Curvature
from lightning_curvature.functional.operator.operator import HessianOperator

__all__ = ["hessian_vector_product"]


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

    Raises:
        ValueError: if ``vector`` is not a finite tensor over the measured parameters (or one
            per parameter), and on invalid settings as :class:`HessianOperator`.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> hessian_vector_product(net, lambda m, b: m(b).pow(2).mean(), x, [torch.ones(1, 2)])
        [tensor([[1., 4.]])]
    """
    pieces: Sequence[Any] = [vector] if isinstance(vector, torch.Tensor) else vector
    if not isinstance(pieces, (list, tuple)) or not pieces:
        pieces = [vector]  # refused below, naming `vector`
    for piece in pieces:
        check_tensor("vector", piece, values=False)  # its values: with the operator's layout
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
        operator.shards.check_vector("vector", flat, operator.device)  # type: ignore[arg-type]
        product = operator.matvec(flat)  # type: ignore[arg-type]
        return product if flat_input else [t.clone() for t in operator.layout.split(product)]
