"""The one way a probe calls the model: a pure function of the measured parameters.

Every probe differentiates ``loss_fn(model, batch)`` with respect to *detached copies* of the
measured parameters, never the parameters themselves, so autograd does not write ``.grad``
and the weights are never touched. :class:`FunctionalModel` is the only place where that
happens; the Hessian-vector products
(:class:`~lightning_curvature.functional.operator.operator.HessianOperator`) and the gradient
samples (:class:`~lightning_curvature.functional.gradients.per_example.GradientSampler`) both
go through it.

The model is called with ``torch.func.functional_call`` on a wrapper whose ``forward(batch)``
is ``loss_fn(model, batch)``, so any loss (a ``training_step``, a loss that calls several
submodules) is a pure function of the parameters.

**One dtype policy.** The *probe dtype* is float64 when every measured parameter is float64
and float32 otherwise (curvature is never computed in bf16 or fp16). Every floating tensor
the model computes with that is narrower than the probe dtype is promoted to it: the
measured parameters, the other parameters (frozen, or left out by ``parameters=``), the
buffers and the floating tensors of the batch. Wider ones (a float64 part of a float32
model) are kept as they are. So a bf16 model measured on a subset of its weights, a frozen
bf16 base with trainable adapters (LoRA-style) and a model with bf16 buffers all run in one
arithmetic, the one the Hessian is computed in. Only promoted tensors are copied; the others
are detached aliases of the model's own storage (no data copied).

**Complex parameters are refused.** The estimators need the real symmetric Hessian of a real
loss over real coordinates; a complex parameter would have to be measured over its real and
imaginary parts, which no estimator here does, and casting it to real silently drops the
imaginary part. Leave such parameters out with ``parameters=``, or store them as real pairs
(``torch.view_as_real``). Complex buffers and frozen complex parameters (rotary embeddings)
are used as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_curvature.functional.model.batches import map_tensors

__all__ = [
    "FunctionalModel",
    "LossFn",
    "call_loss",
    "check_measurable",
    "check_scalar_loss",
    "describe",
    "probe_dtype",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def probe_dtype(measured: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype a probe computes in: float64 if every measured tensor is float64, else float32.

    Example:
        >>> bf16, fp64 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float64)
        >>> probe_dtype([bf16]), probe_dtype([fp64]), probe_dtype([bf16, fp64])
        (torch.float32, torch.float64, torch.float32)
    """
    return torch.float64 if all(t.dtype == torch.float64 for t in measured) else torch.float32


def _promoted(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor``, cast to ``dtype`` if it is floating and narrower (never narrowed)."""
    if tensor.is_floating_point() and torch.finfo(tensor.dtype).bits < torch.finfo(dtype).bits:
        return tensor.to(dtype)
    return tensor


def check_measurable(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Raise if a measured parameter is complex (see the module docstring).

    Raises:
        ValueError: naming every complex parameter among ``named``.

    Example:
        >>> check_measurable(  # doctest: +ELLIPSIS
        ...     [("w", torch.zeros(2)), ("z", torch.zeros(2, dtype=torch.cfloat))]
        ... )
        Traceback (most recent call last):
        ...
        ValueError: complex parameters cannot be measured: ['z']. ...
    """
    complex_names = [name for name, p in named if p.is_complex()]
    if complex_names:
        raise ValueError(
            f"complex parameters cannot be measured: {complex_names}. The Hessian here is over "
            "real coordinates; casting would drop the imaginary parts. Leave them out with "
            "`parameters=` (patterns for the real parameters), or store each as a real tensor "
            "of (real, imaginary) pairs (torch.view_as_real)."
        )


def check_scalar_loss(loss: Any) -> torch.Tensor:
    """``loss`` as a 0-dim tensor, or a ``ValueError`` saying what ``loss_fn`` returned.

    Example:
        >>> check_scalar_loss(torch.ones(1, 1))
        tensor(1.)
    """
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"`loss_fn` must return a scalar tensor (one element); it returned {shape}. "
            "Reduce the loss (e.g. with .mean()) inside loss_fn."
        )
    return loss.reshape(())


class _LossModule(nn.Module):
    """Makes ``loss_fn(model, batch)`` the forward of a module, for ``functional_call``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return call_loss(self.loss_fn, self.model, batch)


def call_loss(loss_fn: LossFn, model: nn.Module, batch: Any) -> torch.Tensor:
    """``loss_fn(model, batch)``; what it raises carries a note naming ``batch`` and its shapes.

    A batch of the wrong shape fails inside the user's model (``mat1 and mat2 shapes cannot
    be multiplied``); the note (Python 3.11+, printed under the message) says that it was the
    ``batch`` given to the measurement. The exception itself is raised unchanged.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> try:
        ...     call_loss(lambda m, b: m(b).sum(), net, torch.ones(4, 3))
        ... except RuntimeError as err:
        ...     notes = getattr(err, "__notes__", ["Tensor(4, 3) (Python 3.10: no notes)"])
        >>> "Tensor(4, 3)" in notes[-1]
        True
    """
    try:
        return loss_fn(model, batch)
    except Exception as err:
        note = (
            f"while computing loss_fn(model, batch) on a batch given ({describe(batch)}): "
            "check that `batch` (each of `batches`) is what the loss and the model take."
        )
        add_note = getattr(err, "add_note", None)
        if add_note is not None and note not in getattr(err, "__notes__", ()):
            add_note(note)
        raise


def describe(batch: Any) -> str:
    """A short description of ``batch``: its containers and its tensors' shapes.

    Example:
        >>> describe((torch.zeros(8, 3), {"y": torch.zeros(8)}))
        'tuple(Tensor(8, 3), dict(y=Tensor(8,)))'
    """
    if isinstance(batch, torch.Tensor):
        return f"Tensor{tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        inner = ", ".join(f"{key}={describe(value)}" for key, value in list(batch.items())[:8])
        return f"{type(batch).__name__}({inner})"
    if isinstance(batch, (list, tuple)):
        inner = ", ".join(describe(value) for value in batch[:8])
        more = ", ..." if len(batch) > 8 else ""
        return f"{type(batch).__name__}({inner}{more})"
    return type(batch).__name__


class FunctionalModel:
    """``loss_fn(model, batch)`` as a function of the measured parameters, in the probe dtype.

    See the module docstring for the dtype policy. Build it when the probe starts and drop it
    when the probe ends: it holds the promoted copies.

    Args:
        model: the (unwrapped) module.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        named: the measured ``(name, parameter)`` pairs, names as in ``named_parameters()``.

    Attributes:
        dtype: the probe dtype.
        names: the measured parameter names.
        primals: detached measured parameters in the probe dtype (aliases where no cast).

    Raises:
        ValueError: if a measured parameter is complex (naming every such parameter), or a
            name is not that parameter's name in ``model.named_parameters()``.

    Example:
        >>> from lightning_curvature.functional.model.parameters import select_parameters
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).to(torch.bfloat16)
        >>> fm = FunctionalModel(net, lambda m, b: m(b).sum(), select_parameters(net, "1.*"))
        >>> fm.dtype, [p.dtype for p in fm.primals]
        (torch.float32, [torch.float32, torch.float32])
        >>> fm.loss(fm.primals, fm.inputs(torch.ones(3, 2, dtype=torch.bfloat16))).dtype
        torch.float32
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, named: Sequence[tuple[str, torch.Tensor]]
    ) -> None:
        check_measurable(named)
        own = dict(model.named_parameters())
        unknown = [name for name, p in named if own.get(name) is not p]
        if unknown:  # functional_call would silently leave them out
            raise ValueError(
                f"`named` must pair parameters of `model` with their names in "
                f"model.named_parameters(); not so for {unknown}."
            )
        self.dtype = probe_dtype([p for _, p in named])
        self.names = tuple(name for name, _ in named)
        self.primals = tuple(_promoted(p.detach(), self.dtype) for _, p in named)
        self._module = _LossModule(model, loss_fn)
        measured = {id(p) for _, p in named}
        # Every other parameter detached (autograd tracks only the measured ones) and promoted;
        # buffers only where promoted (the others are the module's own, unchanged).
        self._fixed = {
            f"model.{name}": _promoted(p.detach(), self.dtype)
            for name, p in model.named_parameters()
            if id(p) not in measured
        }
        for name, buffer in model.named_buffers():
            promoted = _promoted(buffer, self.dtype)
            if promoted is not buffer:
                self._fixed[f"model.{name}"] = promoted

    def inputs(self, batch: Any) -> Any:
        """``batch`` as the model is fed in the probe.

        Floating tensors narrower than the probe dtype are promoted; inference tensors (a
        batch kept from a validation step) are cloned, so autograd can record them.
        """

        def usable(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.is_inference():
                tensor = tensor.clone()
            return _promoted(tensor, self.dtype)

        return map_tensors(batch, usable)

    def call(self, primals: Sequence[torch.Tensor], batch: Any) -> Any:
        """What ``loss_fn`` returns on ``batch`` (already through :meth:`inputs`) at ``primals``."""
        params = dict(self._fixed)
        params.update({f"model.{name}": p for name, p in zip(self.names, primals, strict=True)})
        return torch.func.functional_call(self._module, params, (batch,))

    def loss(self, primals: Sequence[torch.Tensor], batch: Any) -> torch.Tensor:
        """The scalar loss on ``batch`` (already through :meth:`inputs`) at ``primals``.

        Raises:
            ValueError: if ``loss_fn`` does not return a one-element tensor.
        """
        return check_scalar_loss(self.call(primals, batch))
