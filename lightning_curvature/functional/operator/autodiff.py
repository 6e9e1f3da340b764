"""The one vector-Jacobian product the Hessian and Gauss–Newton products are built from.

:func:`pullback` returns one tensor per input (``torch.autograd.grad``); :func:`pullback_into`
adds the same sum into one flat buffer (``torch.autograd.backward`` accumulating into views
of it), so that a product's per-parameter pieces and their concatenated copy are never alive
together: on the 10⁷-parameter tanh MLP of ``benchmarks/bench_probe_memory.py`` (every large
tensor its own mapping, so the resident set is what is alive) a product's peak over the open
operator fell from 3.7 to 2.7 vectors of ``P`` entries. What remains is the product itself
and the pieces autograd holds until a parameter's last one arrives (a weight's piece from
the gradient's graph waits for the one from the forward's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["pullback", "pullback_into"]


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


def pullback_into(
    out: torch.Tensor,
    outputs: Sequence[torch.Tensor],
    leaves: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Add ``Σ_i (∂outputs_i/∂leaves)ᵀ cotangents_i`` into ``out``, the leaves end to end.

    ``leaves`` are autograd leaves of ``out``'s dtype and device, without ``.grad``, and
    ``out`` has as many entries as they have together. Each leaf's ``.grad`` is its slice of
    ``out`` during the backward (cleared after it, whatever happens): autograd adds a leaf's
    gradient into it in place as soon as that gradient is complete (grad mode is off in a
    backward that builds no graph) and frees it, and no concatenated copy is made. The
    numbers are :func:`pullback`'s (autograd sums a leaf's pieces before adding them to the
    zeros of ``out``: bitwise the same but for the sign of a zero). Graphs are kept.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> b = torch.tensor([0.0], requires_grad=True)
        >>> pullback_into(torch.zeros(3), [w.pow(2)], [w, b], [torch.ones(2)])
        tensor([2., 4., 0.])
        >>> w.grad is None
        True
    """
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
    if not pairs:
        return out
    pieces = torch.split(out, [leaf.numel() for leaf in leaves])
    try:
        for leaf, piece in zip(leaves, pieces, strict=True):
            leaf.grad = piece.view_as(leaf)
        torch.autograd.backward(
            [o for o, _ in pairs], [c for _, c in pairs], retain_graph=True, inputs=list(leaves)
        )
    finally:
        for leaf in leaves:
            leaf.grad = None
    return out
