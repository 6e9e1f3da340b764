"""Read the gradients of training's own backward passes as they go by, never changing them.

:class:`BackwardGradients` puts a tensor hook (``Tensor.register_hook``) on each measured
parameter for the duration of one backward pass. A leaf's hook sees the gradient *of that
backward alone*, before it is accumulated into ``.grad`` and before DDP's reducer averages
it, and the hook returns ``None``, so ``.grad``, the optimizer step and DDP see exactly what
they would without it. Each gradient is copied at once into one flat vector (later work may
reuse or average the tensor the hook saw in place), so a sample is this process's gradient
of one micro-batch's loss, as Lightning scaled it (divided by ``accumulate_grad_batches``,
multiplied by the grad scaler's scale under ``16-mixed``).

The hooks are attached in ``on_before_backward`` and removed in ``on_after_backward``, so
they see the training step's backward and nothing else (not the probes of other monitors,
which differentiate with ``torch.autograd.grad`` outside those hooks, nor SAM's second pass).

Under FSDP2 (``fully_shard``) the leaves that autograd reaches are the unsharded parameters
FSDP2 gathers for the pass, not the sharded ``DTensor`` parameters the model holds: hooks on
these never fire. :class:`ShardGradients` reads the same thing there from ``.grad`` instead:
FSDP2 reduce-scatters (averages over processes) every backward's gradient into the shards'
``.grad``, Lightning's ``ModelParallelStrategy`` skipping no synchronization on accumulation
micro-batches, so the change of this process's shard of ``.grad`` over one backward is its
shard of the gradient of that micro-batch over all processes (the mean of their micro-batch
gradients). It reads ``.grad`` only; nothing is changed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["BackwardGradients", "ShardGradients", "local_flat_grad"]


class BackwardGradients:
    """The flat gradient of each backward pass over ``parameters``, read through hooks.

    Args:
        parameters: the measured parameters (leaves that require grad), in layout order.
        dtype: dtype of the flat gradient (gradients in lower precision are promoted).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> capture = BackwardGradients([w])
        >>> capture.attach()
        >>> (3 * w).sum().backward()
        >>> capture.detach(), w.grad  # what the hook saw, and .grad as without it
        (tensor([3., 3.]), tensor([3., 3.]))
    """

    def __init__(
        self, parameters: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> None:
        self.parameters = list(parameters)
        self.dtype = dtype
        self.size = sum(p.numel() for p in self.parameters)
        self._flat: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place (between :meth:`attach` and :meth:`detach`)."""
        return self._flat is not None

    def attach(self) -> None:
        """Put the hooks in place for the next backward pass."""
        if self.attached:
            self.detach()
        device = self.parameters[0].device
        self._flat = torch.zeros(self.size, dtype=self.dtype, device=device)
        offset = 0
        for p in self.parameters:
            piece = slice(offset, offset + p.numel())
            hook = functools.partial(self._copy, piece)
            self._handles.append(p.register_hook(hook))  # type: ignore[no-untyped-call]
            offset += p.numel()

    def _copy(self, piece: slice, grad: torch.Tensor) -> None:
        assert self._flat is not None
        dense = grad.to_dense() if grad.is_sparse else grad
        # add_, not copy_: a parameter reached by several graph tasks (e.g. reentrant
        # checkpointing) gets one hook call per task, and the gradient is their sum.
        self._flat[piece].add_(dense.detach().reshape(-1).to(self.dtype))

    def detach(self) -> torch.Tensor:
        """Remove the hooks; the flat gradient of the backward pass since :meth:`attach`.

        Parameters the pass did not reach contribute zeros.

        Raises:
            RuntimeError: if :meth:`attach` was not called.
        """
        if self._flat is None:
            raise RuntimeError("BackwardGradients.detach() without attach().")
        for handle in self._handles:
            handle.remove()
        self._handles = []
        flat, self._flat = self._flat, None
        return flat


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a ``DTensor`` (FSDP2), or ``tensor`` itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def local_shards(parameters: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """This process's shard of each parameter (the parameters themselves when unsharded).

    Example:
        >>> local_shards([torch.zeros(2)])[0].shape
        torch.Size([2])
    """
    return [_local(p) for p in parameters]


def local_flat_grad(parameters: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """This process's shard of ``.grad`` of ``parameters`` as one flat vector (zeros for none).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> (2 * w).sum().backward()
        >>> local_flat_grad([w, torch.nn.Parameter(torch.ones(1))], torch.float64)
        tensor([2., 2., 0.], dtype=torch.float64)
    """
    pieces = [
        (_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p))).reshape(-1)
        for p in parameters
    ]
    return torch.cat([piece.to(dtype) for piece in pieces])


class ShardGradients:
    """The change of this process's shard of ``.grad`` over each backward pass (FSDP2).

    The reader of :class:`BackwardGradients`' interface for sharded parameters, whose
    autograd leaves are the unsharded copies FSDP2 gathers (see the module docstring). On
    plain parameters in one process it reads what :class:`BackwardGradients` reads (under
    DDP it would read the averaged gradient instead: DDP averages ``.grad`` in the backward).

    Args:
        parameters: the measured parameters (sharded ``DTensor`` or plain), in layout order.
        dtype: dtype of the flat gradient.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> (w * w).sum().backward()  # .grad before the pass that is read: [2, 4]
        >>> capture = ShardGradients([w])
        >>> capture.attach()
        >>> (3 * w).sum().backward()
        >>> capture.detach(), w.grad  # that pass's gradient, and .grad as without it
        (tensor([3., 3.]), tensor([5., 7.]))
    """

    def __init__(
        self, parameters: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> None:
        self.parameters = list(parameters)
        self.dtype = dtype
        self._before: torch.Tensor | None = None

    @property
    def attached(self) -> bool:
        """Whether a pass is being read (between :meth:`attach` and :meth:`detach`)."""
        return self._before is not None

    def attach(self) -> None:
        """Note the local ``.grad`` before the next backward pass."""
        self._before = local_flat_grad(self.parameters, self.dtype)

    def detach(self) -> torch.Tensor:
        """The local shard of the gradient of the backward pass since :meth:`attach`.

        Raises:
            RuntimeError: if :meth:`attach` was not called.
        """
        if self._before is None:
            raise RuntimeError("ShardGradients.detach() without attach().")
        before, self._before = self._before, None
        return local_flat_grad(self.parameters, self.dtype).sub_(before)
