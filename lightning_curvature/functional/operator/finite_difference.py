"""The finite-difference Hessian-vector product: its step, its checks and its accuracy.

``backend="finite_difference"`` takes the central difference
``(∇L(w + εv) − ∇L(w − εv)) / 2ε`` of two ordinary gradients (about 2x a gradient, the
memory of training): it runs wherever training runs, also through kernels without a second
derivative (fused attention, custom kernels). Its error is the truncation ``O(ε²)`` plus the
rounding ``O(eps/ε)``; the step moves no parameter by more than
``0.3·eps^{1/3}·max(rms(w), 0.01)`` (``_finite_difference_step``). On smooth models
(tanh, GELU, softmax, LayerNorm, GPT-2, BERT) that is at most 3e-4 relative in float32 and
5e-10 in float64, along random vectors and the top eigenvector alike; a piecewise-linear
model (ReLU, max-pooling) has kinks the perturbation crosses, so its products do not
converge to autograd's Hessian at all, and the backend refuses such a model
(piecewise-linear modules at construction, functional ``F.relu``/``max_pool`` found in the
loss's graph on entering; see :mod:`~lightning_curvature.functional.operator.graph_checks`).
The attention kernels are the caller's (``scaled_dot_product_attention`` may run its fused
kernels, as in training; the other backends need the math kernel). Its accuracy is bounded
by the dtype the model *computes* in: a forward that computes in bfloat16 or float16 (an
autocast or a cast inside it) gives products no better than about ``eps^{2/3}`` relative
(2.5e-2 in bfloat16, 1e-2 in float16) whatever the step (measured on the smooth test cases:
1-10% in bfloat16, 0.4-2.5% in float16); the backend then warns once per operator
(:class:`~lightning_curvature.errors.CurvatureWarning`) and takes its step for that dtype.

The gradients are taken at fresh copies of the weights (never in place), or, over sharded
parameters, by :class:`~lightning_curvature.functional.operator.sharded_gradients.ShardedGradients`
at the local shards moved in place and restored exactly.
"""

from __future__ import annotations

import warnings

import torch

from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.linalg.sharded import VectorShards
from lightning_curvature.functional.operator.graph_checks import FloatingDtypes, check_no_kinks
from lightning_curvature.functional.operator.probe_loss import ProbeLoss
from lightning_curvature.functional.operator.sharded_gradients import ShardedGradients

__all__ = ["FiniteDifferenceProducts"]

# The finite-difference step: no parameter moves by more than STEP·eps^{1/3}·max(rms(w), FLOOR).
_STEP, _STEP_FLOOR = 0.3, 1e-2


def _finite_difference_step(dtype: torch.dtype, weight_rms: float) -> float:
    """The largest move of any one parameter in a finite-difference product.

    ``0.3·eps^{1/3}·max(rms(w), 0.01)`` for the dtype the model computes in (``eps^{1/3}``
    balances truncation ``O(ε²)`` and rounding ``O(eps/ε)``). It bounds the largest entry
    of ``εv``, not its norm: a vector concentrated on a few parameters (as Lanczos vectors
    near a sharp direction are) moves them little. A step of ``eps^{1/3}·max(‖w‖, 1)`` on
    ``‖εv‖`` put products along the top eigenvector of a 1,040-parameter GPT-2 37% off in
    float32 (8e-7 in float64); this one, 3e-4 (5e-10), and at most 2e-4 (3e-10) on random
    vectors of the smooth test cases, GPT-2 and BERT.

    Example:
        >>> round(_finite_difference_step(torch.float32, 1.0), 6)
        0.001476
    """
    return float(_STEP * torch.finfo(dtype).eps ** (1 / 3) * max(weight_rms, _STEP_FLOOR))


class FiniteDifferenceProducts:
    """``(∇L(w + εv) − ∇L(w − εv)) / 2ε`` of one operator, with its step and compute dtype.

    Args:
        dtype: the probe dtype (of the measured parameters and the vectors).
        shards: how the vectors are split across processes.
        device: where the vectors live.

    Attributes:
        compute_dtype: the narrowest dtype the model computes in (its step is taken for it).
        weight_scale: ``rms(w)`` for the step, once a product has run while the operator is
            open (``None`` until then, and again once it is closed).
    """

    def __init__(self, dtype: torch.dtype, shards: VectorShards, device: torch.device) -> None:
        self._dtype = dtype
        self._shards = shards
        self._device = device
        self.compute_dtype = dtype
        self.weight_scale: float | None = None

    def loss(self, losses: ProbeLoss) -> torch.Tensor:
        """The loss at ``w``, with the model's compute dtype and kinks checked (see module doc).

        Raises:
            PiecewiseLinearError: if a piecewise-linear op lies between the loss and the
                parameters.
        """
        with FloatingDtypes() as seen:
            loss = losses.weighted_loss(losses.leaves)
        check_no_kinks(loss, losses.leaves)
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
        self, vs: list[torch.Tensor], source: ProbeLoss | ShardedGradients
    ) -> list[torch.Tensor]:
        """``(∇L(w + εv) − ∇L(w − εv)) / 2ε``, the gradients taken by ``source``.

        At fresh copies of the weights (never in place), or (sharded) at the local shards
        moved in place and restored exactly from their saved copy.
        """
        if isinstance(source, ShardedGradients):
            primals = source.saved
        else:
            primals = [leaf.detach() for leaf in source.leaves]
        # The largest entry of v (of any shard): one device sync a product.
        largest = self._shards.max_of([v.abs().max() for v in vs if v.numel()], self._device)
        if largest == 0.0:
            return [torch.zeros_like(v) for v in vs]
        if self.weight_scale is None:  # the weights do not change while the operator is open
            self.weight_scale = self._shards.norm_of(primals) / self._shards.size**0.5
        step = _finite_difference_step(self.compute_dtype, self.weight_scale) / largest
        if isinstance(source, ShardedGradients):
            upper = source.gradient(vs, step)
            lower = source.gradient(vs, -step)
        else:  # one perturbed copy of the weights alive at a time
            upper = source.gradient_at(_moved(primals, vs, step))
            lower = source.gradient_at(_moved(primals, vs, -step))
        return [u.sub_(d).div_(2 * step) for u, d in zip(upper, lower, strict=True)]


def _moved(primals: list[torch.Tensor], vs: list[torch.Tensor], step: float) -> list[torch.Tensor]:
    """Fresh leaves ``w + step·v`` (the weights themselves are never written)."""
    return [(p + step * v).requires_grad_(True) for p, v in zip(primals, vs, strict=True)]
