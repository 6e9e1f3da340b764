"""The SAM (or ASAM) gradient ``∇L(w + ε)`` of a model and a loss, without Lightning.

Sharpness-aware minimisation (SAM; Foret et al., ICLR 2021) steps with the gradient at the
first-order worst point ``w + ε`` of a ρ-ball around the weights, ``ε = ρ g/‖g‖`` for
``g = ∇L(w)``; adaptive SAM (ASAM; Kwon et al., ICML 2021) measures the ball in
scale-invariant coordinates, ``ε = ρ T²g/‖Tg‖`` with ``T = |w| + η``. The formulas, their
fixed arithmetic and their sharded form are in
:mod:`~lightning_curvature.functional.gradients.perturbation`.

:func:`sam_gradient` is the whole SAM gradient of a model and a loss: a first pass at ``w``,
ε from its gradient, a second pass at ``w + ε`` (BatchNorm's running statistics frozen, the
first pass's random draws replayed with ``dropout="reuse"``), the weights restored
bit-exactly. The ``SAM`` callback does the same inside Lightning's optimizer step, with the
argument check :func:`check_sam_arguments` shared by both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_curvature.checks import check_callable, check_choice, check_flag
from lightning_curvature.errors import NonFiniteCurvatureError
from lightning_curvature.functional.gradients.perturbation import (
    SAMPerturbation,
    check_perturbation_arguments,
    perturbed_parameters,
    sam_perturbation,
)
from lightning_curvature.functional.gradients.rng import RNGState
from lightning_curvature.functional.gradients.summed import gradient_sum
from lightning_curvature.functional.model.batches import split_batches
from lightning_curvature.functional.model.functional_model import LossFn, call_loss
from lightning_curvature.functional.model.parameters import ParameterPatterns, select_parameters
from lightning_curvature.functional.model.probe import frozen_running_stats, unwrap_model

__all__ = [
    "SAMDropout",
    "SAMGradient",
    "check_sam_arguments",
    "sam_gradient",
]

#: What the second pass does with random draws (dropout masks, noise) of the loss:
#: ``"reuse"`` replays the first pass's draws, ``"resample"`` draws new ones.
SAMDropout = Literal["reuse", "resample"]
_DROPOUT = ("reuse", "resample")


def check_sam_arguments(
    rho: float, eta: float = 0.01, dropout: Any = "reuse", adaptive: Any = False
) -> None:
    """Raise if ``rho``, ``eta``, ``dropout`` or ``adaptive`` is out of range.

    Raises:
        ValueError: if ``rho`` is not a finite number > 0, ``eta`` not a finite number >= 0,
            ``dropout`` not ``"reuse"`` or ``"resample"``, or ``adaptive`` not a bool.

    Example:
        >>> check_sam_arguments(0.05, 0.01)  # fine: returns None
        >>> check_sam_arguments(0.0)
        Traceback (most recent call last):
        ...
        ValueError: `rho` must be a finite number > 0, got 0.0.
    """
    check_perturbation_arguments(rho, eta)
    check_choice("dropout", dropout, _DROPOUT)
    check_flag("adaptive", adaptive)


@dataclass(frozen=True)
class SAMGradient:
    """Result of :func:`sam_gradient`; tensors live on the model's device.

    Attributes:
        gradients: ``∇L(w + ε)`` for each measured parameter (``None`` if it has none).
        loss: ``L(w)``.
        perturbed_loss: ``L(w + ε)``.
        perturbation: ε and the gradient norm it was normalised by.
        curvature: ``(∇L(w + ε) − ∇L(w))·ε / ‖ε‖²``, the curvature along ε that the two
            gradients give for free (accumulated in float64, returned in the loss's dtype; see
            :meth:`SAMPerturbation.curvature`).
        parameter_names: the measured parameters, in the order of ``gradients``.

    Example:
        >>> net = nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(2.0)
        >>> out = sam_gradient(net, lambda m, b: 0.5 * m(b).pow(2).sum(), torch.ones(1, 1), rho=0.5)
        >>> out.gradients[0], out.loss, out.perturbed_loss, out.sharpness  # f = ½w², w + ε = 2.5
        (tensor([[2.5000]]), tensor(2.), tensor(3.1250), tensor(1.1250))
    """

    gradients: tuple[torch.Tensor | None, ...]
    loss: torch.Tensor
    perturbed_loss: torch.Tensor
    perturbation: SAMPerturbation
    parameter_names: tuple[str, ...]
    curvature: torch.Tensor

    @property
    def sharpness(self) -> torch.Tensor:
        """``L(w + ε) − L(w)``, SAM's first-order estimate of the sharpness."""
        return self.perturbed_loss - self.loss


def sam_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    rho: float = 0.05,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    parameters: ParameterPatterns = None,
    dropout: SAMDropout = "reuse",
) -> SAMGradient:
    """The SAM (or ASAM) gradient ``∇L(w + ε)`` of ``loss_fn`` at the model's weights.

    The first pass is an ordinary forward and backward (in train mode BatchNorm updates its
    running statistics once, as in a plain step); the second pass, at ``w + ε``, leaves
    them untouched. The weights are restored bit-exactly; no ``.grad`` is written.

    Args:
        model: the module (``torch.compile``/DDP wrappers are looked through).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: one batch or an iterable of batches (size-weighted mean loss).
        rho: neighbourhood radius (``> 0``).
        adaptive: ASAM instead of SAM.
        eta: ASAM's offset in ``T = |w| + η`` (``>= 0``).
        parameters: glob pattern(s) of the parameters to perturb and differentiate.
        dropout: ``"reuse"`` (default) replays the first pass's random draws (same dropout
            masks) in the second pass and leaves the global RNGs as the first pass left
            them; ``"resample"`` lets the second pass draw new ones.

    Raises:
        ValueError: on arguments out of range (named in the message).
        NonFiniteCurvatureError: if the loss or the gradient at ``w`` is not finite.

    Example:
        On ``f(w) = ½ wᵀAw`` the SAM gradient is ``A(w + ρ Aw/‖Aw‖)``:

        >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0, 8.0]))
        >>> net = nn.Linear(4, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, 0.5, 0.25, 0.125]]))  # Aw = (1, 1, 1, 1)
        >>> quadratic = lambda m, b: 0.5 * m.weight[0] @ b @ m.weight[0]
        >>> out = sam_gradient(net, quadratic, A, rho=0.25)  # ε = 0.25 (1, 1, 1, 1) / 2
        >>> out.gradients[0]
        tensor([[1.1250, 1.2500, 1.5000, 2.0000]])
        >>> out.sharpness  # f(w + ε) − f(w) = 1.5546875 − 0.9375
        tensor(0.6172)
        >>> out.curvature  # εᵀAε/‖ε‖² with ε ∝ (1, 1, 1, 1): (1 + 2 + 4 + 8) / 4
        tensor(3.7500)
    """
    check_sam_arguments(rho, eta, dropout, adaptive)
    check_callable("loss_fn", loss_fn, "loss_fn(model, batch)")
    model = unwrap_model(model)
    named = select_parameters(model, parameters)
    params = [p for _, p in named]
    device = params[0].device
    probe = split_batches(batch, device)
    states: list[RNGState] = []
    losses: list[torch.Tensor] = []

    def first_pass() -> Iterator[torch.Tensor]:
        for item, weight in zip(probe.batches, probe.weights, strict=True):
            if dropout == "reuse":
                states.append(RNGState.capture(device))
            loss = weight * call_loss(loss_fn, model, item)
            losses.append(loss.detach())
            yield loss

    with torch.enable_grad():
        grads = gradient_sum(params, first_pass())
    loss = torch.stack(losses).sum()
    perturbation = sam_perturbation(params, grads, rho, adaptive=adaptive, eta=eta)
    if not (bool(torch.isfinite(loss)) and perturbation.is_finite()):
        raise NonFiniteCurvatureError(
            f"the loss ({float(loss)}) or the gradient norm "
            f"({float(perturbation.gradient_norm)}) at w is not finite."
        )
    after_first = RNGState.capture(device)
    perturbed_losses: list[torch.Tensor] = []

    def second_pass() -> Iterator[torch.Tensor]:
        for j, (item, weight) in enumerate(zip(probe.batches, probe.weights, strict=True)):
            if dropout == "reuse":
                states[j].restore()
            loss = weight * call_loss(loss_fn, model, item)
            perturbed_losses.append(loss.detach())
            yield loss

    try:
        with (
            perturbed_parameters(params, perturbation),
            frozen_running_stats(model),
            torch.enable_grad(),
        ):
            sam_grads = gradient_sum(params, second_pass())
    finally:
        if dropout == "reuse":
            after_first.restore()
    return SAMGradient(
        gradients=tuple(sam_grads),
        loss=loss,
        perturbed_loss=torch.stack(perturbed_losses).sum(),
        perturbation=perturbation,
        parameter_names=tuple(name for name, _ in named),
        curvature=perturbation.curvature(grads, sam_grads).to(loss.dtype),
    )
