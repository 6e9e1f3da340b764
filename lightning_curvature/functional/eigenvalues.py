"""``hessian_eigenvalues``: the top (and bottom) Hessian eigenvalues of a model's loss."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_curvature.checks import (
    check_budget,
    check_flag,
    check_real,
    check_tensor,
)
from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.linalg.basis import basis_layout
from lightning_curvature.functional.linalg.eigenpairs import (
    MISS_PROBABILITY,
    default_max_iter,
    lanczos_eigenpairs,
)
from lightning_curvature.functional.linalg.sharded import VectorShards
from lightning_curvature.functional.linalg.uncertified import uncertified_message
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.parameters import ParameterPatterns
from lightning_curvature.functional.model.probe import BatchNormMode
from lightning_curvature.functional.operator.backends import AllReduce, HVPBackend
from lightning_curvature.functional.operator.ggn import Curvature
from lightning_curvature.functional.operator.options import OperatorOptions, open_operator

__all__ = [
    "HessianEigenvalues",
    "check_eigenvalue_arguments",
    "hessian_eigenvalues",
]

#: The length of the random unit vector added to a warm start (of unit length). It guards
#: against a new top direction orthogonal to the old ones, but proves nothing at this size:
#: a miss probability from it would cost about a cold run's products, 29 at the edge of
#: stability (26 at 0.3), against 8 for the guard (``benchmarks/bench_warm_oracle.py``).
WARM_NOISE = 1e-3


@dataclass(frozen=True)
class HessianEigenvalues:
    """Result of :func:`hessian_eigenvalues`; tensors live on the model's device.

    Attributes:
        eigenvalues: the top-k eigenvalues, largest (algebraic) first.
        residuals: ``‖H y_i − θ_i y_i‖`` of each Ritz pair.
        converged: whether each eigenvalue is certified to ``tol`` (``θ_i`` the value,
            ``λ_i`` the i-th largest eigenvalue). Cold (no ``init``: a random start): with
            probability at least ``1 − miss_probability`` (0.999 by default) over the start,
            every converged value has
            ``θ_i ≤ λ_i ≤ θ_i + tol·|θ_i|``, whatever the Hessian (for ``i ≥ 2``: unless two
            of the top ``i`` lie within ``2·tol·|θ|`` of each other, which one Krylov space
            cannot tell apart). Warm (``init``): no probability is claimed; the residual puts
            an eigenvalue near ``θ_i``, the bound ``min(r, r²/δ)`` (``δ`` the distance to the
            other Ritz values) is below ``tol·|θ_i|`` and the Ritz value below the top k
            converged too, and that ``θ_i`` is the i-th largest rests on ``init`` having a
            fair component along the current top eigenvectors. See
            :func:`hessian_eigenvalues`.
        num_hvps: Hessian-vector products used.
        eigenvectors: ``(k, P)`` unit eigenvectors over the measured parameters (flat, in
            ``parameter_names`` order), or ``None`` if not requested.
        smallest_eigenvalue: the smallest (most negative) eigenvalue, if requested; an upper
            bound when ``smallest_converged`` is false (Ritz values interlace).
        smallest_converged: whether it passed the ``tol`` test.
        parameter_names: the measured parameters.
        warm_start: with ``return_eigenvectors``, ``(k + 1, P)``: the eigenvectors and the
            Ritz vector just below them (which a warm run's guard converged too), the best
            ``init`` for the next call on nearby weights (fewer products than the
            eigenvectors alone: 9 against 12 per probe at the edge of stability, median).
        gradient: with ``return_gradient``, the flat probe gradient ``∇L(w)`` (``(P,)``, in
            ``parameter_names`` order): with :attr:`eigenvectors`, what
            :func:`~lightning_curvature.functional.directional.subspace_share` needs.
        backend: the Hessian-vector product backend that ran (``"auto"`` resolved).
        fallback: why ``backend="auto"`` ran another backend than ``"retained_graph"``
            (empty if it did not; said once as a warning too).

    Example:
        >>> net = nn.Linear(2, 1, bias=False)  # loss ½‖Xw‖²/n with X = diag(3, 1): H = diag(9, 1)/2
        >>> X = torch.diag(torch.tensor([3.0, 1.0]))
        >>> out = hessian_eigenvalues(net, lambda m, x: 0.5 * m(x).pow(2).mean(), X, k=2)
        >>> out.eigenvalues, out.converged.tolist(), out.parameter_names
        (tensor([4.5000, 0.5000]), [True, True], ('weight',))
    """

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    num_hvps: int
    eigenvectors: torch.Tensor | None = None
    smallest_eigenvalue: torch.Tensor | None = None
    smallest_converged: bool | None = None
    parameter_names: tuple[str, ...] = ()
    warm_start: torch.Tensor | None = None
    gradient: torch.Tensor | None = None
    backend: str = ""
    fallback: str = ""


def check_eigenvalue_arguments(
    k: Any,
    tol: Any,
    max_iter: Any = None,
    min_iter: Any = 3,
    miss_probability: Any = MISS_PROBABILITY,
    **flags: Any,
) -> None:
    """Raise if an argument of :func:`hessian_eigenvalues` is out of range.

    ``flags``: the boolean arguments by name (``smallest=...``), each ``True`` or ``False``.
    The budgets (``k``, ``max_iter``, ``min_iter``) are at most
    :data:`~lightning_curvature.checks.MAX_BUDGET`.

    Raises:
        ValueError: naming the argument, what it allows and what it got.

    Example:
        >>> check_eigenvalue_arguments(2, 1e-3, max_iter=40)  # fine: returns None
        >>> check_eigenvalue_arguments(3, 1e-3, max_iter=2)
        Traceback (most recent call last):
        ...
        ValueError: `max_iter` must be an integer >= k (3) and <= 1000000, got 2.
    """
    check_budget("k", k)
    check_real("tol", tol, 0, 1, low_open=True, high_open=True)
    if max_iter is not None:  # None: the default budget
        check_budget("max_iter", max_iter, k, minimum_text=f"k ({k})")
    check_budget("min_iter", min_iter)
    for name, value in flags.items():
        check_flag(name, value)
    check_real("miss_probability", miss_probability, 0, 1, low_open=True, high_open=True)


def _start_vector(
    init: torch.Tensor | None,
    shards: VectorShards,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """A random start, or ``init``'s unit vectors summed plus a little noise (this shard)."""
    size = shards.local_size
    noise = shards.randn(generator, dtype, device)
    if init is None:
        return noise
    # Checked on every process at once: one refusing alone would leave the others waiting.
    misshapen = init.dim() not in (1, 2) or init.shape[-1] != size
    if shards.any_true(misshapen, device):
        where = " (this process's shard under sharding)" if shards.sharded else ""
        raise ValueError(
            f"`init` must have shape ({size},) or (m, {size}) over the measured parameters"
            f"{where}, got {tuple(init.shape)}."
        )
    vectors = init.to(device=device, dtype=dtype).reshape(-1, size)
    squares = shards.all_sum(vectors.double().square().sum(1, keepdim=True))
    norms = squares.sqrt().to(dtype).clamp_min(1e-30)
    start = (vectors / norms).sum(0)
    length = shards.norm(start)
    if shards.any_true(not bool(torch.isfinite(start).all()), device) or length == 0:
        raise ValueError("`init` must be finite and not zero (it starts the Lanczos basis).")
    # A little noise guards against a new top direction orthogonal to the old ones.
    unit_noise = noise.div(shards.norm(noise))
    mixed: torch.Tensor = start.div(length).add(unit_noise, alpha=WARM_NOISE)
    return mixed


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int = 1,
    tol: float = 1e-3,
    *,
    max_iter: int | None = None,
    min_iter: int = 3,
    smallest: bool = False,
    return_eigenvectors: bool = False,
    return_gradient: bool = False,
    init: torch.Tensor | None = None,
    preconditioner: torch.Tensor | None = None,
    parameters: ParameterPatterns = None,
    backend: HVPBackend = "auto",
    batch_norm: BatchNormMode = "as_is",
    generator: torch.Generator | None = None,
    all_reduce: AllReduce | None = None,
    curvature: Curvature = "hessian",
    options: OperatorOptions | None = None,
    miss_probability: float = MISS_PROBABILITY,
) -> HessianEigenvalues:
    """Top-k Hessian eigenvalues by Lanczos with full reorthogonalisation.

    The order is algebraic: on an indefinite Hessian, a large negative eigenvalue never
    displaces the largest positive one. ``converged`` is a certificate (unlike power
    iteration's "the estimate stopped changing"); with ``θ_i`` the i-th value returned and
    ``λ_i`` the Hessian's i-th largest eigenvalue, it guarantees:

    * always: ``θ_i ≤ λ_i`` (Ritz values interlace), some eigenvalue lies within the
      residual of ``θ_i``, and the error bound ``min(r, r²/δ)`` plus the rounding floor of
      the products is below ``tol·|θ_i|``;
    * cold (no ``init``: a Gaussian random start from ``generator``): with probability at
      least ``1 − miss_probability`` (``1 − 10⁻³``) over the start, every converged value has
      ``θ_i ≤ λ_i ≤ θ_i + tol·|θ_i|``, whatever the Hessian: the run goes on until a larger
      eigenvalue the start might have missed is that improbable (van Dorsselaer,
      Hochstenbach & van der Vorst 2000; :mod:`~lightning_curvature.functional.linalg.missed`).
      For ``i ≥ 2`` it assumes no two of the top ``i`` eigenvalues lie within
      ``2·tol·|θ|`` of each other (one Krylov space sees a repeated eigenvalue once). The same
      holds for ``smallest_converged``. This costs more products than a mere residual test:
      at the edge of stability (digits, λ₂/λ₁ > 0.98) a median of 28 for ``tol=1e-3``, where
      the old rule took 23 and certified λ₂ as λ₁ in a sixth of the runs
      (``benchmarks/bench_certificate.py``);
    * warm (``init``): the Ritz value below the top k converged too, which gives a larger
      eigenvalue time to appear, but no probability is claimed: that ``θ_i`` is the i-th
      largest rests on ``init`` having a fair component along the current top eigenvectors
      (the monitor's warm starts, a probe old, do: no false certificate in 84 probes of the
      same run, at a median 8 products, 11.5 where λ₂/λ₁ > 0.98). A provable warm
      certificate would cost about a cold run (29 products there): for one, leave ``init``
      out (``benchmarks/bench_warm_oracle.py``).

    Memory: below 2²⁴ basis entries (``FULL_BASIS_ENTRIES``) the run keeps its whole Krylov
    basis; above, a ``k=1`` run without eigenvectors keeps two vectors, and any other holds
    at most the rows that fit there, at least ``2(k + 1 + smallest) + 6``, restarting from its
    extreme Ritz vectors when full (``lanczos_eigenpairs``' ``rows``): the certificates above
    hold the same, for a few more products on a cold run (``benchmarks/bench_thick_restart.py``).

    Args:
        model: the module; its trainable parameters are measured.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: one batch or an iterable of batches (Hessian of the size-weighted mean loss).
        k: number of top eigenvalues.
        tol: relative error bound each must reach.
        max_iter: most Hessian-vector products (default ``40 + 10k``, 1.3x that where the
            basis is held to a few rows (see Memory above), at most ``P``: cold
            runs on ~30k-parameter GPT-2, BERT and litgpt models at init needed up to 36, 57,
            70 and 95 products for k = 1, 3, 5, 10, ``benchmarks/bench_zoo_convergence.py``).
        min_iter: fewest products before the stopping test is trusted.
        smallest: also compute the smallest (most negative) eigenvalue.
        return_eigenvectors: also return the eigenvectors.
        return_gradient: also return the probe gradient (free with the default
            ``"retained_graph"`` backend, one more gradient with the others).
        init: warm start, one vector ``(P,)`` or several ``(m, P)`` (e.g. the previous
            call's ``warm_start``); a little random noise is added.
        preconditioner: a flat vector ``D`` of entries ``>= 0``, not all zero (0 where a
            coordinate is not optimized); the eigenvalues are then those of ``D H D`` (e.g.
            Adam's preconditioned sharpness, see ``stability_threshold``).
        parameters: glob pattern(s) selecting the measured parameters (a block's Hessian).
        backend: Hessian-vector product strategy (see :class:`HessianOperator`).
        batch_norm: BatchNorm mode during the probe (running statistics never change).
        generator: random source on the model's device (default: seeded with 0).
        all_reduce: averages a tensor across processes (DDP); see :class:`HessianOperator`.
        curvature: ``"hessian"``, or ``"ggn"`` for the eigenvalues of the generalized
            Gauss–Newton matrix (``loss_fn`` an :class:`~lightning_curvature.OutputLoss`).
        options: the operator's settings (``parameters`` … ``curvature``) as one
            :class:`~lightning_curvature.functional.operator.options.OperatorOptions`, instead of
            the keywords.
        miss_probability: cold runs only: the chance the certificates may carry that the
            random start missed a larger eigenvalue (default ``1e-3``; each factor of 10
            costs about 2.5 products at the edge of stability).

    Raises:
        ValueError: on invalid arguments (named in the message).
        NonFiniteCurvatureError: if the loss or a product is not finite.
        CurvatureCheckError: if the products fail their self-check (not derivatives: a kink
            at the finite difference's step, a wrong double backward); no value is returned.

    Warns:
        CurvatureWarning: if an eigenvalue did not converge within ``max_iter`` products.

    Example:
        >>> net = nn.Linear(3, 1, bias=False)
        >>> x = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> out = hessian_eigenvalues(net, lambda m, b: m(b).pow(2).mean(), x, k=2)
        >>> out.eigenvalues  # H = 2 XᵀX / 3 = diag(2/3, 8/3, 6)
        tensor([6.0000, 2.6667])
        >>> first = hessian_eigenvalues(net, lambda m, b: m(b).pow(2).mean(), x,
        ...                             return_eigenvectors=True)
        >>> first.warm_start.shape  # the top eigenvector and the Ritz vector below it
        torch.Size([2, 3])
        >>> again = hessian_eigenvalues(net, lambda m, b: m(b).pow(2).mean(), x,
        ...                             init=first.warm_start)
        >>> again.eigenvalues.round(decimals=4), again.num_hvps
        (tensor([6.]), 3)
    """
    check_eigenvalue_arguments(
        k,
        tol,
        max_iter,
        min_iter,
        miss_probability,
        smallest=smallest,
        return_eigenvectors=return_eigenvectors,
        return_gradient=return_gradient,
    )
    check_tensor("init", init, values=False, allow_none=True)  # its values: _start_vector
    check_tensor("preconditioner", preconditioner, values=False, allow_none=True)
    settings = OperatorOptions.of(options, parameters, backend, batch_norm, curvature, all_reduce)
    with open_operator(model, loss_fn, batch, settings, generator) as (operator, generator):
        shards = operator.shards
        if k > shards.size:
            raise ValueError(
                f"`k` ({k}) exceeds the number of measured parameters ({shards.size})."
            )
        if max_iter is None:  # more products where the basis will be held to a few rows
            _, thick = basis_layout(
                shards.size, default_max_iter(k), k, smallest, return_eigenvectors
            )
            max_iter = default_max_iter(k, restarted=thick is not None)
        steps = min(max_iter, shards.size)
        matvec: Callable[[torch.Tensor], torch.Tensor] = operator.matvec
        if preconditioner is not None:
            shards.check_vector(
                "preconditioner", preconditioner, operator.device, nonnegative=True, nonzero=True
            )
            scale = preconditioner.to(device=operator.device, dtype=operator.dtype)

            def matvec(vector: torch.Tensor) -> torch.Tensor:
                return scale * operator.matvec(scale * vector)

        found = lanczos_eigenpairs(
            matvec,
            # passed, not kept: a start of P entries would outlive its use by the whole run
            _start_vector(init, shards, generator, operator.dtype, operator.device),
            k=k,
            tol=tol,
            max_iter=steps,
            min_iter=min_iter,
            smallest=smallest,
            return_eigenvectors=return_eigenvectors,
            generator=generator,
            shards=shards,
            # a random start bounds the chance of a missed eigenvalue; a warm one cannot
            miss_probability=miss_probability if init is None else None,
        )
        num_hvps = operator.num_hvps
        gradient = operator.gradient() if return_gradient else None
    # A run that spanned the whole space was not cut short by the budget.
    budget = steps if steps < shards.size else None
    message = uncertified_message(found, tol, num_hvps, budget, operator.backend)
    if message is not None:
        warnings.warn(message, CurvatureWarning, stacklevel=2)
    device, dtype = operator.device, operator.dtype

    def as_model(values: torch.Tensor) -> torch.Tensor:
        return values.to(device=device, dtype=dtype)

    return HessianEigenvalues(
        eigenvalues=as_model(found.eigenvalues),
        residuals=as_model(found.residuals),
        converged=found.converged.to(device),
        num_hvps=num_hvps,
        eigenvectors=found.eigenvectors,
        smallest_eigenvalue=None
        if found.smallest is None
        else torch.tensor(found.smallest[0], dtype=dtype, device=device),
        smallest_converged=None if found.smallest is None else found.smallest[2],
        parameter_names=operator.layout.names,
        warm_start=found.warm_start,
        gradient=gradient,
        backend=operator.backend,
        fallback=operator.fallback,
    )
