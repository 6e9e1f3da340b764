"""The Hessian-vector product's backends: their names, which one runs, and what each allows.

:class:`~lightning_curvature.functional.operator.operator.HessianOperator` takes one of
:data:`BACKENDS` (``backend=``):

* ``"retained_graph"``: the gradient graph is built once with ``create_graph=True`` and each
  product is one backward through it. Measured on a 2-core CPU it is the cheapest (about
  1.2-2x a plain gradient) but keeps the double graph alive while the operator is open.
* ``"double_backward"``: gradient and product recomputed for every product (about 2.5-3.5x
  a gradient), memory of one double graph at a time per batch.
* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad`` (3.5-4.3x on CPU).
  It cannot run through recurrent layers or ops without forward-mode derivatives.
* ``"finite_difference"``: the central difference ``(∇L(w + εv) − ∇L(w − εv)) / 2ε`` of
  two ordinary gradients (about 2x a gradient, the memory of training): it runs wherever
  training runs, also through kernels without a second derivative (fused attention, custom
  kernels), but only through a smooth model; its error, step and limits are in
  :mod:`~lightning_curvature.functional.operator.finite_difference`.
* ``"auto"`` (default): ``"retained_graph"``; if the model has no double backward, it falls
  back to ``"forward_over_reverse"``, and if that has no forward-mode derivative either (the
  CPU flash kernel ``_scaled_dot_product_flash_attention_for_cpu`` that a model forcing
  fused attention runs has neither, nor have most fused kernels), to
  ``"finite_difference"`` for a smooth model, as it does where torch's double backward is
  wrong (``torch.nn.utils.weight_norm``). Each fallback is said once (a
  :class:`~lightning_curvature.errors.CurvatureWarning`), and :attr:`HessianOperator.backend`
  and ``HessianOperator.fallback`` (``result.backend``, ``result.fallback``) say which ran and
  why (:mod:`~lightning_curvature.functional.operator.dispatch`). Over sharded parameters
  (FSDP2), ``"finite_difference"``.

Every backend's products pass the operator's self-check
(:mod:`~lightning_curvature.functional.operator.self_check`): products that are not
derivatives raise :class:`~lightning_curvature.errors.CurvatureCheckError` instead of being
returned.

The three exact backends are in :mod:`~lightning_curvature.functional.operator.autodiff_backends`;
over sharded (FSDP2) parameters only ``"finite_difference"`` can run (:func:`sharded_backend`,
:mod:`~lightning_curvature.functional.operator.sharded_gradients`). With ``curvature="ggn"``
(:mod:`~lightning_curvature.functional.operator.ggn`) every backend but
``"finite_difference"`` runs (:func:`check_curvature`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from lightning_curvature.checks import check_callable, check_choice, check_flag, check_patterns
from lightning_curvature.functional.model.probe import BATCH_NORM_MODES
from lightning_curvature.functional.operator.ggn import CURVATURES, Curvature, OutputLoss

__all__ = [
    "BACKENDS",
    "AllReduce",
    "FallBack",
    "HVPBackend",
    "check_curvature",
    "check_settings",
    "sharded_backend",
]

HVPBackend = Literal[
    "auto", "retained_graph", "double_backward", "forward_over_reverse", "finite_difference"
]
AllReduce = Callable[[torch.Tensor], torch.Tensor]
BACKENDS = (
    "auto",
    "retained_graph",
    "double_backward",
    "forward_over_reverse",
    "finite_difference",
)


class FallBack(Exception):
    """Internal: ``backend="auto"`` found no double backward; use forward-over-reverse."""

    def __init__(self, reason: RuntimeError) -> None:
        super().__init__(str(reason))
        self.reason = reason


def check_settings(
    *,
    parameters: Any = None,
    backend: Any = "auto",
    batch_norm: Any = "as_is",
    dropout: Any = False,
    curvature: Any = "hessian",
    all_reduce: Any = None,
) -> None:
    """Refuse an operator setting of the wrong kind, naming it.

    What ``curvature`` needs of the loss and the backend is :func:`check_curvature`'s.

    Raises:
        ValueError: naming the setting, what it allows and what it got.
        TypeError: if ``all_reduce`` is not callable.

    Example:
        >>> check_settings(backend="auto", dropout="no")
        Traceback (most recent call last):
        ...
        ValueError: `dropout` must be True or False, got 'no'.
    """
    check_patterns("parameters", parameters)
    check_choice("backend", backend, BACKENDS)
    check_choice("batch_norm", batch_norm, BATCH_NORM_MODES)
    check_flag("dropout", dropout)
    check_choice("curvature", curvature, CURVATURES)
    check_callable("all_reduce", all_reduce, "all_reduce(tensor) -> tensor", allow_none=True)


def check_curvature(curvature: Any, loss_fn: Any, backend: Any = "auto") -> None:
    """Refuse a ``curvature`` the operator cannot compute with ``loss_fn`` and ``backend``.

    Raises:
        ValueError: naming the argument and what it allows.

    Example:
        >>> check_curvature("ggn", lambda model, batch: model(batch).sum())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: curvature='ggn' needs the loss split at the model's outputs: ...
    """
    check_choice("curvature", curvature, CURVATURES)
    if curvature != "ggn":
        return
    if not isinstance(loss_fn, OutputLoss):
        raise ValueError(
            "curvature='ggn' needs the loss split at the model's outputs: pass "
            "`loss_fn=OutputLoss(output_fn, loss)` with output_fn(model, batch) -> "
            f"(outputs, targets) and loss(outputs, targets) -> scalar; got loss_fn={loss_fn!r}."
        )
    if backend == "finite_difference":
        allowed = tuple(b for b in BACKENDS if b != "finite_difference")
        raise ValueError(
            f"curvature='ggn' takes `backend` in {allowed} (a finite difference of gradients "
            "is a Hessian product), got 'finite_difference'."
        )


def sharded_backend(
    backend: HVPBackend,
    curvature: Curvature,
    dtype: torch.dtype,
    parameters: Sequence[torch.Tensor],
) -> HVPBackend:
    """The backend over sharded parameters: finite differences, refusing what cannot run."""
    if curvature != "hessian":
        raise ValueError(
            f"curvature={curvature!r} is not available over sharded (FSDP2 DTensor) "
            "parameters: its Jacobian products go through torch.func, which the shards and "
            "FSDP's hooks do not allow; use curvature='hessian' (finite differences)."
        )
    if backend not in ("auto", "finite_difference"):
        raise ValueError(
            f"backend={backend!r} needs a double backward, which sharded (FSDP2 DTensor) "
            "parameters do not have; use backend='finite_difference' or 'auto' (which "
            "chooses it there)."
        )
    narrow = sorted({str(p.dtype) for p in parameters if p.dtype not in _FD_DTYPES})
    if narrow:
        raise ValueError(
            "finite-difference curvature over sharded parameters needs float32 or float64 "
            f"parameters (in {', '.join(narrow)} the difference of two gradients is mostly "
            "rounding); keep the sharded parameters in float32 (e.g. FSDP's "
            "MixedPrecisionPolicy computes in bf16 from float32 shards)."
        )
    return "finite_difference"


_FD_DTYPES = (torch.float32, torch.float64)
