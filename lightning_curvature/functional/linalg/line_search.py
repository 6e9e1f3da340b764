"""The critical step of a line search: where a function of one step size starts to rise.

Critical sharpness (Kalra et al. 2026, "A scalable measure of loss landscape curvature",
arXiv 2601.16979) is ``2/η_c``, with ``η_c`` the smallest step size ``η`` along the
optimizer's update ``u`` at which the loss rises: ``L(w − η u) > L(w)``. This module finds
such a crossing for any predicate ``rises(η)`` and knows no model
(:mod:`~lightning_curvature.functional.critical_sharpness` gives it the loss).

**Search.** From the start ``η₀`` (the previous ``η_c``: a warm start) it steps outwards by
the factors ``q, q², q⁴, …`` (``q = 1 + growth``, the exponent doubling each time) until the
predicate changes: a bracket ``lower < η_c ≤ upper`` with ``rises(upper)`` and not
``rises(lower)``; then it bisects geometrically (``η = √(lower·upper)``) until
``upper / lower ≤ 1 + rtol``. A warm start within a factor ``q`` of the answer costs 2
evaluations to bracket and ``⌈log₂(ln q / ln(1 + rtol))⌉`` to bisect: 6 at the defaults
(``growth=0.1``, ``rtol=0.01``); a cold start a factor 100 away costs 16. The outward
search gives up ``1e12`` times away from the start (every step tried rose, or none did).

**Assumption.** One crossing: the function does not rise on ``(0, η_c]`` and does beyond
(true along a descent direction of a quadratic with positive curvature there). Where it
crosses several times, the search finds a crossing inside the first bracket it meets, which
need not be the smallest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from lightning_curvature.checks import check_integer, check_real

__all__ = ["CriticalStep", "critical_step"]

_REACH = 1e12  # how far from the start the outward search goes


@dataclass(frozen=True)
class CriticalStep:
    """Result of :func:`critical_step`.

    Attributes:
        lower: the largest step seen not to rise (0.0 if every step tried rose).
        upper: the smallest step seen to rise (``inf`` if none did).
        num_evals: evaluations of the predicate.
        converged: whether ``upper / lower ≤ 1 + rtol`` was reached within ``max_evals``.

    Example:
        >>> round(CriticalStep(0.99, 1.01, 6, True).step, 6)
        0.99995
    """

    lower: float
    upper: float
    num_evals: int
    converged: bool

    @property
    def step(self) -> float:
        """The crossing's estimate ``√(lower·upper)`` (``upper`` or ``lower`` if one is open)."""
        if self.lower == 0.0 or math.isinf(self.upper):
            return self.upper if self.lower == 0.0 else math.inf
        return math.sqrt(self.lower * self.upper)


def critical_step(
    rises: Callable[[float], bool],
    start: float,
    *,
    rtol: float = 0.01,
    growth: float = 0.1,
    max_evals: int = 30,
) -> CriticalStep:
    """Bracket and bisect the step at which ``rises`` turns true (see the module docstring).

    Args:
        rises: whether the function has risen above its start at a step size ``η > 0``.
        start: the first step tried (``> 0``), e.g. the previous critical step.
        rtol: relative width of the final bracket.
        growth: the first outward factor is ``1 + growth``.
        max_evals: most evaluations of ``rises``.

    Raises:
        ValueError: if ``start``, ``rtol`` or ``growth`` is not a positive finite number, or
            ``max_evals`` is below 2.

    Example:
        >>> found = critical_step(lambda eta: eta > 0.3, start=1.0)  # x ↦ x > 0.3
        >>> found.lower < 0.3 <= found.upper <= 1.01 * found.lower, found.num_evals
        (True, 12)
        >>> critical_step(lambda eta: eta > 0.3, start=0.29).num_evals  # warm
        6
    """
    for name, value in (("start", start), ("rtol", rtol), ("growth", growth)):
        check_real(name, value, 0, low_open=True)
    check_integer("max_evals", max_evals, 2)
    lower, upper, evals = 0.0, math.inf, 1
    if rises(start):
        upper = start
    else:
        lower = start
    factor, reach = 1.0 + growth, 1.0 + growth  # the next factor, and where it would reach
    while (lower == 0.0 or math.isinf(upper)) and evals < max_evals and reach <= _REACH:
        step = upper / factor if lower == 0.0 else lower * factor
        evals += 1
        if rises(step):
            upper = step
        else:
            lower = step
        factor *= factor
        reach *= factor
    while lower > 0.0 and lower * (1.0 + rtol) < upper < math.inf and evals < max_evals:
        step = math.sqrt(lower * upper)
        evals += 1
        if rises(step):
            upper = step
        else:
            lower = step
    converged = lower > 0.0 and upper <= lower * (1.0 + rtol) < math.inf
    return CriticalStep(lower, upper, evals, converged)
