"""Batch sharpness: each mini-batch's curvature along its own gradient.

``E_B[g_Bᵀ H_B g_B / ‖g_B‖²]`` (Andreyev & Beneventano 2024, "Edge of Stochastic
Stability"): the curvature of each mini-batch's own loss along that mini-batch's own gradient,
averaged over mini-batches ``B`` of the training batch size. The paper finds that under
mini-batch SGD this quantity, not ``λ₁`` of the full-batch Hessian, is what settles at
``2/η``. One gradient and one Hessian-vector product per batch; the mean comes with its
Monte-Carlo standard error over the sampled batches. The twin of
:class:`~lightning_curvature.callbacks.batch_sharpness.BatchSharpnessMonitor`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_curvature.checks import shown
from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.directional import quadratic_form
from lightning_curvature.functional.linalg.reductions import inner_products
from lightning_curvature.functional.model.batches import BatchList
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.parameters import ParameterPatterns
from lightning_curvature.functional.model.probe import BatchNormMode
from lightning_curvature.functional.operator.backends import AllReduce, HVPBackend
from lightning_curvature.functional.operator.ggn import Curvature
from lightning_curvature.functional.operator.options import OperatorOptions

__all__ = ["BatchSharpness", "batch_sharpness"]


@dataclass(frozen=True)
class BatchSharpness:
    """Result of :func:`batch_sharpness`; tensors on the model's device, in its compute dtype.

    Attributes:
        estimate: the mean of ``g_Bᵀ H_B g_B / ‖g_B‖²`` over the sampled batches.
        std_error: its Monte-Carlo standard error, ``std(values) / √num_batches``
            (unbiased variance); NaN with fewer than two usable batches.
        values: the per-batch quotients (NaN for a batch whose gradient is zero).
        num_batches: the batches that entered the estimate.
        num_hvps: Hessian-vector products used (one per batch).

    Example:
        >>> out = BatchSharpness(torch.tensor(2.0), torch.tensor(0.5),
        ...                      torch.tensor([1.5, 2.5]), 2, 2)
        >>> float(out.estimate - 2 * out.std_error), float(out.estimate + 2 * out.std_error)
        (1.0, 3.0)
    """

    estimate: torch.Tensor
    std_error: torch.Tensor
    values: torch.Tensor
    num_batches: int
    num_hvps: int


def batch_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    parameters: ParameterPatterns = None,
    backend: HVPBackend = "auto",
    batch_norm: BatchNormMode = "as_is",
    all_reduce: AllReduce | None = None,
    curvature: Curvature = "hessian",
    options: OperatorOptions | None = None,
) -> BatchSharpness:
    """Batch sharpness ``E_B[g_Bᵀ H_B g_B / ‖g_B‖²]`` over ``batches`` (Andreyev & Beneventano).

    Each item of ``batches`` is one sample ``B`` (a mini-batch of the size training uses):
    its gradient ``g_B`` and its own Hessian ``H_B``; the estimate is the mean of the
    quotients, with its standard error. Under DDP (``all_reduce``) the gradient and the
    product are averaged over the processes, so each sample is the union of the ranks'
    batches: the global batch an optimizer step sees.

    Cost per batch: one Hessian-vector product plus the gradient (free with the default
    ``"retained_graph"`` backend, whose products go through that gradient's graph).

    Args:
        model: the module; its trainable parameters are measured.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: at least two batches, each one sample (a list, a ``BatchList``, a
            ``DataLoader``, any iterable).
        parameters: glob pattern(s) selecting the measured parameters.
        backend: Hessian-vector product strategy (see :class:`HessianOperator`).
        batch_norm: BatchNorm mode during the probe.
        all_reduce: averages a tensor across processes (DDP).
        curvature: ``"hessian"``, or ``"ggn"`` for ``g_Bᵀ G_B g_B/‖g_B‖²`` (``loss_fn`` an
            :class:`~lightning_curvature.OutputLoss`).
        options: the operator's settings as one ``OperatorOptions`` instead of keywords.

    Raises:
        ValueError: if ``batches`` is not an iterable of at least two batches.
        NonFiniteCurvatureError: if a loss, gradient or product is not finite.

    Warns:
        CurvatureWarning: if a batch's gradient is zero (it is left out).

    Example:
        >>> net = nn.Linear(2, 1, bias=False)  # weights 0: g_B = −2 X_Bᵀ y_B / n
        >>> _ = net.weight.data.zero_()
        >>> loss_fn = lambda m, b: (m(b[0]).squeeze(1) - b[1]).pow(2).mean()
        >>> one = (torch.tensor([[1.0, 0.0]]), torch.tensor([1.0]))  # H = diag(2, 0), g ∝ e₁
        >>> two = (torch.tensor([[0.0, 1.0]]), torch.tensor([1.0]))  # H = diag(0, 2), g ∝ e₂
        >>> out = batch_sharpness(net, loss_fn, [one, two])
        >>> out.estimate, out.std_error, out.num_hvps
        (tensor(2.), tensor(0.), 2)
    """
    if not isinstance(batches, Iterable) or isinstance(
        batches, (str, bytes, torch.Tensor, Mapping)
    ):
        raise ValueError(
            "`batches` must be an iterable of batches (a list, a BatchList, a DataLoader), "
            f"each one sample, got {shown(batches)}."
        )
    settings = OperatorOptions.of(options, parameters, backend, batch_norm, curvature, all_reduce)
    values: list[torch.Tensor] = []  # float64, like their mean and its standard error
    num_hvps = 0
    dtype = torch.get_default_dtype()
    for batch in batches:
        with settings.operator(model, loss_fn, BatchList([batch])) as operator:
            dtype = operator.dtype
            gradient = operator.gradient()
            squared = inner_products(gradient, gradient)
            if float(squared) == 0.0:
                values.append(torch.full_like(squared, math.nan))
                continue
            values.append(quadratic_form(operator, gradient) / squared)
            num_hvps += operator.num_hvps
    if len(values) < 2:
        raise ValueError(
            f"`batches` must hold at least 2 batches (the standard error needs two samples), "
            f"got {len(values)}."
        )
    stacked = torch.stack(values)
    usable = stacked[torch.isfinite(stacked)]
    if usable.numel() < stacked.numel():
        warnings.warn(
            f"{stacked.numel() - usable.numel()} of {stacked.numel()} batches have a zero "
            "gradient (no direction to measure along); they are left out of batch sharpness.",
            CurvatureWarning,
            stacklevel=2,
        )
    n = usable.numel()
    nan = torch.full_like(stacked[0], math.nan)
    estimate = usable.mean() if n else nan
    std_error = usable.std(correction=1) / math.sqrt(n) if n >= 2 else nan
    return BatchSharpness(estimate.to(dtype), std_error.to(dtype), stacked.to(dtype), n, num_hvps)
