"""What the loss's graph allows a Hessian-vector product, and why a product cannot run.

The checks the backends run on the loss's autograd graph (one walk of it,
:func:`nodes_reaching`), and the one explanation of a failure:

* **a loss that does not reach the measured parameters** (:func:`check_reaches`): its
  Hessian over them is zero by construction, which no backend should report as a
  measurement; refused, naming them;
* **once-differentiable Functions** (:meth:`DerivativeChecks.check_graph`): a custom
  ``autograd.Function`` whose backward is ``@once_differentiable`` builds no graph, so every
  backend would silently drop the second derivative through it; refused;
* **wrong second derivatives** (:class:`WrongSecondDerivative`): ops whose double backward
  torch computes wrong (``torch.nn.utils.weight_norm``'s ``WeightNormInterfaceBackward0``:
  products 38% off, in float64 too); ``backend="auto"`` measures such a model by finite
  differences, the exact backends refuse it;
* **missing derivatives** (:func:`is_missing_derivative`, :meth:`DerivativeChecks.explain`):
  the errors autograd raises for an op without a double backward or a forward-mode
  derivative, which ``backend="auto"`` falls back from and the others explain;
* **the dtypes a forward computes in** (:class:`FloatingDtypes`), which bound the accuracy
  of the products and the self-check's tolerance.

The kinks a finite difference would cross are in
:mod:`~lightning_curvature.functional.operator.kinks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "DerivativeChecks",
    "FloatingDtypes",
    "WrongSecondDerivative",
    "check_reaches",
    "is_missing_derivative",
    "nodes_reaching",
]

_NO_SECOND_DERIVATIVE = (nn.EmbeddingBag,)  # their backward has no derivative in torch
# Backward nodes whose own backward (the double backward) torch computes wrong.
_WRONG_SECOND_DERIVATIVE = {
    "WeightNormInterfaceBackward0": "torch.nn.utils.weight_norm (its double backward in "
    "torch is wrong: products 38% off, in float64 too)",
}


class _FirstOrderOnly(RuntimeError):
    """A custom ``autograd.Function`` on the path to the parameters is once differentiable."""


class WrongSecondDerivative(RuntimeError):
    """An op on the path to the parameters whose double backward torch computes wrong.

    Attributes:
        reason: which op, and from where (without the way out).
    """

    def __init__(self, reason: str, advice: str) -> None:
        super().__init__(f"{reason}. {advice}")
        self.reason = reason


# Every backward decorated with torch's @once_differentiable shares this wrapper's code.
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__


def nodes_reaching(loss: torch.Tensor, leaves: Sequence[torch.Tensor] | None) -> list[Any]:
    """The autograd nodes of ``loss``'s graph through which some of ``leaves`` is reached.

    ``leaves=None``: through which any leaf is reached (every parameter is measured). The
    walk is iterative: graphs can be deeper than Python's recursion limit.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> [type(node).__name__ for node in nodes_reaching((w * 3).sum(), [w])]
        ['AccumulateGrad', 'MulBackward0', 'SumBackward0']
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


def check_reaches(nodes: Sequence[Any], names: Sequence[str]) -> None:
    """Refuse a loss whose graph reaches none of the measured parameters ``names``.

    ``nodes``: the nodes through which they reach it (:func:`nodes_reaching`).

    Raises:
        ValueError: naming the measured parameters.

    Example:
        >>> check_reaches([], ["head.weight"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the loss does not depend on the measured parameters (head.weight): ...
    """
    if nodes:
        return
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    raise ValueError(
        f"the loss does not depend on the measured parameters ({shown}): its Hessian over "
        "them is zero by construction, not a measurement. Check `parameters=` (the patterns "
        "must select parameters the loss uses) and that `loss_fn` returns a loss computed "
        "from the model (not detached, not under torch.no_grad)."
    )


def _check_twice_differentiable(nodes: Sequence[Any]) -> None:
    """Raise if a @once_differentiable custom Function is among ``nodes``.

    Its backward runs without building a graph, so a second backward through it does not
    fail: the gradient silently stops depending on the parameters and the Hessian terms
    through it come out as zero (forward-over-reverse loses them too). Only Functions whose
    inputs depend on a measured parameter count.
    """
    offenders: set[str] = set()
    for node in nodes:
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


def _check_second_derivatives(nodes: Sequence[Any]) -> None:
    """Raise :class:`WrongSecondDerivative` if an op with a wrong double backward is there."""
    wrong = sorted({type(n).__name__ for n in nodes} & set(_WRONG_SECOND_DERIVATIVE))
    if wrong:
        raise WrongSecondDerivative(
            f"the loss's graph has {', '.join(wrong)}, from "
            f"{'; '.join(_WRONG_SECOND_DERIVATIVE[name] for name in wrong)}",
            "Use backend='finite_difference' (first derivatives only; 'auto' chooses it "
            "here), or leave the parameters before it out with `parameters=`.",
        )


def custom_functions(nodes: Sequence[Any]) -> list[str]:
    """The custom ``autograd.Function`` classes among ``nodes``.

    Their second derivative is whatever their backward's graph gives: the first suspects
    of an asymmetric product.
    """
    found = {getattr(node, "_forward_cls", None) for node in nodes}
    return sorted(getattr(f, "__qualname__", repr(f)) for f in found if f is not None)


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

    A once-differentiable Function found in the graph is not: it is wrong with every backend;
    nor is a wrong second derivative (``"auto"`` goes to finite differences directly).
    """
    if isinstance(err, (_FirstOrderOnly, WrongSecondDerivative)):  # no forward-mode fallback
        return False
    return any(s in str(err) for s in _MISSING_DERIVATIVE)


class DerivativeChecks:
    """One operator's check of its graph for second derivatives, and its explanations.

    Args:
        model: the module (its modules without second derivatives are named in errors).
        parameters: the measured parameters.
        names: their names (a loss that reaches none of them is refused, naming them).

    Attributes:
        earlier: the error that made ``backend="auto"`` leave ``"retained_graph"``, quoted in
            later explanations (``None`` until then).
        suspects: the custom ``autograd.Function`` classes of the graph, once checked: named
            if the exact products fail their symmetry self-check.
    """

    def __init__(
        self, model: nn.Module, parameters: Sequence[torch.Tensor], names: Sequence[str]
    ) -> None:
        self._model = model
        self._parameters = parameters
        self.names = list(names)
        self._graph_checked = False
        self.earlier: RuntimeError | None = None
        self.suspects: list[str] = []

    def check_graph(self, loss: torch.Tensor, leaves: Sequence[torch.Tensor], backend: str) -> None:
        """Check the graph between ``loss`` and ``leaves`` for a double backward (looked once).

        Raises:
            ValueError: if the loss reaches none of the measured parameters.
            WrongSecondDerivative: with ``backend="auto"``, if torch's double backward of an
                op of the graph is wrong (finite differences measure it).
            RuntimeError: explained (see :meth:`explain`) for ``backend`` (``"auto"`` builds
                the retained graph first): a once-differentiable Function, or (explicit
                backends) a wrong double backward.
        """
        if self._graph_checked:
            return
        nodes = nodes_reaching(loss, leaves)
        check_reaches(nodes, self.names)
        named = "retained_graph" if backend == "auto" else backend
        try:
            _check_twice_differentiable(nodes)
            if backend != "forward_over_reverse":
                _check_second_derivatives(nodes)
        except _FirstOrderOnly as err:
            raise self.explain(err, named) from err
        except WrongSecondDerivative as err:
            if backend == "auto":
                raise
            raise self.explain(err, named) from err
        self.suspects = custom_functions(nodes)
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
        "`parameters=`), nn.Hardsigmoid (write it as (x / 6 + 0.5).clamp(0, 1), which "
        "has one), reentrant activation checkpointing (disable it for the probe), "
        "custom autograd.Functions or fused kernels without second derivatives. "
        "Try another `backend`."
    )
