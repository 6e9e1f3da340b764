"""The finite-difference Hessian-vector product: its step, its checks and its accuracy.

``backend="finite_difference"`` takes the central difference
``(∇L(w + εv) − ∇L(w − εv)) / 2ε`` of two ordinary gradients (about 2x a gradient, the
memory of training): it runs wherever training runs, also through kernels without a second
derivative (fused attention, custom kernels). Its error is the truncation ``O(ε²)`` plus the
rounding ``O(eps/ε)``. The step is one number along ``v`` (a central difference has no
other), bounded by every parameter tensor's own scale (``_tensor_scales``): no parameter of
a tensor moves by more than ``0.3·eps^{1/3}`` times the weights' overall scale
``max(rms(w), 0.01)``, nor, in a matrix, by more than that times ten times its own
``max(rms(w_t), 0.01)``. One step from the
rms of all weights moved a layer fed raw features by nine times its own weights where a
large-scale block set that rms (λ₁ 216 for 582, tests/functional/test_step_scales.py); the
tensor's own bound keeps it within 1.5% of its weights (λ₁ within 1e-4), and leaves the
smooth models' step as it was where their tensors have ordinary scales. On smooth models
(tanh, GELU, softmax, LayerNorm, an LSTM, transformers GPT-2, BERT, Llama, Mixtral,
litgpt) that is at most 4.3e-4 relative in float32 and 7e-10 in float64, along random
vectors and the top and bottom eigenvectors alike (Llama and Mixtral compute their RMSNorm
in float32 whatever the model's dtype: 1.5e-4 there in float64).

A kinked model's products do not converge to autograd's Hessian at all: the kinked modules
and graph ops are refused before any product
(:mod:`~lightning_curvature.functional.operator.kinks`), and every product is checked by the
operator's self-check (:mod:`~lightning_curvature.functional.operator.self_check`), which
takes the first product of a probe at half the step too (:meth:`FiniteDifferenceProducts.product`
with ``scale=0.5``). The attention kernels are the caller's (``scaled_dot_product_attention``
may run its fused kernels, as in training; the other backends need the math kernel). Its
accuracy is bounded by the dtype the model *computes* in: a forward that computes in
bfloat16 or float16 (an autocast or a cast inside it) gives products no better than about
``eps^{2/3}`` relative (2.5e-2 in bfloat16, 1e-2 in float16) whatever the step (measured on
the smooth test cases: 1-10% in bfloat16, 0.4-2.5% in float16); the backend then warns once
per operator (:class:`~lightning_curvature.errors.CurvatureWarning`) and takes its step for
that dtype.

The gradients are taken at fresh copies of the weights (never in place), or, over sharded
parameters, by :class:`~lightning_curvature.functional.operator.sharded_gradients.ShardedGradients`
at the local shards moved in place and restored exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.linalg.sharded import VectorShards
from lightning_curvature.functional.operator.graph_checks import (
    FloatingDtypes,
    check_reaches,
    nodes_reaching,
)
from lightning_curvature.functional.operator.kinks import check_no_kinks
from lightning_curvature.functional.operator.probe_loss import ProbeLoss
from lightning_curvature.functional.operator.sharded_gradients import ShardedGradients

__all__ = ["FiniteDifferenceProducts"]

# The finite-difference step: no parameter moves by more than STEP·eps^{1/3} times its
# tensor's scale, min(max(rms(w), FLOOR), OWN·max(rms(w_t), FLOOR)) for a nonzero matrix.
_STEP, _STEP_FLOOR, _OWN = 0.3, 1e-2, 10.0


def _tensor_scales(squares: Sequence[float], shapes: Sequence[torch.Size]) -> list[float]:
    """Each tensor's scale for the step, from its sum of squares and its (whole) shape.

    The weights' overall scale ``max(rms(w), 0.01)`` (the one scale of the step before
    per-tensor bounds), and for a nonzero matrix or kernel (two dimensions or more) at most
    ten times its own ``max(rms(w_t), 0.01)``. A matrix's rms follows the scale of its
    inputs (weights are sized to keep their outputs of order one), so a layer fed raw
    features has small weights and needs a small step; a bias's or a norm's gain does not
    (a zero bias moves its outputs as much as any), nor has a zero matrix a scale. The
    factor 10 keeps the step of the smooth zoo models, whose matrices (rms 0.02-0.3) would
    otherwise shrink it into the rounding (litgpt: 3e-3 instead of 2e-4 with a factor 1).

    Example:
        >>> shapes = [torch.Size([1]), torch.Size([2, 2])]  # a bias of 2, a matrix of rms 0.005
        >>> [round(s, 3) for s in _tensor_scales([4.0, 1e-4], shapes)]  # overall rms 0.894
        [0.894, 0.1]
    """
    numels = [shape.numel() for shape in shapes]
    overall = max((sum(squares) / max(sum(numels), 1)) ** 0.5, _STEP_FLOOR)
    return [
        min(overall, _OWN * max((square / numel) ** 0.5, _STEP_FLOOR))
        if len(shape) >= 2 and square > 0
        else overall
        for square, shape, numel in zip(squares, shapes, numels, strict=True)
    ]


def _finite_difference_step(dtype: torch.dtype, scale: float) -> float:
    """The largest move of any parameter of a tensor of ``scale`` in a product.

    ``0.3·eps^{1/3}·scale`` for the dtype the model computes in (``eps^{1/3}`` balances
    truncation ``O(ε²)`` and rounding ``O(eps/ε)``). It bounds the largest entry of ``εv``
    in that tensor, not the norm of ``εv``: a vector concentrated on a few parameters (as
    Lanczos vectors near a sharp direction are) moves them little. A step of
    ``eps^{1/3}·max(‖w‖, 1)`` on ``‖εv‖`` put products along the top eigenvector of a
    1,040-parameter GPT-2 37% off in float32 (8e-7 in float64); this one, 2e-4.

    Example:
        >>> round(_finite_difference_step(torch.float32, 1.0), 6)
        0.001476
    """
    return float(_STEP * torch.finfo(dtype).eps ** (1 / 3) * scale)


class FiniteDifferenceProducts:
    """``(∇L(w + εv) − ∇L(w − εv)) / 2ε`` of one operator, with its step and compute dtype.

    Args:
        dtype: the probe dtype (of the measured parameters and the vectors).
        shards: how the vectors are split across processes.
        device: where the vectors live.
        shapes: the shape of each measured parameter (whole, not this shard's).

    Attributes:
        compute_dtype: the narrowest dtype the model computes in (its step is taken for it).
        scales: each tensor's scale for the step (``_tensor_scales``), once a product has
            run while the operator is open (``None`` until then, and again once it is closed).
        suspects: the ops of the loss's graph kinked where their inputs tie or cross a
            threshold (top-k, a clamp, ...), named if the self-check fails.
    """

    def __init__(
        self,
        dtype: torch.dtype,
        shards: VectorShards,
        device: torch.device,
        shapes: Sequence[torch.Size],
    ) -> None:
        self._dtype = dtype
        self._shards = shards
        self._device = device
        self._shapes = list(shapes)
        self.compute_dtype = dtype
        self.scales: list[float] | None = None
        self.suspects: list[str] = []

    def loss(self, losses: ProbeLoss, names: Sequence[str]) -> torch.Tensor:
        """The loss at ``w``, with the model's compute dtype and kinks checked (see module doc).

        Raises:
            ValueError: if the loss reaches none of the measured parameters (``names``).
            PiecewiseLinearError: if a kinked op lies between the loss and the parameters.
        """
        with FloatingDtypes() as seen:
            loss = losses.weighted_loss(losses.leaves)
        nodes = nodes_reaching(loss, losses.leaves)
        check_reaches(nodes, names)
        self.suspects = check_no_kinks(nodes)
        self.note_compute_dtype(seen.dtypes)
        return loss.detach()

    def note_compute_dtype(self, dtypes: set[torch.dtype]) -> None:
        """Take the narrowest dtype the forward computed in for the finite-difference step.

        A bfloat16/float16 forward (a bf16 model, autocast, FSDP2's ``MixedPrecisionPolicy``)
        limits the products' accuracy: warned once per operator.
        """
        narrow = min(dtypes | {self._dtype}, key=lambda d: torch.finfo(d).bits)
        if torch.finfo(narrow).bits < torch.finfo(self._dtype).bits:
            self.compute_dtype = narrow
            accuracy = torch.finfo(narrow).eps ** (2 / 3)
            warnings.warn(
                f"backend='finite_difference': the model computes in {narrow}, so its "
                f"Hessian-vector products are no better than about {accuracy:.0e} relative "
                "(eps^(2/3), whatever the step; 1-10% measured in bfloat16): an eigenvalue "
                "`tol` below that cannot be met. Compute in "
                f"{self._dtype} for the probe, or use a double-backward `backend`.",
                CurvatureWarning,
                # The caller of HessianOperator.__enter__ or .matvec: this method is called
                # from loss() or ShardedGradients.open(), called by the operator's _prepare or
                # _forward_over_reverse_or_difference, called by __enter__ or matvec.
                stacklevel=5,
            )

    def product(
        self, vs: list[torch.Tensor], source: ProbeLoss | ShardedGradients, scale: float = 1.0
    ) -> list[torch.Tensor]:
        """``(∇L(w + εv) − ∇L(w − εv)) / 2ε``, the gradients taken by ``source``.

        At fresh copies of the weights (never in place), or (sharded) at the local shards
        moved in place and restored exactly from their saved copy. ``scale`` multiplies the
        step (the self-check takes the first product at half the step too).
        """
        if isinstance(source, ShardedGradients):
            primals = source.saved
        else:
            primals = [leaf.detach() for leaf in source.leaves]
        if self.scales is None:  # the weights do not change while the operator is open
            local = torch.stack([p.double().square().sum() for p in primals])
            squares = self._shards.all_sum(local).tolist() if primals else []
            self.scales = _tensor_scales(squares, self._shapes)
        # The largest entry of v relative to its tensor's bound (of any shard): one sync.
        ratios = [
            v.abs().max() / _finite_difference_step(self.compute_dtype, s)
            for v, s in zip(vs, self.scales, strict=True)
            if v.numel()
        ]
        largest = self._shards.max_of(ratios, self._device)
        if largest == 0.0:
            return [torch.zeros_like(v) for v in vs]
        step = scale / largest
        if isinstance(source, ShardedGradients):
            upper = source.gradient(vs, step)
            lower = source.gradient(vs, -step)
        else:  # one perturbed copy of the weights alive at a time
            upper = source.gradient_at(_moved(primals, vs, step))
            lower = source.gradient_at(_moved(primals, vs, -step))
        return [(u - d).div_(2 * step) for u, d in zip(upper, lower, strict=True)]


def _moved(primals: list[torch.Tensor], vs: list[torch.Tensor], step: float) -> list[torch.Tensor]:
    """Fresh leaves ``w + step·v`` (the weights themselves are never written)."""
    return [(p + step * v).requires_grad_(True) for p, v in zip(primals, vs, strict=True)]
