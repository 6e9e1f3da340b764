"""How likely a Lanczos run from a random start is to have missed an extreme eigenvalue.

A residual bound proves that a Ritz value lies near *an* eigenvalue, never that it is the
largest: an eigenvector the start vector barely touches stays out of the Krylov space for
many steps, and θ₁ converges to λ₂ meanwhile with a small residual (at the edge of stability,
where λ₂/λ₁ > 0.98, a sixth of cold runs did so). No deterministic test can see such an
eigenvalue; a random start makes missing it improbable, and the run itself says how
improbable (van Dorsselaer, Hochstenbach & van der Vorst, "Computing probabilistic bounds for
extreme eigenvalues of symmetric matrices with the Lanczos method", SIAM J. Matrix Anal.
Appl. 22(3), 2000):

* Let ``T`` be the tridiagonal of the first ``m`` steps of the start vector ``b``'s own
  recurrence (up to the first restart), ``β₁ … β_{m−1}`` its off-diagonal, ``β_m`` the residual
  norm at step ``m`` and ``p(x) = det(x − T) = Π_j (x − θ_j)``. Then ``p(A) b = β₁⋯β_m ‖b‖
  q_{m+1}``, so every eigenpair ``(λ, v)`` of ``A`` has ``|⟨b, v⟩| |p(λ)| ≤ ‖p(A) b‖``: an
  eigenvalue in a region ``R`` where ``|p| ≥ p_R`` has ``|⟨b, v⟩|/‖b‖ ≤ β₁⋯β_m / p_R``.
* For a Gaussian ``b`` and a fixed unit ``v`` (an eigenvector of ``A``, which does not depend
  on ``b``), ``⟨b, v⟩²/‖b‖²`` has the Beta(1/2, (n−1)/2) law, whose distribution function is
  below ``√(2nx/π)`` (its density is below ``x^{-1/2}/B(1/2, (n−1)/2)``, and Gautschi's
  inequality bounds ``1/B``).
* So a rule that certifies only once ``√(2n/π) · β₁⋯β_m / p_R ≤ δ`` is wrong with
  probability at most ``δ``, whatever the operator and whichever step it stops at: a
  certificate given while an eigenvalue lies in ``R`` needs
  ``⟨b, v⟩²/‖b‖² ≤ (β₁⋯β_m / p_R)² ≤ πδ²/(2n)`` for that eigenvalue's fixed ``v``, an
  event of probability below ``δ``. (This function returns ``√(2n/π) · β₁⋯β_m / p_R``,
  capped at 1.)

After thick restarts (:class:`~lightning_curvature.functional.linalg.basis.ThickRestart`)
the same holds with ``p`` the characteristic polynomial of the current projection times the
polynomial of every Ritz value dropped, and ``β₁⋯β_m`` the product of all the run's
normalisations (checked to 1e-9 against ``p(A) b`` computed directly,
``tests/functional/test_lanczos_thick.py``): the dropped values lie below the kept top ones
(and above the kept bottom ones), so they change no region below.

For the top eigenvalue ``R = [θ₁ + tol|θ₁|, ∞)``, where ``|p|`` increases, so ``p_R`` is
``|p|`` at its end. For the i-th, ``R = [θ_i + tol|θ_i|, ∞)`` less a window of half-width
``tol|θ_l|`` around each larger Ritz value ``θ_l``: a single Krylov space holds one vector per
distinct eigenvalue, so a second copy of one (or one closer than that) is never seen, and the
bound cannot exclude it. The smallest mirrors the largest. The bound holds in exact
arithmetic; the products' rounding moves eigenvalues by at most the run's resolution, which
the certificate checks apart. It needs a random start: from a warm start (``init``) the
component along a new top eigenvector need not be random at all.
"""

from __future__ import annotations

import math

import torch

from lightning_curvature.functional.linalg.lanczos import LanczosProcess

__all__ = ["miss_probabilities"]


def _first_block(run: LanczosProcess) -> tuple[torch.Tensor, float]:
    """The roots of the start vector's polynomial ``p`` and ``log(‖p(A) b‖/‖b‖)``.

    A restart after a breakdown begins a recurrence from another vector; the bound is the
    first one's: ``p`` the characteristic polynomial of its ``T``, ``‖p(A) b‖/‖b‖ = β₁⋯β_m``.
    After thick restarts (no breakdown restart then) ``p = det(x − T) · ψ(x)``, ``ψ`` the
    polynomial of the dropped Ritz values, and ``‖p(A) b‖/‖b‖`` is still the product of
    every normalisation of the run and the last residual: the kept space is the Krylov space
    of ``ψ(A) b``, whose own normalisations multiply onto those before the restart (an
    induction on the restarts, by the identity ``s_{1,i} s_{m,i} ∏_{l≠i} (θ_i − θ_l) =
    β₁⋯β_{m−1}`` of the first and last components of ``T``'s eigenvectors).
    """
    if run.restarts:
        row, residual = run.restarts[0]
        end = row + 1
        roots = torch.linalg.eigvalsh(run.projection()[:end, :end])
        betas = [*run.betas[: end - 1], residual]
        if min(betas) <= 0.0:  # an invariant subspace: nothing outside it is touched by b
            return roots, -math.inf
        return roots, sum(math.log(beta) for beta in betas)
    ritz_values = torch.linalg.eigvalsh(run.projection())
    dropped_values = torch.tensor(run.dropped, dtype=ritz_values.dtype)
    return torch.cat([ritz_values, dropped_values]), run.log_norm()


def _log_abs(roots: torch.Tensor, points: list[float]) -> float:
    """The smallest ``log |p(x)|`` over ``points``, ``p`` the monic polynomial of ``roots``."""
    x = torch.tensor(points, dtype=torch.float64)
    logs = torch.log((x[:, None] - roots[None, :]).abs()).sum(dim=1)
    return float(logs.min())


def miss_probabilities(
    run: LanczosProcess, values: torch.Tensor, k: int, tol: float
) -> tuple[list[float], float]:
    """Bounds on the chance that a random start left an eigenvalue past each extreme Ritz value.

    Args:
        run: a Lanczos process started from a Gaussian vector drawn independently of the
            operator.
        values: its Ritz values, ascending (:meth:`LanczosProcess.ritz`).
        k: how many of the largest to bound.
        tol: the relative distance beyond each Ritz value that counts as a miss.

    Returns:
        For each of the top ``k`` Ritz values (largest first), a bound on the probability
        that the run is here with an eigenvalue above ``θ_i + tol|θ_i|`` other than a (near)
        copy of a larger one (within ``tol|θ_l|`` of a larger Ritz value ``θ_l``); and the
        same bound for an eigenvalue below ``θ_min − tol|θ_min|``. Each is ``√(2n/π)``
        times ``β₁⋯β_m`` over the smallest ``|p|`` in that region (see the module docstring).

    Example:
        >>> spectrum = torch.cat([torch.tensor([1.0, 0.98]), torch.linspace(0.0, 0.5, 98)])
        >>> start = torch.randn(100, generator=torch.Generator().manual_seed(0))
        >>> for steps in (3, 15):
        ...     run = LanczosProcess(lambda v: spectrum * v, start.double(), steps)
        ...     while run.step():
        ...         pass
        ...     top, bottom = miss_probabilities(run, run.ritz()[0], 1, 1e-3)
        ...     print(f"{steps} steps: θ₁ = {run.ritz()[0][-1]:.4f}, P(missed) <= {top[0]:.1g}")
        3 steps: θ₁ = 0.9701, P(missed) <= 1
        15 steps: θ₁ = 1.0000, P(missed) <= 2e-05
    """
    roots, log_norm = _first_block(run)
    scale = math.log(math.sqrt(2.0 * run.size / math.pi))
    largest = values.flip(0)[:k].tolist()
    bounds = []
    for i, theta in enumerate(largest):
        start = theta + tol * abs(theta)
        windows = [(t - tol * abs(t), t + tol * abs(t)) for t in largest[:i]]
        edges = [start] + [edge for window in windows for edge in window]
        # |p| rises from each window's edge and past the last root: its least is at an edge
        points = [x for x in edges if x >= start and not any(a < x < b for a, b in windows)]
        bounds.append(math.exp(min(scale + log_norm - _log_abs(roots, points), 0.0)))
    low = float(values[0])
    bottom = math.exp(min(scale + log_norm - _log_abs(roots, [low - tol * abs(low)]), 0.0))
    return bounds, bottom
