"""Kinks a finite difference would cross: the modules and graph ops refused, and the suspects.

A central difference ``(∇L(w + εv) − ∇L(w − εv)) / 2ε`` is the Hessian only where the
gradient is smooth on the segment ``w ± εv``. An op whose derivative jumps (ReLU at 0,
clamp at its bounds, abs at 0, hard-sigmoid and hard-swish at ±3, ELU with ``α ≠ 1`` at 0,
top-k where two inputs tie) puts an ``O(1/ε)`` error into every product whose segment
crosses the jump: 12x to 620x the product on tiny models with one value near the kink,
and it does not shrink with the step. Two filters run before any product:

* :func:`check_smooth` refuses the modules that are kinked wherever they are used (the
  ReLU family, hard-tanh/-sigmoid/-swish, shrinkage, max-pooling, ELU/SELU with a jump in
  the derivative, ``nn.L1Loss``); it needs no forward, so the monitors run it at setup;
* :func:`check_no_kinks` refuses the same ops found in the loss's autograd graph (a
  functional ``F.relu`` or ``abs`` is no module), and a clamp with an input within 2% of
  its bound (a clamp far from its bounds, as ``F.normalize``'s guard of the norm, is
  smooth where the step moves).

The lists are a fast first filter; the next kink they miss is found by the operator's
self-check (:mod:`~lightning_curvature.functional.operator.self_check`), whose message names
the ops of :func:`kink_suspects` (top-k, sort, max/min, sign, rounding, a clamp) as the
likely cause.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_curvature.errors import PiecewiseLinearError

__all__ = ["check_no_kinks", "check_smooth", "kink_suspects"]

# Modules whose kinks a finite difference crosses (its products are then not the Hessian).
_PIECEWISE_LINEAR = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.Hardtanh,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.SELU,
    nn.L1Loss,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
# Backward nodes of ops kinked wherever they are used (F.relu, abs, max_pool, hardswish, ...).
_KINKED_NODES = (
    "Relu",
    "Threshold",
    "Hardtanh",
    "Shrink",
    "MaxPool",
    "Prelu",
    "Rrelu",
    "Hardsigmoid",
    "Hardswish",
    "AbsBackward",
)
_CLAMP_NODES = ("ClampBackward", "ClampMinBackward", "ClampMaxBackward")
_NEAR_BOUND = 0.02  # a clamp input this close to a bound (relative to the largest input)
# Ops kinked only where their inputs tie or cross a threshold: named when the self-check fails.
_SUSPECT_NODES = (
    "Topk",
    "Sort",
    "Kthvalue",
    "Median",
    "MaxBackward",
    "MinBackward",
    "Amax",
    "Amin",
    "Maximum",
    "Minimum",
    "Fmax",
    "Fmin",
    "Sign",
    "Sgn",
    "Floor",
    "Ceil",
    "Round",
    "Trunc",
    "Frac",
    "Remainder",
    "Fmod",
    "Clamp",
    "SmoothL1",
    "Huber",
)


def _kinked_module(module: nn.Module) -> bool:
    if isinstance(module, _PIECEWISE_LINEAR):
        return True
    if isinstance(module, nn.ELU):  # the derivative jumps from α to 1 at 0 unless α = 1
        return float(module.alpha) != 1.0
    return isinstance(module, nn.EmbeddingBag) and module.mode == "max"


def check_smooth(model: nn.Module) -> None:
    """Refuse finite differences through kinked modules (named in the message).

    Raises:
        ValueError: naming every kinked module (ReLU, max-pooling, hard-swish, ...).

    Example:
        >>> check_smooth(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))  # smooth: nothing happens
        >>> check_smooth(nn.Sequential(nn.Linear(2, 2), nn.ELU(alpha=2.0)))
        Traceback (most recent call last):
        ...
        ValueError: backend='finite_difference' needs a smooth model: ...
    """
    kinked = [
        f"{name or type(model).__name__!r} ({type(module).__name__})"
        for name, module in model.named_modules()
        if _kinked_module(module)
    ]
    if kinked:
        raise ValueError(
            "backend='finite_difference' needs a smooth model: a finite difference crosses "
            "the kinks of piecewise-linear modules (and of other kinked modules), and its "
            "products then differ from the Hessian autograd defines (by several times its "
            "size); found "
            f"{', '.join(kinked)}. Use another `backend`, or smooth activations (GELU, SiLU, "
            "tanh)."
        )


def _saved(node: Any, name: str) -> Any:
    try:
        return getattr(node, name, None)
    except RuntimeError:  # freed by a backward: nothing to read
        return None


def _near_bound(node: Any) -> bool:
    """Whether a clamp's input lies within 2% of one of its bounds.

    2% of the larger of the largest input and the bound.
    """
    inputs = _saved(node, "_saved_self")
    if not isinstance(inputs, torch.Tensor) or inputs.numel() == 0:
        return True  # cannot tell: refused
    values = inputs.detach()
    largest = values.abs().max()
    for name in ("_saved_min", "_saved_max"):
        bound = _saved(node, name)
        if bound is None:
            continue
        bound = torch.as_tensor(bound, dtype=values.dtype, device=values.device)
        scale = torch.maximum(largest, bound.abs().max())
        if bool(((values - bound).abs() <= _NEAR_BOUND * scale).any()):
            return True
    return False


def _kink(node: Any) -> str | None:
    """Why ``node``'s op is a kink a finite difference crosses, or ``None``."""
    name = type(node).__name__
    if any(kind in name for kind in _KINKED_NODES):
        return name
    if name.startswith("EluBackward"):  # ELU, SELU: the derivative jumps unless α·s = 1
        alpha = float(_saved(node, "_saved_alpha") or 1.0)
        input_scale = float(_saved(node, "_saved_input_scale") or 1.0)
        return f"{name} (alpha={alpha:g})" if alpha * input_scale != 1.0 else None
    if name.startswith(_CLAMP_NODES) and _near_bound(node):
        return f"{name} (an input within {_NEAR_BOUND:.0%} of its bound)"
    return None


def check_no_kinks(nodes: Sequence[Any]) -> list[str]:
    """Refuse finite differences through kinked ops among ``nodes``.

    ``nodes``: the nodes of the loss's graph the measured parameters reach
    (:func:`~lightning_curvature.functional.operator.graph_checks.nodes_reaching`).

    Returns:
        the suspects of the graph (:func:`kink_suspects`), for the self-check's message.

    Raises:
        PiecewiseLinearError: naming the autograd nodes (``ReluBackward0``, ...) found.

    Example:
        >>> from lightning_curvature.functional.operator.graph_checks import nodes_reaching
        >>> x = torch.tensor([0.5, 1.0 + 1e-5], requires_grad=True)
        >>> check_no_kinks(nodes_reaching(x.clamp(max=1.0).sum(), [x]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_curvature.errors.PiecewiseLinearError: ... ClampBackward1 (an input within 2% ...
    """
    kinked = sorted({kink for node in nodes if (kink := _kink(node)) is not None})
    if kinked:
        raise PiecewiseLinearError(
            "backend='finite_difference' needs a smooth model: a finite difference crosses "
            "the kinks of piecewise-linear ops (and of other kinked ops), and its products then "
            f"differ from the Hessian autograd defines; the loss's graph has {', '.join(kinked)}. "
            "Use another `backend`, or smooth ops (GELU, SiLU, tanh; a clamp away from its "
            "bounds)."
        )
    return kink_suspects(nodes)


def kink_suspects(nodes: Sequence[Any]) -> list[str]:
    """The ops among ``nodes`` that are kinked where their inputs tie or cross a threshold.

    Example:
        >>> from lightning_curvature.functional.operator.graph_checks import nodes_reaching
        >>> x = torch.randn(3, 4, requires_grad=True)
        >>> kink_suspects(nodes_reaching(x.topk(2).values.sum(), [x]))
        ['TopkBackward0']
    """
    names = {type(node).__name__ for node in nodes}
    return sorted(name for name in names if any(s in name for s in _SUSPECT_NODES))
