"""Edge-of-stability thresholds of an optimizer, read at the moment of the probe.

Gradient descent on a quadratic with curvature λ is stable only while ``η λ < 2``; heavy-ball
momentum β (dampening τ) moves that to ``(2 + 2β) / (η (1 − τ))``, PyTorch's Nesterov
momentum to ``(2 + 2β) / (η (1 + 2β))`` (the iteration matrix of ``SGD(nesterov=True)`` on
``λw²/2`` has an eigenvalue −1 at ``ηλ (1 + 2β) = 2 + 2β``); coupled L2 weight decay ``wd``
adds ``wd`` to every eigenvalue. Full-batch training drives the top
eigenvalue up to this threshold and then hovers there (Cohen, Kaur, Li, Kolter & Talwalkar,
ICLR 2021). Adam is stable while the *preconditioned* sharpness ``λ₁(P⁻¹H)`` stays under
``(2 + 2β₁) / ((1 − β₁) η)`` (38/η for β₁ = 0.9), with ``P = (1 − β₁ᵗ) diag(√v̂ + ε)`` its
current preconditioner (Cohen et al., "Adaptive gradient methods at the edge of stability",
2022). ``P⁻¹H`` is similar to ``D H D`` with ``D = P^{-1/2}``, so its top eigenvalue costs one
Lanczos run on the operator ``v -> D ⊙ H (D ⊙ v)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_curvature.functional.linalg.sharded import local_tensor

__all__ = ["StabilityThreshold", "stability_threshold"]


@dataclass(frozen=True)
class StabilityThreshold:
    """The stability threshold of an optimizer at one moment.

    Attributes:
        threshold: in eigenvalue units (``2/η`` for plain SGD).
        kind: ``"sgd"`` or ``"adam"``.
        eigenvalue_shift: added to ``λ_max(H)`` before comparing (coupled L2 weight decay).
        preconditioner: for Adam, the flat ``D = P^{-1/2}`` over the measured parameters,
            such that ``λ₁(D H D)`` is compared with ``threshold``; ``None`` for SGD or when
            Adam has no state yet (before its first step).
    """

    threshold: float
    kind: str
    eigenvalue_shift: float = 0.0
    preconditioner: torch.Tensor | None = None

    @property
    def limit(self) -> float:
        """The value of the compared eigenvalue itself at which the step turns unstable.

        ``threshold − eigenvalue_shift``: with coupled weight decay ``wd`` the optimized loss
        has the Hessian ``H + wd·I``, so ``η(λ₁ + wd) < 2`` is ``λ₁ < 2/η − wd``.

        Example:
            >>> StabilityThreshold(20.0, "sgd", eigenvalue_shift=0.5).limit
            19.5
        """
        return self.threshold - self.eigenvalue_shift


def _shared(values: list[float], name: str) -> float:
    # Several groups with different values: the most restrictive (smallest threshold) wins.
    return max(values) if name == "lr" else values[0]


def stability_threshold(
    optimizer: torch.optim.Optimizer, parameters: Sequence[torch.Tensor]
) -> StabilityThreshold | None:
    """Threshold of ``optimizer`` for the measured ``parameters``; ``None`` if unknown.

    For several parameter groups with different learning rates the largest is used (the
    tightest threshold). A learning rate of 0 (the first step of a warmup) gives an infinite
    threshold: no curvature makes a step of size 0 unstable. Unknown optimizers give ``None``.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (subclasses included).
        parameters: the measured parameters, in the layout order of the Hessian operator
            (needed to build Adam's preconditioner).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> stability_threshold(torch.optim.SGD([w], lr=0.5, momentum=0.5), [w]).threshold
        6.0
        >>> sgd = torch.optim.SGD([w], lr=0.5, momentum=0.5, nesterov=True)
        >>> stability_threshold(sgd, [w]).threshold  # (2 + 2β) / (η (1 + 2β))
        3.0
        >>> stability_threshold(torch.optim.AdamW([w], lr=0.0), [w]).threshold
        inf
    """
    groups = optimizer.param_groups
    lr = _shared([float(g["lr"]) for g in groups], "lr")
    kind = (
        "sgd"
        if isinstance(optimizer, torch.optim.SGD)
        else "adam"
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        else None
    )
    if kind is None:
        return None
    if not lr > 0:  # e.g. the first step of a warmup from 0: no step, no instability
        return StabilityThreshold(math.inf, kind)
    if isinstance(optimizer, torch.optim.SGD):
        momentum = float(groups[0].get("momentum", 0.0))
        dampening = float(groups[0].get("dampening", 0.0)) if momentum > 0 else 0.0
        # SGD(nesterov=True) steps along g + β·buf: on λw²/2 its iteration matrix has the
        # eigenvalue −1 at ηλ(1 + 2β) = 2 + 2β, a threshold 1 + 2β times lower than heavy ball's.
        nesterov = 1.0 + 2.0 * momentum if groups[0].get("nesterov", False) else 1.0
        threshold = (2.0 + 2.0 * momentum) / (lr * (1.0 - dampening) * nesterov)
        return StabilityThreshold(threshold, "sgd", float(groups[0].get("weight_decay", 0.0)))
    beta1, _ = groups[0]["betas"]
    threshold = (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
    return StabilityThreshold(
        threshold, "adam", 0.0, _adam_preconditioner(optimizer, parameters, lr)
    )


def _adam_preconditioner(
    optimizer: torch.optim.Optimizer, parameters: Sequence[torch.Tensor], lr_ref: float
) -> torch.Tensor | None:
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    pieces = []
    for p in parameters:
        state, group = optimizer.state.get(p, {}), group_of.get(id(p))
        if group is None:  # not optimized: no motion along these coordinates
            size = local_tensor(p).numel()  # this process's shard under FSDP2
            pieces.append(torch.zeros(size, dtype=torch.float32, device=p.device))
            continue
        if "exp_avg_sq" not in state:
            return None  # no step taken yet
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        second = local_tensor(second)  # a flat vector over the shards, as the estimators take
        v_hat = second.detach().float() / (1.0 - beta2**step)
        precond = (1.0 - beta1**step) * (v_hat.sqrt() + group["eps"])
        # Per-group learning rates are absorbed relative to the reference one.
        pieces.append(((group["lr"] / lr_ref) / precond).sqrt().reshape(-1))
    return torch.cat(pieces)
