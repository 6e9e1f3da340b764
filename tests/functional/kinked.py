"""Tiny models with one value near a kink, and their exact float64 Hessians.

Each case is a float32 model (the dtype the monitors run in), its loss and a batch, built
so that one example's value sits ``delta`` (1e-4 by default) from a kink of its op: a
clamp at its bound, ``F.l1_loss`` at a zero residual, ``nn.Hardsigmoid`` at 3,
``nn.Hardswish`` at -3, ``nn.ELU(alpha=2)`` at 0, a top-2 mixture of experts with its
second and third router logits tied. A finite difference crosses that kink (products
12x-620x off before the self-check); autograd's Hessian at the point is the one on the
side the value lies, which :func:`dense_hessian` computes in float64 (``nn.Hardsigmoid``
has no double backward: its reference is the same function written with a clamp).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.functional.cases import dense_hessian, seeded

LossFn = Callable[[nn.Module, Any], torch.Tensor]
KINKS = ["clamp", "l1", "hardsigmoid", "hardswish", "elu2", "moe"]
# The op of the loss's graph each case's refusal names (list filter or self-check).
NAMED = {
    "clamp": "ClampBackward1",
    "l1": "AbsBackward0",
    "hardsigmoid": "Hardsigmoid",
    "hardswish": "Hardswish",
    "elu2": "ELU",
    "moe": "TopkBackward0",
}


class Clamp(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.clamp(-1.0, 1.0)


class ClampedHardsigmoid(nn.Module):
    """``nn.Hardsigmoid`` written with a clamp (which has a double backward)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h / 6 + 0.5).clamp(0.0, 1.0)


class Activated(nn.Module):
    """Linear 4→5, the activation, linear 5→3."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.first, self.act, self.head = nn.Linear(4, 5), activation, nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.first(x)))


class Regressor(nn.Module):
    """A tanh layer and a scalar head (for the L1 loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.head = nn.Linear(4, 5), nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.first(x))).squeeze(-1)


class TopTwoExperts(nn.Module):
    """Mixtral-style routing: softmax over 4 tanh experts, the top 2 renormalised."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(4, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.router(x).softmax(-1).topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        outputs = torch.stack([torch.tanh(expert(x)) for expert in self.experts], dim=1)
        picked = outputs.gather(1, chosen.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))
        return self.head((weights.unsqueeze(-1) * picked).sum(1))


def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def l1(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.l1_loss(model(x), y)


def _near(model: Activated, x: torch.Tensor, kink: float, delta: float) -> None:
    """Shift one bias so that example 0's first pre-activation sits ``delta`` from ``kink``."""
    with torch.no_grad():
        model.first.bias[0] += kink + delta - model.first(x)[0, 0]


def _build(name: str, delta: float) -> tuple[nn.Module, LossFn, Any]:
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    activations: dict[str, tuple[Callable[[], nn.Module], float, float]] = {
        "clamp": (Clamp, 1.0, delta),
        "hardsigmoid": (nn.Hardsigmoid, 3.0, -delta),
        "hardsigmoid_reference": (ClampedHardsigmoid, 3.0, -delta),
        "hardswish": (nn.Hardswish, -3.0, delta),
        "elu2": (lambda: nn.ELU(alpha=2.0), 0.0, delta),
    }
    if name in activations:
        make, kink, offset = activations[name]
        model = Activated(make())
        _near(model, x, kink, offset)
        return model, cross_entropy, (x, y)
    if name == "l1":
        regressor = Regressor()
        target = torch.randn(8)
        with torch.no_grad():
            target[0] = regressor(x)[0] - delta  # example 0's residual: delta
        return regressor, l1, (x, target)
    assert name == "moe", name
    experts = TopTwoExperts()
    with torch.no_grad():
        logits = experts.router(x)[0]
        second, third = logits.argsort(descending=True)[1:3]
        gap = logits[second] - logits[third] - delta  # third rises to delta below second
        experts.router.weight[third] += gap * x[0] / x[0].pow(2).sum()
    return experts, cross_entropy, (x, y)


def kinked_case(
    name: str, dtype: torch.dtype = torch.float32, delta: float = 1e-4, seed: int = 0
) -> tuple[nn.Module, LossFn, Any]:
    """The model, its loss and its batch (seeded, the global RNG untouched)."""
    with seeded(seed):
        model, loss_fn, (x, y) = _build(name, delta)
    y = y.to(dtype) if y.is_floating_point() else y
    return model.to(dtype), loss_fn, (x.to(dtype), y)


def kinked_hessian(name: str, delta: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """The exact float64 Hessian at the case's weights (symmetrised)."""
    reference = "hardsigmoid_reference" if name == "hardsigmoid" else name
    model, loss_fn, batch = kinked_case(reference, torch.float64, delta, seed)
    hessian = dense_hessian(model, loss_fn, batch)
    return (hessian + hessian.T) / 2


def twin(name: str, delta: float = 1e-4, seed: int = 0) -> tuple[nn.Module, LossFn, Any]:
    """A float32 case whose exact backends run (``nn.Hardsigmoid`` written with a clamp)."""
    return kinked_case("hardsigmoid_reference" if name == "hardsigmoid" else name, delta=delta,
                       seed=seed)  # fmt: skip
