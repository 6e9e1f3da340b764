"""The one vector-Jacobian product the Hessian and Gauss–Newton products are built from."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["batched_pullback", "pullback"]


def pullback(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """``Σ_i (∂outputs_i/∂inputs)ᵀ cotangents_i``, one tensor per input; graphs are kept.

    Outputs that do not require grad contribute nothing, inputs they do not reach get
    zeros (never ``None``).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> pullback([w.pow(2), torch.ones(2)], [w], [torch.ones(2), torch.ones(2)])
        [tensor([2., 4.])]
    """
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(t) for t in inputs]
    return list(
        torch.autograd.grad(
            [o for o, _ in pairs],
            inputs,
            [c for _, c in pairs],
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
            materialize_grads=True,
        )
    )


def batched_pullback(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """:func:`pullback` of a batch of cotangents (a leading dimension) in one backward pass.

    ``torch.autograd.grad(..., is_grads_batched=True)``: the backward is vectorised over the
    batch (``vmap``); inputs no output reaches get a batch of zeros. Graphs are kept.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> batched_pullback([w.pow(2)], [w], [torch.eye(2)])
        [tensor([[2., 0.],
                [0., 4.]])]
    """
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
    count = cotangents[0].shape[0]
    if not pairs:
        return [t.new_zeros((count, *t.shape)) for t in inputs]
    grads = torch.autograd.grad(
        [o for o, _ in pairs],
        inputs,
        [c for _, c in pairs],
        retain_graph=True,
        allow_unused=True,
        materialize_grads=True,
        is_grads_batched=True,
    )
    # an input no output reaches comes back as one unbatched zero tensor
    return [
        g if g.dim() == t.dim() + 1 else g.new_zeros((count, *t.shape))
        for g, t in zip(grads, inputs, strict=True)
    ]
