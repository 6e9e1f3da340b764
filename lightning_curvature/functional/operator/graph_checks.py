"""What the loss's graph allows a Hessian-vector product, and why a product cannot run.

The checks the backends run on the model and on the loss's autograd graph, and the one
explanation of a failure:

* **kinks** (:func:`check_smooth` on the modules, :func:`check_no_kinks` on the graph): a
  finite difference crosses the kinks of piecewise-linear ops (ReLU, max-pooling, ...), so
  its products differ from the Hessian autograd defines; ``backend="finite_difference"``
  refuses them;
* **once-differentiable Functions** (:meth:`DerivativeChecks.check_graph`): a custom
  ``autograd.Function`` whose backward is ``@once_differentiable`` builds no graph, so every
  backend would silently drop the second derivative through it; refused;
* **missing derivatives** (:func:`is_missing_derivative`, :meth:`DerivativeChecks.explain`):
  the errors autograd raises for an op without a double backward or a forward-mode
  derivative, which ``backend="auto"`` falls back from and the others explain;
* **the dtypes a forward computes in** (:class:`FloatingDtypes`), which bound the accuracy
  of a finite difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_curvature.errors import PiecewiseLinearError

__all__ = [
    "DerivativeChecks",
    "FloatingDtypes",
    "check_no_kinks",
    "check_smooth",
    "is_missing_derivative",
]

_NO_SECOND_DERIVATIVE = (nn.EmbeddingBag,)  # their backward has no derivative in torch
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
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


def check_smooth(model: nn.Module) -> None:
    """Refuse finite differences through piecewise-linear modules (named in the message).

    Raises:
        ValueError: naming every piecewise-linear module (ReLU, max-pooling, ...).

    Example:
        >>> check_smooth(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))  # smooth: nothing happens
    """
    kinked = [
        f"{name or type(model).__name__!r} ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, _PIECEWISE_LINEAR)
        or (isinstance(module, nn.EmbeddingBag) and module.mode == "max")
    ]
    if kinked:
        raise ValueError(
            "backend='finite_difference' needs a smooth model: a finite difference crosses "
            "the kinks of piecewise-linear modules, and its products then differ from the "
            f"Hessian autograd defines (by several times its size); found {', '.join(kinked)}. "
            "Use another `backend`, or smooth activations (GELU, SiLU, tanh)."
        )


class _FirstOrderOnly(RuntimeError):
    """A custom ``autograd.Function`` on the path to the parameters is once differentiable."""


# Every backward decorated with torch's @once_differentiable shares this wrapper's code.
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__


def _nodes_reaching(loss: torch.Tensor, leaves: Sequence[torch.Tensor] | None) -> list[Any]:
    """The autograd nodes of ``loss``'s graph through which some of ``leaves`` is reached.

    ``leaves=None``: through which any leaf is reached (every parameter is measured). The
    walk is iterative: graphs can be deeper than Python's recursion limit.
    """
    targets = None if leaves is None else {id(leaf) for leaf in leaves}
    reaches: dict[Any, bool] = {}  # keyed by node: keeps each Python wrapper alive
    stack: list[tuple[Any, bool]] = [(loss.grad_fn, False)] if loss.grad_fn is not None else []
    while stack:
        node, children_done = stack.pop()
        children = [child for child, _ in node.next_functions if child is not None]
        if not children_done:
            if node in reaches:
                continue
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in reaches)
            continue
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        leaf = variable is not None and (targets is None or id(variable) in targets)
        reaches[node] = leaf or any(reaches.get(c, False) for c in children)
    return [node for node, reached in reaches.items() if reached]


def _check_twice_differentiable(loss: torch.Tensor, leaves: Sequence[torch.Tensor]) -> None:
    """Raise if a @once_differentiable custom Function lies between ``loss`` and ``leaves``.

    Its backward runs without building a graph, so a second backward through it does not
    fail: the gradient silently stops depending on the parameters and the Hessian terms
    through it come out as zero (forward-over-reverse loses them too). Only Functions whose
    inputs depend on a measured parameter count.
    """
    offenders: set[str] = set()
    for node in _nodes_reaching(loss, leaves):
        function = getattr(node, "_forward_cls", None)
        backward = getattr(function, "backward", None)
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE:
            offenders.add(getattr(function, "__qualname__", repr(function)))
    if offenders:
        raise _FirstOrderOnly(
            f"custom autograd.Function {', '.join(sorted(offenders))} has a @once_differentiable "
            "backward, which builds no graph: every backend would silently drop the second "
            "derivative through it. Give it a differentiable backward, or leave the "
            "parameters it depends on out with `parameters=`."
        )


# Backward nodes of piecewise-linear ops (functional F.relu, max_pool, ...; see _PIECEWISE_LINEAR).
_KINKED_NODES = ("Relu", "Threshold", "Hardtanh", "Shrink", "MaxPool", "Prelu", "Rrelu")


def check_no_kinks(loss: torch.Tensor, leaves: Sequence[torch.Tensor] | None) -> None:
    """Refuse finite differences through piecewise-linear ops the parameters reach.

    ``leaves=None``: the ops any leaf of the graph reaches.

    Raises:
        PiecewiseLinearError: naming the autograd nodes (``ReluBackward0``, ...) found.
    """
    kinked = sorted(
        {
            type(node).__name__
            for node in _nodes_reaching(loss, leaves)
            if any(kind in type(node).__name__ for kind in _KINKED_NODES)
        }
    )
    if kinked:
        raise PiecewiseLinearError(
            "backend='finite_difference' needs a smooth model: a finite difference crosses "
            "the kinks of piecewise-linear ops, and its products then differ from the "
            f"Hessian autograd defines; the loss's graph has {', '.join(kinked)}. Use another "
            "`backend`, or smooth activations (GELU, SiLU, tanh)."
        )


class FloatingDtypes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records the floating dtypes of every op's outputs (the dtypes a forward computes in)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.dtypes.add(tensor.dtype)
        return out


_MISSING_DERIVATIVE = (
    "not implemented",
    "double backward",
    "does not support",
    "must implement either the backward",  # a custom Function in a backward has none
)


def is_missing_derivative(err: RuntimeError) -> bool:
    """Whether ``err`` is autograd's report of a missing derivative (one a fallback may avoid).

    A once-differentiable Function found in the graph is not: it is wrong with every backend.
    """
    if isinstance(err, _FirstOrderOnly):  # wrong with every backend: no fallback
        return False
    return any(s in str(err) for s in _MISSING_DERIVATIVE)


class DerivativeChecks:
    """One operator's check of its graph for second derivatives, and its explanations.

    Args:
        model: the module (its modules without second derivatives are named in errors).
        parameters: the measured parameters.

    Attributes:
        earlier: the error that made ``backend="auto"`` leave ``"retained_graph"``, quoted in
            later explanations (``None`` until then).
    """

    def __init__(self, model: nn.Module, parameters: Sequence[torch.Tensor]) -> None:
        self._model = model
        self._parameters = parameters
        self._graph_checked = False
        self.earlier: RuntimeError | None = None

    def check_graph(self, loss: torch.Tensor, leaves: Sequence[torch.Tensor], backend: str) -> None:
        """Refuse once-differentiable Functions between ``loss`` and ``leaves`` (looked once).

        Raises:
            RuntimeError: explained (see :meth:`explain`) for ``backend`` (``"auto"`` builds
                the retained graph first).
        """
        if self._graph_checked:
            return
        try:
            _check_twice_differentiable(loss, leaves)
        except _FirstOrderOnly as err:
            backend = "retained_graph" if backend == "auto" else backend
            raise self.explain(err, backend) from err
        self._graph_checked = True

    def explain(self, err: RuntimeError, backend: str) -> RuntimeError:
        """``err`` as a missing second derivative of ``backend``, with its likely causes."""
        measured = {id(p) for p in self._parameters}
        suspects = [
            f"{name!r} ({type(module).__name__})"
            for name, module in self._model.named_modules()
            if isinstance(module, _NO_SECOND_DERIVATIVE)
            and any(id(p) in measured for p in module.parameters(recurse=False))
        ]
        return _explain(err, backend, suspects, self.earlier)


def _explain(
    err: RuntimeError, backend: str, suspects: list[str], earlier: RuntimeError | None
) -> RuntimeError:
    named = (
        f"Measured modules without second derivatives: {', '.join(suspects)}; leave their "
        "weights out with `parameters=` (patterns for the other parameters).\n"
        if suspects
        else ""
    )
    before = f"backend='auto' tried 'retained_graph' first: {earlier}\n" if earlier else ""
    return RuntimeError(
        f"Hessian-vector products with backend={backend!r} cannot pass through this model: {err}\n"
        f"{named}{before}Known causes: nn.EmbeddingBag (exclude its weights with "
        "`parameters=`), reentrant activation checkpointing (disable it for the probe), "
        "custom autograd.Functions or fused kernels without second derivatives. "
        "Try another `backend`."
    )
