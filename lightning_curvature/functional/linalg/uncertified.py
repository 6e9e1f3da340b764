"""Why a Lanczos run left an estimate uncertified, in words a user can act on.

The three causes, checked in order: the products cannot resolve ``tol`` (rounding of the
dtype, or a finite difference's own error), the residual bound is still too wide, or the
estimate is not yet shown to be the extreme one (a random start's chance of having missed a
larger eigenvalue, or the guard's next Ritz value, see :mod:`.eigenpairs`).
"""

from __future__ import annotations

from lightning_curvature.functional.linalg.eigenpairs import MISS_PROBABILITY, LanczosResult

__all__ = ["uncertified_message"]

# What limits the products' resolution, and the way out, by backend (the exact ones: the
# rounding of the dtype; finite differences: their own truncation and rounding at the step,
# which float64 shrinks but an exact backend removes).
_RESOLUTION = {
    "finite_difference": (
        "the finite difference's own error, truncation and rounding at its step",
        "use an exact backend (backend='double_backward') or raise `tol`",
    ),
}
_ROUNDING = ("rounding of the dtype", "raise `tol` or measure in float64")


def _why(
    value: float,
    bound: float,
    resolution: float,
    tol: float,
    miss: float | None,
    share: float,
    cause: str,
) -> str:
    """Why one estimate is not certified; ``miss`` is its bound on a missed eigenvalue."""
    wanted = tol * abs(value)
    if resolution > wanted:
        return (
            f"tol={tol} asks for an error below {wanted:.2g}, finer than its products resolve "
            f"({resolution:.2g}: {cause})"
        )
    if bound + resolution > wanted:
        return f"error bound {bound:.2g} ({bound / max(abs(value), 1e-300):.2g} relative)"
    if miss is not None and miss > share:
        return (
            f"not yet shown to be the extreme one: the chance that the random start missed an "
            f"eigenvalue beyond it is bounded by {miss:.2g}, above the {share:.2g} allowed"
        )
    return (
        "not yet checked against eigenvalues the Krylov space may still miss (a larger "
        "estimate, the Ritz value below the top k or the block after a near-breakdown has not "
        "converged)"
    )


def uncertified_message(
    found: LanczosResult, tol: float, num_hvps: int, max_iter: int | None, backend: str = ""
) -> str | None:
    """Which estimates of a Lanczos run are not certified, and why; ``None`` if all are.

    ``max_iter`` is the budget that bounded the run (``None``: it could span the space);
    ``backend`` the one that took the products (what limits their resolution).

    Example:
        >>> import torch
        >>> from lightning_curvature.functional.linalg.eigenpairs import lanczos_eigenpairs
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> start = torch.ones(10, dtype=torch.float64)
        >>> found = lanczos_eigenpairs(lambda v: A @ v, start, k=2, max_iter=2)
        >>> print(uncertified_message(found, 1e-3, 2, 2))  # doctest: +ELLIPSIS
        Lanczos did not certify λ1, λ2 to tol=0.001 within 2 Hessian-vector products ...
    """
    assert found.bounds is not None
    assert found.resolution is not None
    cause, resolved = _RESOLUTION.get(backend, _ROUNDING)
    low = found.smallest
    total = MISS_PROBABILITY if found.miss_probability is None else found.miss_probability
    share = total / (found.converged.numel() + int(low is not None))
    failed = []
    for i, ok in enumerate(found.converged.tolist()):
        if not ok:
            miss = None if found.misses is None else float(found.misses[i])
            bound, resolution = float(found.bounds[i]), float(found.resolution[i])
            value = float(found.eigenvalues[i])
            failed.append((f"λ{i + 1}", _why(value, bound, resolution, tol, miss, share, cause)))
    if low is not None and not low.converged:
        reason = _why(low.value, low.bound, low.resolution, tol, low.miss, share, cause)
        failed.append(("λ_min", reason))
    if not failed:
        return None
    names = ", ".join(name for name, _ in failed)
    reasons = "; ".join(f"{name}: {reason}" for name, reason in failed)
    spent = max_iter is not None and num_hvps >= max_iter
    budget = f" (all of max_iter={max_iter})" if spent else ""
    advice = resolved if "resolve" in reasons else "raise `max_iter`"
    return (
        f"Lanczos did not certify {names} to tol={tol} within {num_hvps} Hessian-vector "
        f"products{budget}: {reasons}. They are returned with converged=False; {advice}."
    )
