"""Certified extreme eigenpairs from a Lanczos run, and when the run may stop.

:func:`lanczos_eigenpairs` drives a
:class:`~lightning_curvature.functional.linalg.lanczos.LanczosProcess` until the top-k Ritz
values (and the bottom one on request) are certified, in two parts:

* near an eigenvalue: the a-posteriori bound ``min(r, r²/δ)`` (Parlett 1998, §11.7; ``r`` the
  residual, ``δ`` the distance to the nearest other Ritz value less ``r``) plus the rounding
  floor of the products (``16·eps·|θ|`` plus the rounding measured along the way) is at most
  ``tol·|θ|``;
* the right one (no larger eigenvalue missed): a bound cannot see an eigenvalue the Krylov
  space has not found yet. From a random start the run goes on until the chance that it
  missed one is at most ``miss_probability``
  (:mod:`~lightning_curvature.functional.linalg.missed`); from any other start (a warm start)
  no such chance can be computed, and the Ritz value just below the top k must pass the
  first test too (relative to ``|θ₁|``), which gives a hidden eigenvalue time to appear but
  proves nothing. (A start ``u + ε·ĝ`` with a random unit ``ĝ`` would carry the random
  start's bound times ``(1 + ε)/ε``; it reaches ``10⁻³`` after about a cold run's products,
  29 against the guard's 8 on the edge-of-stability probes, ``benchmarks/bench_warm_oracle.py``:
  a warm start speeds up θ₁, not the proof that nothing lies above it.)

A budget that runs out first certifies nothing it has not checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lightning_curvature.functional.linalg.basis import basis_layout
from lightning_curvature.functional.linalg.lanczos import LanczosProcess, Matvec
from lightning_curvature.functional.linalg.missed import miss_probabilities
from lightning_curvature.functional.linalg.sharded import VectorShards

__all__ = [
    "MISS_PROBABILITY",
    "LanczosResult",
    "RitzEstimate",
    "default_max_iter",
    "lanczos_eigenpairs",
]

#: The chance a certificate from a random start may carry of a missed eigenvalue (all the
#: certificates of a run together). At the edge of stability each factor of 10 costs about
#: 2.5 products (``benchmarks/bench_certificate.py``).
MISS_PROBABILITY = 1e-3


def default_max_iter(k: int, restarted: bool = False) -> int:
    """The default budget for the top ``k``: ``40 + 10k`` products (1.3x with ``restarted``).

    Cold runs at ``tol=1e-3`` (to ``MISS_PROBABILITY``) on ~30k-parameter litgpt, GPT-2 and
    BERT models at initialisation needed up to 36, 57, 70 and 95 products for k = 1, 3, 5,
    10 (``benchmarks/bench_zoo_convergence.py``); an unused budget costs nothing. A basis
    held to a few rows (``restarted``: thick restarts) needs more: at 10⁸ parameters a cold
    λ₁ with eigenvectors took 54, a two-row one 47 (``benchmarks/bench_probe_memory.py``).

    Example:
        >>> default_max_iter(1), default_max_iter(5), default_max_iter(1, restarted=True)
        (50, 90, 65)
    """
    budget = 40 + 10 * k
    return math.ceil(1.3 * budget) if restarted else budget


class RitzEstimate(NamedTuple):
    """One extreme eigenvalue estimate: its value, residual, certificate and error bound.

    ``miss`` bounds the chance that a random start missed an eigenvalue beyond it (``None``
    from another start).
    """

    value: float
    residual: float
    converged: bool
    bound: float
    resolution: float
    miss: float | None = None


@dataclass(frozen=True)
class LanczosResult:
    """Extreme eigenpairs found by :func:`lanczos_eigenpairs` (float64, on the CPU).

    Attributes:
        eigenvalues: the top-k Ritz values, largest first.
        residuals: bounds on ``‖A y_i − θ_i y_i‖`` for each.
        converged: whether each is certified (see :func:`lanczos_eigenpairs`).
        eigenvectors: ``(k, n)`` unit Ritz vectors on the operator's device, or ``None``.
        smallest: the bottom Ritz value (:class:`RitzEstimate`), or ``None``.
        num_steps: products used.
        warm_start: with the eigenvectors, the top ``k + 1`` Ritz vectors, the best start of
            a later run.
        bounds: the absolute error bound ``min(r, r²/δ)`` of each top eigenvalue.
        resolution: the smallest error certifiable for each top eigenvalue, given the
            rounding of the products (:meth:`LanczosProcess.resolution`).
        guarded: whether the top k were checked against eigenvalues the Krylov space may
            still miss: from a random start, the chance of a miss is within
            ``miss_probability`` (``misses``); from another start, the Ritz value below
            them converged; either way the block after any (near) breakdown converged too,
            or the space was spanned.
        misses: from a random start, the bound on the chance that a larger eigenvalue was
            missed, for each top eigenvalue (:func:`~lightning_curvature.functional.linalg.
            missed.miss_probabilities`); ``None`` from another start.
        miss_probability: the chance the certificates could carry (``None``: not random).
    """

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    eigenvectors: torch.Tensor | None
    smallest: RitzEstimate | None
    num_steps: int
    warm_start: torch.Tensor | None = None
    bounds: torch.Tensor | None = None
    resolution: torch.Tensor | None = None
    guarded: bool = True
    misses: torch.Tensor | None = None
    miss_probability: float | None = None


def _absolute_bounds(values: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """A-posteriori error bound ``min(r, r²/δ)`` of every Ritz value.

    A lone Ritz value knows no gap to the rest of the spectrum: its bound is ``r``.
    """
    n = values.numel()
    if n == 1:
        return residuals.clone()
    distance = (values[:, None] - values[None, :]).abs() + torch.diag(
        torch.full((n,), float("inf"), dtype=values.dtype)
    )
    gaps = distance.min(dim=1).values - residuals
    return torch.where(gaps > 0, torch.minimum(residuals, residuals**2 / gaps), residuals)


def _next_one_converged(
    run: LanczosProcess, values: torch.Tensor, residuals: torch.Tensor, k: int, tol: float
) -> bool:
    """Whether the Ritz value just below the top k has converged too (relative to ``|θ₁|``).

    The bound of a Ritz value measures its distance to *some* eigenvalue; one the Krylov
    space has not found yet (a start vector with almost no component along it) is invisible
    to it, so θ₁ can converge to λ₂ and pass. Asking the next Ritz value to converge too
    keeps the run going long enough for a hidden larger eigenvalue to appear: on a CNN's
    Hessian this took the runs that stopped more than ``tol`` off from 11/30 cold and 10/30
    warm to 2/30 and 0/30 (``benchmarks/bench_lanczos_stopping.py``). A run that keeps
    only its last rows (``run.keep``, k = 1) checks the largest Ritz value below
    ``θ₁ − tol·|θ₁|``: a copy of a converged θ₁ (a ghost) has converged with it.
    """
    if run.spanned:
        return True
    if values.numel() <= k:
        return False  # nothing below the top k yet: nothing checked
    below = values.numel() - 1 - k
    top = float(values[-1].abs())
    if run.keep is not None:  # k = 1: a copy of θ₁ (a ghost) is not the next value
        distinct = torch.nonzero(values < values[-1] - tol * top)
        if distinct.numel() == 0:
            return False
        below = int(distinct[-1])
    reach = max(tol * top, float(run.resolution(values[below])))
    return float(_absolute_bounds(values, residuals)[below]) <= reach


def _complement_explored(
    run: LanczosProcess, values: torch.Tensor, k: int, tol: float
) -> tuple[bool, bool]:
    """Whether the blocks after a (near) breakdown rule out eigenvalues missing from ``T``.

    Returns the answer for the top k and for the smallest eigenvalue.

    A Krylov space that became invariant holds one copy of each eigenvalue it saw: a second
    copy of a repeated eigenvalue, or anything the start vector missed, lives in the
    orthogonal complement, which the next block explores from a fresh vector. That block
    must have converged its largest (and, with ``smallest``, its smallest) Ritz value; a
    restarted block that itself ran out saw every distinct eigenvalue of the complement once,
    and only if its largest one belongs in the top k can further copies of it still matter.
    """
    starts = run.block_starts
    if len(starts) == 1 or run.spanned:
        return True, True
    t = run.projection()
    kth = float(values[max(values.numel() - k, 0)])
    if run.order == starts[-1]:  # a block just ended and the next has no product yet
        if len(starts) == 2:
            return False, False
        block = torch.linalg.eigvalsh(t[starts[-2] : starts[-1], starts[-2] : starts[-1]])
        margin = max(tol * abs(kth), float(run.resolution(block[-1])))
        ran_out = float(block[-1]) <= kth + margin
        return ran_out, ran_out
    block_values, block_vectors = torch.linalg.eigh(t[starts[-1] :, starts[-1] :])
    block_residuals = (run.residual_norm * block_vectors[-1, :]).abs()
    bounds = _absolute_bounds(block_values, block_residuals)
    floor = float(values[max(values.numel() - k, 0) :].abs().min())

    def settled(index: int) -> bool:
        reach = tol * max(abs(float(block_values[index])), floor)
        rounding = float(run.resolution(block_values[index]))
        return float(bounds[index]) <= max(reach, rounding)

    return settled(-1), settled(0)


def _not_missed(
    run: LanczosProcess,
    values: torch.Tensor,
    residuals: torch.Tensor,
    k: int,
    tol: float,
    miss_probability: float | None,
    count: int,
) -> tuple[torch.Tensor, bool, torch.Tensor | None, float | None]:
    """Which of the top k are checked against a larger eigenvalue the run may have missed.

    Returns the answer for each of the top k (largest first) and for the smallest, and the
    bounds on the chance of a miss for the top k and the smallest (``None`` without a
    random start). From a random start each of the ``count`` estimates may spend
    ``miss_probability / count`` of it, and the i-th passes only if the larger ones do (its
    bound assumes they are right).
    """
    explored, bottom_explored = _complement_explored(run, values, k, tol)
    size = min(k, values.numel())
    if miss_probability is None:
        guarded = explored and _next_one_converged(run, values, residuals, k, tol)
        return torch.full((size,), guarded), bottom_explored, None, None
    top, bottom = miss_probabilities(run, values, k, tol)
    misses = torch.tensor(top, dtype=torch.float64)
    share = miss_probability / count
    found = torch.cummin((misses <= share).long(), dim=0).values.bool() & explored
    return found, bottom_explored and bottom <= share, misses, bottom


def lanczos_eigenpairs(
    matvec: Matvec,
    start: torch.Tensor,
    *,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 30,
    min_iter: int = 3,
    smallest: bool = False,
    return_eigenvectors: bool = False,
    generator: torch.Generator | None = None,
    shards: VectorShards | None = None,
    miss_probability: float | None = None,
    bounded: bool | None = None,
    rows: int | None = None,
) -> LanczosResult:
    """Top-k (and optionally the smallest) eigenpairs of a symmetric operator.

    An estimate is ``converged`` only when certified, and what that guarantees depends on
    the start (θ_i the i-th largest Ritz value, λ_i the i-th largest eigenvalue of ``A``,
    ``n`` its order):

    * Always, whatever the start (up to the products' rounding): ``θ_i ≤ λ_i`` (Cauchy
      interlacing), some eigenvalue lies within the residual ``r_i`` of ``θ_i``, and the
      error bound ``min(r_i, r_i²/δ)`` plus the rounding floor is at most ``tol·|θ_i|``
      (``δ`` is the gap to the other *Ritz* values: a bound on the error only if no
      eigenvalue is missing in between, which is what the next two points are about).
    * From a random start (``miss_probability`` given: ``start`` a Gaussian vector drawn
      independently of ``A``): with probability at least ``1 − miss_probability`` over the
      start, *every* converged estimate has ``θ_i ≤ λ_i ≤ θ_i + tol·|θ_i|`` (the smallest:
      ``θ_min − tol·|θ_min| ≤ λ_min ≤ θ_min``), whatever ``A``. For ``i ≥ 2`` this
      assumes no two of the top ``i`` eigenvalues lie within ``2·tol·|θ|`` of each other: one
      Krylov space holds one copy of a repeated eigenvalue (a copy is found only after a
      breakdown, by the restart). The run goes on until the bound of
      :func:`~lightning_curvature.functional.linalg.missed.miss_probabilities` allows it
      (van Dorsselaer, Hochstenbach & van der Vorst 2000); exact arithmetic, the rounding
      checked by the floor above.
    * From any other start (a warm start): the Ritz value below the top k converged too, so
      a hidden larger eigenvalue had time to appear; that the estimates are the *largest*
      rests on the start having a fair component along their eigenvectors, and no
      probability is claimed (a start orthogonal to ``v₁`` never finds ``λ₁``). Measured:
      0 wrong in 84 edge-of-stability probes from the previous ``warm_start``, where it
      stops at 1.17x (median) the products a rule knowing the true λ₂ would need; a start
      along ``v₂`` finds λ₁ at λ₂/λ₁ = 0.98 in a cluster (20 of 20), but at 0.995 one in 20
      is certified on λ₂ (``tests/functional/test_warm_stop.py``).

    The run stops once every estimate is certified or can no longer be (its bound has reached
    the rounding floor and the floor alone exceeds ``tol·|θ|``: a ``tol`` finer than the
    dtype resolves is then reported as not converged), or when ``max_iter`` products are
    spent. A bound at the floor with the floor below ``tol·|θ|`` keeps the run going: one more
    product takes the bound far below the floor and certifies the value.

    Args:
        matvec: the symmetric linear map on vectors shaped like ``start``.
        start: starting vector (a warm start, or random).
        k: number of largest-algebraic eigenvalues.
        tol: relative error bound each of them must pass.
        max_iter: most products.
        min_iter: fewest products before the test is trusted.
        smallest: also converge the smallest (most negative) eigenvalue.
        return_eigenvectors: also return the Ritz vectors.
        generator: random source for restarts after breakdowns.
        shards: the vectors' split across processes (see :class:`LanczosProcess`); the
            eigenvectors and warm start returned are then this process's shards.
        miss_probability: only for a random ``start`` (Gaussian, independent of the
            operator): the chance the certificates together may carry that a larger (or,
            for the smallest, a smaller) eigenvalue was missed (e.g. :data:`MISS_PROBABILITY`).
            ``None``: the start is not random, and the guard above is used instead.
        bounded: keep only the recurrence's last two basis vectors (local
            reorthogonalisation, no restart after a breakdown; see
            :class:`LanczosProcess`); only for ``k=1``, since the copies a converged value
            gets without full reorthogonalisation would pass for the next ones. ``None``:
            where ``k=1``, no Ritz vector is asked for and the whole basis (of the global
            vectors, so that every process decides alike) would exceed
            :data:`~lightning_curvature.functional.linalg.basis.FULL_BASIS_ENTRIES`.
        rows: hold at most this many basis vectors: when full, restart from the Ritz vectors
            of the top ``k + 1`` values (and the smallest), keeping every certificate above
            (:mod:`~lightning_curvature.functional.linalg.basis`' ``thick_restart``). ``None``:
            where the whole basis would exceed its ``FULL_BASIS_ENTRIES`` and the run is not
            ``bounded``, the rows that fit in it (at least ``2(k + 1 + smallest) + 6``);
            below, the whole basis.

    Raises:
        ValueError: if ``bounded`` is ``True`` with ``k > 1``, ``return_eigenvectors`` or
            ``rows``; if ``rows`` leaves no room
            (:class:`~lightning_curvature.functional.linalg.basis.ThickRestart`).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> out = lanczos_eigenpairs(lambda v: A @ v, torch.ones(10, dtype=torch.float64), k=2,
        ...                          tol=1e-10, max_iter=10)
        >>> out.eigenvalues.round(decimals=10), out.converged.tolist()
        (tensor([10.,  9.], dtype=torch.float64), [True, True])
        >>> starved = lanczos_eigenpairs(lambda v: A @ v, torch.ones(10, dtype=torch.float64),
        ...                              max_iter=1)
        >>> starved.converged.tolist()  # one product certifies nothing
        [False]
        >>> pair = torch.cat([torch.tensor([1.0, 0.99]), torch.linspace(0.0, 0.9, 98)]).double()
        >>> seeded = torch.Generator().manual_seed(0)
        >>> random = torch.randn(100, dtype=torch.float64, generator=seeded)
        >>> out = lanczos_eigenpairs(lambda v: pair * v, random, miss_probability=1e-3)
        >>> out.eigenvalues.round(decimals=9), out.converged.tolist(), out.misses <= 1e-3
        (tensor([1.], dtype=torch.float64), [True], tensor([True]))
    """
    # By the global size: every process must run the same algorithm.
    size = start.numel() if shards is None else shards.size
    keep, thick = basis_layout(size, max_iter, k, smallest, return_eigenvectors, bounded, rows)
    run = LanczosProcess(
        matvec, start, max_iter, generator=generator, shards=shards, keep=keep, thick=thick
    )
    del start  # the run holds its own unit start: a caller that passed its last reference frees it
    need = max(min_iter, k + 1 + int(smallest))
    while True:
        more = run.step()
        if run.num_steps < min(need, run.max_iter) and more:
            continue
        values, vectors, residuals = run.ritz()
        bounds = _absolute_bounds(values, residuals)
        floor = run.resolution(values)
        reach = tol * values.abs()
        certified = bounds + floor <= reach
        # Stopping at the floor while the floor is within reach gave up a certificate one
        # product away (float32, λ₁ ≈ 1320: bound 0.47, floor 0.92, reach 1.32).
        hopeless = (bounds <= floor) & (floor > reach)
        top = torch.arange(values.numel() - 1, max(values.numel() - 1 - k, -1), -1)
        found, bottom_found, misses, bottom_miss = _not_missed(
            run, values, residuals, k, tol, miss_probability, k + int(smallest)
        )
        converged = certified[top] & found
        bottom_done = (bool(certified[0]) and bottom_found) or bool(hopeless[0])
        done = bool((converged | hopeless[top]).all()) and (not smallest or bottom_done)
        if done or not more:
            break
    eigenvectors = warm_start = None
    if return_eigenvectors:
        # The top k and the Ritz vector below them: starting a later run from all k + 1
        # converges that one sooner too (edge-of-stability probes: 12 -> 9 HVPs, median).
        kept = torch.arange(values.numel() - 1, max(values.numel() - 2 - k, -1), -1)
        coefficients = vectors[:, kept].to(dtype=run.dtype, device=run.device)
        warm_start = run.combine(coefficients)
        eigenvectors = warm_start[:k]
    return LanczosResult(
        eigenvalues=values[top],
        residuals=residuals[top],
        converged=converged,
        eigenvectors=eigenvectors,
        smallest=RitzEstimate(
            float(values[0]),
            float(residuals[0]),
            bool(certified[0]) and bottom_found,
            float(bounds[0]),
            float(floor[0]),
            bottom_miss,
        )
        if smallest
        else None,
        num_steps=run.num_steps,
        warm_start=warm_start,
        bounds=bounds[top],
        resolution=floor[top],
        guarded=bool(found.all()),
        misses=misses,
        miss_probability=miss_probability,
    )
