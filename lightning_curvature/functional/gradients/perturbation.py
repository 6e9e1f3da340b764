"""SAM's and ASAM's perturbation ε of the weights: computed from a gradient, applied and undone.

Sharpness-aware minimisation (SAM; Foret, Kleiner, Mobahi & Neyshabur, ICLR 2021) steps
with the gradient taken at the (first-order) worst point of a ρ-ball around the weights w:

    g = ∇L(w),    ε = ρ g / ‖g‖₂,    g_SAM = ∇L(w + ε),

and the optimizer then updates w (not w + ε) with ``g_SAM``. As in the paper, ε is held
constant when differentiating (the second-order term ∂ε/∂w is dropped).

Adaptive SAM (ASAM; Kwon, Kim, Park & Choi, ICML 2021) measures the ball in the
scale-invariant coordinates T⁻¹w with the element-wise operator T = |w| + η, which gives

    ε = ρ T² g / ‖T g‖₂.

``η`` keeps zero weights perturbable. The default ``η = 0.01`` is the value of the ASAM
paper's experiments; it is used for every parameter (weights and biases alike), so ASAM is
the same formula on every tensor. ASAM's ρ is about ten times SAM's (the paper uses
0.5-2.0 where SAM uses 0.05).

Arithmetic (fixed, so that a reference written with the same formula is bit-identical):
``‖g‖ = ‖(‖g_1‖, ‖g_2‖, ...)‖`` from per-tensor norms, ``ε_i = g_i · (ρ/‖g‖)`` for SAM and
``ε_i = T_i · (T_i · g_i) · (ρ/‖T g‖)`` for ASAM; a zero gradient gives ε = 0. Both formulas
are homogeneous of degree zero in g, so gradients multiplied by a power-of-two loss scale
(AMP's ``GradScaler``) give the bit-identical ε. Gradients of low precision (fp16/bf16) are
combined in fp32 and ε is cast back to each parameter's dtype.

Sharded parameters (FSDP2): each process passes its local shards of w and g, and
``all_sum`` (a sum across processes) makes the normaliser the *global* norm
``‖g‖ = (Σ_ranks ‖g_local‖²)^½``; with a local norm each process would step ρ along its own
piece, a perturbation √world too long and pointing elsewhere.

:func:`perturbed_parameters` applies ε in place and restores the weights from saved copies
(bit-exact; subtracting ε again would not be).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lightning_curvature.checks import check_real
from lightning_curvature.functional.linalg.sharded import local_tensor

__all__ = [
    "SAMPerturbation",
    "check_perturbation_arguments",
    "perturbed_parameters",
    "sam_perturbation",
]


def check_perturbation_arguments(rho: float, eta: float = 0.01) -> None:
    """Raise if ``rho`` or ``eta`` is out of range.

    Raises:
        ValueError: if ``rho`` is not a finite number > 0 or ``eta`` not a finite number >= 0.

    Example:
        >>> check_perturbation_arguments(0.05, 0.01)  # fine: returns None
        >>> check_perturbation_arguments(0.05, -1.0)
        Traceback (most recent call last):
        ...
        ValueError: `eta` must be a finite number >= 0, got -1.0.
    """
    check_real("rho", rho, 0, low_open=True)
    check_real("eta", eta, 0)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class SAMPerturbation:
    """The perturbation ε of each parameter, from :func:`sam_perturbation`.

    Attributes:
        tensors: ε for each parameter, in its dtype; ``None`` where the gradient is ``None``.
        gradient_norm: the normaliser, ``‖g‖`` (SAM) or ``‖T g‖`` (ASAM). It is not finite
            exactly when a gradient entry is not (or the sum of squares overflows); ε must
            then not be applied.

    Example:
        >>> w = [torch.zeros(2), torch.zeros(1)]
        >>> eps = sam_perturbation(w, [torch.tensor([0.0, 6.0]), torch.tensor([8.0])], rho=1.0)
        >>> eps.tensors, eps.gradient_norm
        ((tensor([0.0000, 0.6000]), tensor([0.8000])), tensor(10.))
    """

    tensors: tuple[torch.Tensor | None, ...]
    gradient_norm: torch.Tensor
    #: Sums across processes when ``tensors`` are local shards (see the module docstring).
    all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None

    def norm(self) -> torch.Tensor:
        """``‖ε‖₂`` over all parameters (``ρ`` for SAM up to rounding, 0 for a zero gradient).

        Example:
            >>> w = torch.zeros(2, requires_grad=True)
            >>> sam_perturbation([w], [torch.tensor([3.0, 4.0])], rho=0.5).norm()
            tensor(0.5000)
        """
        norms = [
            torch.linalg.vector_norm(t, dtype=_accumulation_dtype(t.dtype))
            for t in self.tensors
            if t is not None
        ]
        if not norms:
            return torch.zeros((), dtype=self.gradient_norm.dtype, device=self.gradient_norm.device)
        return _combined_norm(norms, self.all_sum)

    def dot(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``Σ_i ⟨t_i, ε_i⟩`` in float64 (a ``None`` on either side counts as zero).

        Example:
            >>> w = torch.zeros(2, requires_grad=True)
            >>> eps = sam_perturbation([w], [torch.tensor([3.0, 4.0])], rho=5.0)
            >>> eps.dot([torch.tensor([1.0, 1.0])])  # ε = (3, 4)
            tensor(7., dtype=torch.float64)
        """
        device = self.gradient_norm.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for t, e in zip(tensors, self.tensors, strict=True):
            if t is not None and e is not None:  # (this process's piece of a DTensor gradient)
                total = total + (local_tensor(t).double() * e.double()).sum().to(device)
        return total if self.all_sum is None else self.all_sum(total)

    def curvature(
        self,
        before: Sequence[torch.Tensor | None],
        after: Sequence[torch.Tensor | None],
        scale: float = 1.0,
    ) -> torch.Tensor:
        """SAM's free curvature ``(∇L(w + ε) − ∇L(w))·ε / ‖ε‖²`` (float64; NaN if ε = 0).

        The secant slope of the gradient along ε: ``εᵀHε/‖ε‖²`` up to ``O(‖ε‖)`` (exactly
        that on a quadratic), from the two gradients SAM computes anyway. ``scale`` divides
        gradients that carry a loss scale (AMP's grad scaler).

        Args:
            before: ``∇L(w)`` per parameter (``None``: zero).
            after: ``∇L(w + ε)`` per parameter (``None``: zero).
            scale: the loss scale both gradients carry.

        Example:
            >>> w = torch.zeros(2, requires_grad=True)  # L = ½ wᵀ diag(1, 3) w at w = (1, 1)
            >>> g = torch.tensor([1.0, 3.0])
            >>> eps = sam_perturbation([w], [g], rho=1.0)
            >>> g_eps = g + torch.tensor([1.0, 3.0]) * eps.tensors[0]
            >>> eps.curvature([g], [g_eps])  # εᵀHε/‖ε‖² with ε ∝ (1, 3): (1 + 27) / 10
            tensor(2.8000, dtype=torch.float64)
        """
        squared = self.norm().double().square().to(self.gradient_norm.device)
        if float(squared) == 0.0:
            return torch.full_like(squared, math.nan)
        return (self.dot(after) - self.dot(before)) / (scale * squared)

    def is_finite(self) -> bool:
        """Whether ε may be applied (one host-device synchronisation).

        Example:
            >>> w = torch.zeros(1, requires_grad=True)
            >>> sam_perturbation([w], [torch.tensor([float("inf")])]).is_finite()
            False
        """
        return bool(torch.isfinite(self.gradient_norm))


def _common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _combined_norm(
    norms: Sequence[torch.Tensor], all_sum: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """``‖(n_1, n_2, ...)‖``, summed over the processes' shards when ``all_sum`` is given."""
    dtype = _common_dtype(norms)
    total: torch.Tensor = torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))
    if all_sum is not None:
        total = all_sum(total.square()).sqrt()
    return total


def sam_perturbation(
    parameters: Sequence[torch.Tensor],
    gradients: Sequence[torch.Tensor | None],
    rho: float = 0.05,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SAMPerturbation:
    """SAM's ``ε = ρ g/‖g‖`` or, with ``adaptive=True``, ASAM's ``ε = ρ T²g/‖Tg‖``.

    Args:
        parameters: the parameters w (read only for ASAM's ``T = |w| + η``).
        gradients: ``g``, one per parameter (``None``: not perturbed). They may carry a
            power-of-two loss scale: ε is the same.
        rho: radius of the neighbourhood (``> 0``).
        adaptive: ASAM instead of SAM.
        eta: ASAM's offset η in ``T = |w| + η`` (``>= 0``); unused by SAM.
        all_sum: with local shards of w and g (FSDP2), a sum across processes: the norm is
            then global (every process must call this at the same point).

    Returns:
        ε per parameter and the normaliser; no synchronisation with the device happens
        (except ``all_sum``'s).

    Raises:
        ValueError: on ``rho``/``eta`` out of range, or as many gradients as parameters.

    Example:
        >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
        >>> g = torch.tensor([3.0, 4.0])
        >>> sam_perturbation([w], [g], rho=0.5).tensors[0]  # 0.5 * g / 5
        tensor([0.3000, 0.4000])
        >>> # ASAM, T = |w| = (1, 2): T²g / ‖Tg‖ = (3, 16) / √73
        >>> sam_perturbation([w], [g], rho=1.0, adaptive=True, eta=0.0).tensors[0]
        tensor([0.3511, 1.8727])
    """
    check_perturbation_arguments(rho, eta)
    if len(parameters) != len(gradients):
        raise ValueError(
            f"`gradients` must hold one entry per parameter: got {len(gradients)} gradients "
            f"for {len(parameters)} parameters."
        )
    present = [(p, g) for p, g in zip(parameters, gradients, strict=True) if g is not None]
    if not present and all_sum is None:
        return SAMPerturbation(tuple(None for _ in parameters), torch.zeros(()))
    with torch.no_grad():
        directions: list[torch.Tensor] = []
        scales: list[torch.Tensor | None] = []
        for p, g in present:
            g = g.to(_accumulation_dtype(g.dtype))
            if adaptive:
                t = p.detach().to(g.dtype).abs() + eta
                directions.append(t * g)
                scales.append(t)
            else:
                directions.append(g)
                scales.append(None)
        norms = [torch.linalg.vector_norm(d) for d in directions] or [torch.zeros(())]
        gradient_norm = _combined_norm(norms, all_sum)
        factor = torch.where(gradient_norm > 0, rho / gradient_norm, 0.0)
        eps = iter(
            (d if t is None else t * d) * factor.to(d.dtype)
            for d, t in zip(directions, scales, strict=True)
        )
        tensors = tuple(
            None if g is None else next(eps).to(p.dtype)
            for p, g in zip(parameters, gradients, strict=True)
        )
    return SAMPerturbation(tensors, gradient_norm, all_sum)


@contextlib.contextmanager
def perturbed_parameters(
    parameters: Sequence[torch.Tensor], perturbation: SAMPerturbation
) -> Iterator[None]:
    """Add ε to the parameters in place; restore them bit-exactly from copies on exit.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([0.1, 0.2]))
        >>> before = w.detach().clone()
        >>> eps = sam_perturbation([w], [torch.tensor([1.0, 0.0])], rho=0.5)
        >>> with perturbed_parameters([w], eps):
        ...     w.detach()
        tensor([0.6000, 0.2000])
        >>> torch.equal(w.detach(), before)
        True
    """
    moved = [(p, e) for p, e in zip(parameters, perturbation.tensors, strict=True) if e is not None]
    saved = [p.detach().clone() for p, _ in moved]
    try:
        with torch.no_grad():
            for p, e in moved:
                p.add_(e)
        yield
    finally:
        with torch.no_grad():
            for (p, _), copy in zip(moved, saved, strict=True):
                p.copy_(copy)
