"""SAM and ASAM perturbations, applied and undone exactly (pure torch).

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
piece, a perturbation √world too long and pointing elsewhere. The second gradient is then
taken with ``loss.backward()`` (:func:`backward_gradient_sum`): autograd cannot
differentiate through FSDP's hooks with respect to the shards directly.

:func:`perturbed_parameters` applies ε in place and restores the weights from saved copies
(bit-exact; subtracting ε again would not be). :func:`sam_gradient` is the whole SAM
gradient of a model and a loss, for use without Lightning (the ``SAM`` callback does the same
inside Lightning's optimizer step).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_curvature.errors import NonFiniteCurvatureError
from lightning_curvature.functional.linalg.sharded import local_tensor
from lightning_curvature.functional.model.batches import split_batches
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.parameters import ParameterPatterns, select_parameters
from lightning_curvature.functional.model.probe import frozen_running_stats, unwrap_model

__all__ = [
    "RNGState",
    "SAMDropout",
    "SAMGradient",
    "SAMPerturbation",
    "backward_gradient_sum",
    "check_sam_arguments",
    "gradient_sum",
    "perturbed_parameters",
    "sam_gradient",
    "sam_perturbation",
]

#: What the second pass does with random draws (dropout masks, noise) of the loss:
#: ``"reuse"`` replays the first pass's draws, ``"resample"`` draws new ones.
SAMDropout = Literal["reuse", "resample"]
_DROPOUT = ("reuse", "resample")


def check_sam_arguments(rho: float, eta: float = 0.01, dropout: Any = "reuse") -> None:
    """Raise if ``rho``, ``eta`` or ``dropout`` is out of range.

    Raises:
        ValueError: if ``rho`` is not a finite number > 0, ``eta`` not a finite number >= 0,
            or ``dropout`` not ``"reuse"`` or ``"resample"``.

    Example:
        >>> check_sam_arguments(0.05, 0.01)  # fine: returns None
        >>> check_sam_arguments(0.0)
        Traceback (most recent call last):
        ...
        ValueError: `rho` must be a finite number > 0, got 0.0.
    """
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < math.inf:
        raise ValueError(f"`rho` must be a finite number > 0, got {rho!r}.")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < math.inf:
        raise ValueError(f"`eta` must be a finite number >= 0, got {eta!r}.")
    if dropout not in _DROPOUT:
        raise ValueError(f"`dropout` must be one of {_DROPOUT}, got {dropout!r}.")


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
    check_sam_arguments(rho, eta)
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
                loss.backward()  # type: ignore[no-untyped-call]
        return [p.grad for p in parameters]
    finally:
        for p, grad in zip(owners, saved, strict=True):
            p.grad = grad


@dataclass(frozen=True)
class RNGState:
    """The global RNG states a loss may draw from: torch CPU, one CUDA device, python, numpy.

    SAM's second pass replays the first pass's random draws (``dropout="reuse"``) by
    restoring the state captured before each first pass, and then puts back the state the
    first pass left, so the training run's random stream is the one it has without SAM.

    Example:
        >>> state = RNGState.capture(torch.device("cpu"))
        >>> first = torch.rand(2)
        >>> state.restore()
        >>> torch.equal(first, torch.rand(2))
        True
    """

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    cuda_device: torch.device | None
    python: Any
    numpy: Any

    @classmethod
    def capture(cls, device: torch.device) -> RNGState:
        """The current states (CUDA's only when ``device`` is a CUDA device)."""
        numpy_state = None
        with contextlib.suppress(ImportError):
            import numpy as np

            numpy_state = np.random.get_state()
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(
            cpu=torch.get_rng_state(),
            cuda=cuda,
            cuda_device=device if cuda is not None else None,
            python=random.getstate(),
            numpy=numpy_state,
        )

    def restore(self) -> None:
        """Set every captured state back."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None and self.cuda_device is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_device)
        random.setstate(self.python)
        if self.numpy is not None:
            import numpy as np

            np.random.set_state(self.numpy)


@dataclass(frozen=True)
class SAMGradient:
    """Result of :func:`sam_gradient`; tensors live on the model's device.

    Attributes:
        gradients: ``∇L(w + ε)`` for each measured parameter (``None`` if it has none).
        loss: ``L(w)``.
        perturbed_loss: ``L(w + ε)``.
        perturbation: ε and the gradient norm it was normalised by.
        curvature: ``(∇L(w + ε) − ∇L(w))·ε / ‖ε‖²``, the curvature along ε that the two
            gradients give for free (float64; see :meth:`SAMPerturbation.curvature`).
        parameter_names: the measured parameters, in the order of ``gradients``.

    Example:
        >>> net = nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(2.0)
        >>> out = sam_gradient(net, lambda m, b: 0.5 * m(b).pow(2).sum(), torch.ones(1, 1), rho=0.5)
        >>> out.gradients[0], out.loss, out.perturbed_loss, out.sharpness  # f = ½w², w + ε = 2.5
        (tensor([[2.5000]]), tensor(2.), tensor(3.1250), tensor(1.1250))
    """

    gradients: tuple[torch.Tensor | None, ...]
    loss: torch.Tensor
    perturbed_loss: torch.Tensor
    perturbation: SAMPerturbation
    parameter_names: tuple[str, ...]
    curvature: torch.Tensor

    @property
    def sharpness(self) -> torch.Tensor:
        """``L(w + ε) − L(w)``, SAM's first-order estimate of the sharpness."""
        return self.perturbed_loss - self.loss


def sam_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    rho: float = 0.05,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    parameters: ParameterPatterns = None,
    dropout: SAMDropout = "reuse",
) -> SAMGradient:
    """The SAM (or ASAM) gradient ``∇L(w + ε)`` of ``loss_fn`` at the model's weights.

    The first pass is an ordinary forward and backward (in train mode BatchNorm updates its
    running statistics once, as in a plain step); the second pass, at ``w + ε``, leaves
    them untouched. The weights are restored bit-exactly; no ``.grad`` is written.

    Args:
        model: the module (``torch.compile``/DDP wrappers are looked through).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: one batch or an iterable of batches (size-weighted mean loss).
        rho: neighbourhood radius (``> 0``).
        adaptive: ASAM instead of SAM.
        eta: ASAM's offset in ``T = |w| + η`` (``>= 0``).
        parameters: glob pattern(s) of the parameters to perturb and differentiate.
        dropout: ``"reuse"`` (default) replays the first pass's random draws (same dropout
            masks) in the second pass and leaves the global RNGs as the first pass left
            them; ``"resample"`` lets the second pass draw new ones.

    Raises:
        ValueError: on arguments out of range (named in the message).
        NonFiniteCurvatureError: if the loss or the gradient at ``w`` is not finite.

    Example:
        On ``f(w) = ½ wᵀAw`` the SAM gradient is ``A(w + ρ Aw/‖Aw‖)``:

        >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0, 8.0]))
        >>> net = nn.Linear(4, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, 0.5, 0.25, 0.125]]))  # Aw = (1, 1, 1, 1)
        >>> quadratic = lambda m, b: 0.5 * m.weight[0] @ b @ m.weight[0]
        >>> out = sam_gradient(net, quadratic, A, rho=0.25)  # ε = 0.25 (1, 1, 1, 1) / 2
        >>> out.gradients[0]
        tensor([[1.1250, 1.2500, 1.5000, 2.0000]])
        >>> out.sharpness  # f(w + ε) − f(w) = 1.5546875 − 0.9375
        tensor(0.6172)
        >>> out.curvature  # εᵀAε/‖ε‖² with ε ∝ (1, 1, 1, 1): (1 + 2 + 4 + 8) / 4
        tensor(3.7500, dtype=torch.float64)
    """
    check_sam_arguments(rho, eta, dropout)
    model = unwrap_model(model)
    named = select_parameters(model, parameters)
    params = [p for _, p in named]
    device = params[0].device
    probe = split_batches(batch, device)
    states: list[RNGState] = []
    losses: list[torch.Tensor] = []

    def first_pass() -> Iterator[torch.Tensor]:
        for item, weight in zip(probe.batches, probe.weights, strict=True):
            if dropout == "reuse":
                states.append(RNGState.capture(device))
            loss = weight * loss_fn(model, item)
            losses.append(loss.detach())
            yield loss

    with torch.enable_grad():
        grads = gradient_sum(params, first_pass())
    loss = torch.stack(losses).sum()
    perturbation = sam_perturbation(params, grads, rho, adaptive=adaptive, eta=eta)
    if not (bool(torch.isfinite(loss)) and perturbation.is_finite()):
        raise NonFiniteCurvatureError(
            f"the loss ({float(loss)}) or the gradient norm "
            f"({float(perturbation.gradient_norm)}) at w is not finite."
        )
    after_first = RNGState.capture(device)
    perturbed_losses: list[torch.Tensor] = []

    def second_pass() -> Iterator[torch.Tensor]:
        for j, (item, weight) in enumerate(zip(probe.batches, probe.weights, strict=True)):
            if dropout == "reuse":
                states[j].restore()
            loss = weight * loss_fn(model, item)
            perturbed_losses.append(loss.detach())
            yield loss

    try:
        with (
            perturbed_parameters(params, perturbation),
            frozen_running_stats(model),
            torch.enable_grad(),
        ):
            sam_grads = gradient_sum(params, second_pass())
    finally:
        if dropout == "reuse":
            after_first.restore()
    return SAMGradient(
        gradients=tuple(sam_grads),
        loss=loss,
        perturbed_loss=torch.stack(perturbed_losses).sum(),
        perturbation=perturbation,
        parameter_names=tuple(name for name, _ in named),
        curvature=perturbation.curvature(grads, sam_grads),
    )
