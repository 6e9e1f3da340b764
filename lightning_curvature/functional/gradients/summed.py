"""The summed gradient of a stream of losses, with every ``.grad`` left as it was.

``Σ_j ∇ loss_j`` over chosen parameters, one graph alive at a time, added in the order
``g_1 + g_2 + ...`` that ``loss_j.backward()`` calls accumulate in: SAM's first and second
gradients are taken this way, over a step's micro-batches. :func:`gradient_sum` uses
``torch.autograd.grad`` and never touches ``.grad``. :func:`backward_gradient_sum` is the
route for sharded parameters (FSDP2): autograd cannot differentiate through FSDP's hooks with
respect to the shards directly, so the gradient is taken with ``loss.backward()`` and every
``.grad`` is put back afterwards; inside a probe's agreement each backward starts with a
status collective, before FSDP's reduce-scatter (see
:mod:`~lightning_curvature.functional.distributed.agreement`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from lightning_curvature.functional.distributed.agreement import check_agreement

__all__ = ["backward_gradient_sum", "gradient_sum"]


def gradient_sum(
    parameters: Sequence[torch.Tensor], losses: Iterable[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """``Σ_j ∇ loss_j`` over ``parameters``, without touching any ``.grad``.

    ``losses`` is consumed lazily (pass a generator), so one graph is alive at a time; a
    ``None`` loss is skipped. The sum is formed in the order ``g_1 + g_2 + ...``, exactly as
    ``loss_j.backward()`` calls accumulate into zeroed ``.grad``.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> gradient_sum([w], (c * w.pow(2).sum() for c in (1.0, 2.0)))  # (1 + 2) * 2w
        [tensor([ 6., 12.])]
    """
    total: list[torch.Tensor | None] = [None for _ in parameters]
    for loss in losses:
        if loss is None:
            continue
        grads = torch.autograd.grad(loss, list(parameters), allow_unused=True)
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            current = total[i]
            total[i] = grad if current is None else current + grad  # grad may be expanded
    return total


def backward_gradient_sum(
    parameters: Sequence[torch.Tensor],
    losses: Iterable[torch.Tensor | None],
    owners: Sequence[torch.Tensor],
) -> list[torch.Tensor | None]:
    """``Σ_j ∇ loss_j`` over ``parameters`` by ``loss_j.backward()``, ``.grad`` put back.

    The route for parameters that autograd cannot differentiate with respect to directly
    (FSDP2's sharded parameters: their hooks gather, and reduce-scatter into ``.grad``).
    The ``.grad`` of every tensor of ``owners`` (all parameters the losses reach) is saved,
    cleared for the backward calls and put back after them; the sums are returned in the
    parameters' own type (``DTensor`` shards under FSDP2).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> w.grad = torch.ones(2)
        >>> backward_gradient_sum([w], (c * w.pow(2).sum() for c in (1.0, 2.0)), [w]), w.grad
        ([tensor([ 6., 12.])], tensor([1., 1.]))
    """
    saved = [p.grad for p in owners]
    try:
        for p in owners:
            p.grad = None
        for loss in losses:
            if loss is not None:
                check_agreement()  # a failure before this backward is met here, not in FSDP's
                loss.backward()  # type: ignore[no-untyped-call]
        return [p.grad for p in parameters]
    finally:
        for p, grad in zip(owners, saved, strict=True):
            p.grad = grad
