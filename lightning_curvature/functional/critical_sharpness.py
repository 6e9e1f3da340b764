"""``critical_sharpness``: ``2/η_c``, the step size along an update at which the loss rises.

Kalra et al. (2026, "A scalable measure of loss landscape curvature for analyzing the
training dynamics of LLMs", arXiv 2601.16979) define the critical step size ``η_c`` as the
smallest ``η`` at which one step along the optimizer's update ``u`` raises the loss,
``L(w − η u) > L(w)``, and the critical sharpness as ``λ_c = 2/η_c``. It needs forward passes
only (a line search, :func:`~lightning_curvature.functional.linalg.line_search.critical_step`),
so it runs wherever the model's forward does. On a quadratic with gradient ``g`` and Hessian
``H``, ``L(w − ηu) − L(w) = −η gᵀu + ½η² uᵀHu``, so

    ``λ_c = uᵀHu / gᵀu``,

the curvature along ``u`` when ``u = g`` (gradient descent), and in general the curvature
along the update measured in the optimizer's own units: the loss along the step rises once
``η > 2/λ_c``, so ``η·λ_c / 2`` is 1 at the edge of stability for any optimizer (heavy ball
and Adam included: their period-2 oscillation at the edge puts ``λ_c`` at ``2/η``, not at
their thresholds ``(2 + 2β)/η``, 38/η of ``λ₁``).

The update is a flat vector, or a function of the probe gradient that returns one (e.g. the
optimizer's next update, :func:`~lightning_curvature.functional.optimizer_update.next_update`),
then computed inside the same probe. The loss at each trial point is one forward pass of the
probe (:class:`~lightning_curvature.functional.operator.displaced_loss.DisplacedLoss`): the
user's parameters are never written (over FSDP2 shards, where the update is this process's
shard, they are displaced in place and restored exactly after each forward pass, and the
losses and ``gᵀu`` are the union batch's on every process, which so bracket the same
``η_c``). A trial point whose loss is not finite counts as risen (a step that blows the model
up has not lowered its loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_curvature.checks import check_budget, check_callable, check_real
from lightning_curvature.errors import NonFiniteCurvatureError
from lightning_curvature.functional.linalg.line_search import critical_step
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.parameters import ParameterPatterns
from lightning_curvature.functional.model.probe import BatchNormMode
from lightning_curvature.functional.operator.backends import AllReduce
from lightning_curvature.functional.operator.displaced_loss import DisplacedLoss

__all__ = [
    "CriticalSharpness",
    "UpdateRule",
    "check_critical_sharpness_arguments",
    "critical_sharpness",
]

#: An update computed from the probe gradient ``g`` (flat, float32 or float64).
UpdateRule = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CriticalSharpness:
    """Result of :func:`critical_sharpness`.

    Attributes:
        value: ``2/η_c`` (float64). Unconverged, a bound: ``2/upper`` (``λ_c`` is larger)
            when the loss rose at every step size tried (no descent along ``u``), 0 when it
            rose at none (``λ_c ≤ 2/lower``).
        step_size: ``η_c``, the geometric middle of the final bracket (``upper`` or ``inf``
            when it is open).
        lower: the largest step size tried at which the loss did not rise (0.0 if none).
        upper: the smallest step size tried at which it rose (``inf`` if none).
        converged: whether ``upper / lower ≤ 1 + rtol`` (``value`` then lies between
            ``2/upper`` and ``2/lower``).
        loss: ``L(w)``.
        slope: ``gᵀu`` (the loss falls along ``−u`` at first iff positive); NaN when the
            update was given as a vector (no gradient computed).
        num_forwards: forward passes of the probe (the gradient's counts as one).

    Example:
        >>> out = CriticalSharpness(torch.tensor(4.0, dtype=torch.float64), 0.5, 0.498, 0.502,
        ...                         True, torch.tensor(1.0), torch.tensor(2.0), 7)
        >>> out.relative_to(0.25)  # the step 0.25 is half the critical one
        0.5
    """

    value: torch.Tensor
    step_size: float
    lower: float
    upper: float
    converged: bool
    loss: torch.Tensor
    slope: torch.Tensor
    num_forwards: int

    def relative_to(self, lr: float) -> float:
        """``lr / η_c = lr·λ_c / 2``: ≥ 1 when a step of size ``lr`` raises the loss."""
        return lr * float(self.value) / 2.0


def check_critical_sharpness_arguments(init: Any, rtol: Any, max_evals: Any) -> None:
    """Raise on an invalid line-search argument of :func:`critical_sharpness`, naming it.

    Raises:
        ValueError: naming the argument, the allowed values and the value given.

    Example:
        >>> check_critical_sharpness_arguments(1.0, 1.5, 30)
        Traceback (most recent call last):
        ...
        ValueError: `rtol` must be a finite number in (0, 1), got 1.5.
    """
    check_real("init", init, 0, low_open=True)
    check_real("rtol", rtol, 0, 1, low_open=True, high_open=True)
    check_budget("max_evals", max_evals, 2)


def critical_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    update: torch.Tensor | UpdateRule,
    *,
    init: float = 1.0,
    rtol: float = 0.01,
    max_evals: int = 30,
    parameters: ParameterPatterns = None,
    batch_norm: BatchNormMode = "as_is",
    all_reduce: AllReduce | None = None,
) -> CriticalSharpness:
    """Critical sharpness ``2/η_c`` of ``loss_fn`` along the update ``u`` (forward passes only).

    Args:
        model: the module; its trainable parameters are measured.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: one batch or an iterable of batches.
        update: the flat update ``u`` (the step is ``w − η u``: pass the update per unit
            learning rate, and ``η`` is a learning rate), or a function of the flat probe
            gradient that returns it (one gradient of the probe more). Over sharded (FSDP2)
            parameters, this process's shard (the gradient given to the function too).
        init: the first step size tried: the previous ``η_c`` (a warm start: about 6
            forward passes when the answer moved less than 10%), or the learning rate.
        rtol: relative width of the final bracket of ``η_c`` (so of ``value``).
        max_evals: most forward passes of the line search.
        parameters: glob pattern(s) selecting the measured parameters.
        batch_norm: BatchNorm mode during the probe.
        all_reduce: averages a tensor across processes (DDP): every loss is the union
            batch's, so every rank brackets the same ``η_c``. Over FSDP2 shards every loss
            is the union batch's without it.

    Raises:
        ValueError: on an update that is not a flat vector over the measured parameters
            (this process's shard of them under FSDP2), or invalid search settings.
        NonFiniteCurvatureError: if the loss at ``w`` (or the gradient) is not finite.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)  # L = ½ mean((x·w)²): H = diag(4, 1) here
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(1.0)
        >>> x = torch.tensor([[2.0, 0.0], [0.0, 1.0]]) * 2**0.5
        >>> loss_fn = lambda m, b: 0.5 * m(b).pow(2).mean()
        >>> out = critical_sharpness(net, loss_fn, x, lambda g: g)  # g = (4, 1)
        >>> round(float(out.value), 1)  # gᵀHg / gᵀg = (64 + 1) / 17
        3.8
    """
    check_callable("loss_fn", loss_fn, "loss_fn(model, batch)")
    check_critical_sharpness_arguments(init, rtol, max_evals)
    check_callable("all_reduce", all_reduce, "all_reduce(tensor) -> tensor", allow_none=True)
    with DisplacedLoss(
        model, loss_fn, batch, parameters=parameters, batch_norm=batch_norm, all_reduce=all_reduce
    ) as losses:
        if callable(update):
            loss, gradient = losses.gradient()
            if not bool(torch.isfinite(gradient).all()):
                raise NonFiniteCurvatureError("the probe gradient is not finite.")
            direction = update(gradient)
        else:
            loss, direction = losses.at(), update
        if not bool(torch.isfinite(loss)):
            raise NonFiniteCurvatureError(f"the probe loss is not finite ({loss.item()}).")
        if direction.shape != (losses.layout.size,):
            raise ValueError(
                f"`update` must be a flat vector of shape ({losses.layout.size},) over the "
                f"measured parameters, got {tuple(direction.shape)}."
            )
        direction = direction.to(device=losses.device, dtype=losses.dtype)
        slope = (
            losses.shards.inner_products(gradient.to(direction), direction)
            if callable(update)
            else torch.tensor(math.nan, dtype=torch.float64, device=losses.device)
        )

        def rises(step: float) -> bool:
            moved = losses.at(direction * -step)
            return not bool(moved <= loss)  # NaN and inf count as risen

        found = critical_step(rises, init, rtol=rtol, max_evals=max_evals)
        num_forwards = losses.num_forwards
    step = found.step
    return CriticalSharpness(
        value=torch.tensor(2.0 / step, dtype=torch.float64, device=losses.device),
        step_size=step,
        lower=found.lower,
        upper=found.upper,
        converged=found.converged,
        loss=loss,
        slope=slope,
        num_forwards=num_forwards,
    )
