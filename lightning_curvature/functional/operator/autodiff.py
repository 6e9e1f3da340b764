"""The one vector-Jacobian product the Hessian and Gauss–Newton products are built from."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["pullback"]


def pullback(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
    batched: bool = False,
) -> list[torch.Tensor]:
    """``Σ_i (∂outputs_i/∂inputs)ᵀ cotangents_i``, one tensor per input; graphs are kept.

    Outputs that do not require grad contribute nothing, inputs they do not reach get
    zeros (never ``None``). ``batched``: the cotangents carry a leading batch dimension,
    pulled back in one vectorised backward (``is_grads_batched``), as are the results.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> pullback([w.pow(2), torch.ones(2)], [w], [torch.ones(2), torch.ones(2)])
        [tensor([2., 4.])]
        >>> pullback([w.pow(2)], [w], [torch.eye(2)], batched=True)
        [tensor([[2., 0.],
                [0., 4.]])]
    """
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
    leading = (cotangents[0].shape[0],) if batched else ()

    def zeros(like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros((*leading, *like.shape))

    if not pairs:
        return [zeros(t) for t in inputs]
    grads = torch.autograd.grad(
        [o for o, _ in pairs],
        inputs,
        [c for _, c in pairs],
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        materialize_grads=True,
        is_grads_batched=batched,
    )
    # batched, an input no output reaches comes back as one unbatched zero tensor
    return [
        g if g.dim() == t.dim() + len(leading) else zeros(t)
        for g, t in zip(grads, inputs, strict=True)
    ]
