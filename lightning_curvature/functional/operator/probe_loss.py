"""The probe loss as a function of the measured parameters, summed over the probe's batches.

Every backend but the sharded one evaluates the model through it: the size-weighted sum
``L(w) = Σ_b w_b · loss_fn(model_w, b)`` of
:class:`~lightning_curvature.functional.model.functional_model.FunctionalModel` losses, at
the measured parameters (:attr:`ProbeLoss.leaves`) or at any other weights, and any
per-batch quantity summed with the same weights. The model's own errors (in the forward)
pass through as they are.

Every evaluation over the probe's batches starts from the same random state: the torch
generators (CPU and the model's device) are rewound to where they stood when the probe
opened (:meth:`ProbeLoss.rewind`). A loss that draws (dropout kept on with ``dropout=True``,
noise in ``loss_fn``) then sees one set of draws per probe, the same for every product and
both gradients of a finite difference, so the products are those of one function: its
Hessian with the masks fixed, symmetric to rounding. The probe runs inside a fork of those
generators (:func:`~lightning_curvature.functional.model.probe.probe_context`), so training's
random stream is untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_curvature.functional.model.batches import ProbeBatches
from lightning_curvature.functional.model.functional_model import FunctionalModel

__all__ = ["ProbeLoss", "TorchRandomState"]


class TorchRandomState:
    """The torch generators' states (CPU and a CUDA device), captured to be put back.

    Example:
        >>> state = TorchRandomState(torch.device("cpu"))
        >>> first = torch.rand(2)
        >>> state.restore()
        >>> torch.equal(first, torch.rand(2))
        True
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device if device.type == "cuda" else None
        self._cpu = torch.get_rng_state()
        self._cuda = None if self._device is None else torch.cuda.get_rng_state(self._device)

    def restore(self) -> None:
        """Put the captured states back."""
        torch.set_rng_state(self._cpu)
        if self._device is not None and self._cuda is not None:
            torch.cuda.set_rng_state(self._cuda, self._device)


class ProbeLoss:
    """The weighted loss of the probe's batches through ``functional``, at any weights.

    Args:
        functional: the loss (or the outputs, for the GGN) as a function of the measured
            parameters.
        probe: the probe's batches and their weights.

    Attributes:
        functional: ``functional``.
        leaves: the measured parameters as autograd leaves (``functional.primals``, now
            requiring grad): the graphs of the products are built from them.
        inputs: the probe's batches as the model is fed (``functional.inputs``).
        weights: one weight per batch.

    Example:
        >>> from torch import nn
        >>> from lightning_curvature.functional.model.batches import split_batches
        >>> from lightning_curvature.functional.model.parameters import select_parameters
        >>> net = nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(2.0)
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()
        >>> functional = FunctionalModel(net, loss_fn, select_parameters(net))
        >>> losses = ProbeLoss(functional, split_batches(torch.ones(2, 1), torch.device("cpu")))
        >>> losses.gradient_at(losses.leaves)  # d(w²)/dw at w = 2
        [tensor([[4.]])]
    """

    def __init__(self, functional: FunctionalModel, probe: ProbeBatches) -> None:
        self.functional = functional
        self.leaves = [p.requires_grad_(True) for p in functional.primals]
        self.inputs = [functional.inputs(b) for b in probe.batches]
        self.weights = probe.weights
        device = self.leaves[0].device if self.leaves else torch.device("cpu")
        self._random = TorchRandomState(device)

    def rewind(self) -> None:
        """Put the torch generators back where they stood when the probe opened."""
        self._random.restore()

    def loss(self, leaves: Sequence[torch.Tensor], batch: Any) -> torch.Tensor:
        """The loss on one batch (one of :attr:`inputs`) at the weights ``leaves``."""
        return self.functional.loss(leaves, batch)

    def weighted_loss(self, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        """The weighted loss of all the batches at the weights ``leaves``."""
        self.rewind()
        total = sum(
            w * self.loss(leaves, b) for b, w in zip(self.inputs, self.weights, strict=True)
        )
        return total  # type: ignore[return-value]

    def weighted_sum(
        self, per_batch: Callable[[Any], Sequence[torch.Tensor]], items: Sequence[Any] = ()
    ) -> list[torch.Tensor]:
        """``Σ_b w_b · per_batch(b)`` over the probe's batches (or ``items``, one a batch)."""
        self.rewind()
        total: list[torch.Tensor] | None = None
        for batch, weight in zip(items or self.inputs, self.weights, strict=True):
            pieces = per_batch(batch)  # one batch: weight 1, no copy (and no node in a graph)
            scaled = list(pieces) if weight == 1.0 else [weight * t for t in pieces]
            total = scaled if total is None else [t + s for t, s in zip(total, scaled, strict=True)]
        assert total is not None
        return total

    def gradient_at(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """The plain (first-order) gradient of the weighted loss at other weights."""

        def gradient(batch: Any) -> tuple[torch.Tensor, ...]:
            loss = self.loss(leaves, batch)
            return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)

        return self.weighted_sum(gradient)
