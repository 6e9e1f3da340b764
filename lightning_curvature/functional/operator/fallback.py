"""``backend="auto"``'s way down the backends, said once: which one runs, and why.

``"auto"`` runs ``"retained_graph"``; a model without a double backward makes it run
``"forward_over_reverse"``, one without a forward-mode derivative either (the fused CPU
attention kernel, most custom kernels, ``nn.Hardsigmoid``), or one whose double backward
torch computes wrong (``weight_norm``), ``"finite_difference"``. Each step changes what the
numbers cost, and the last what they can be trusted for (a smooth model only: its
self-check refuses kinks). So the step is said once, as a
:class:`~lightning_curvature.errors.CurvatureWarning` naming the backend, the reason and
how to choose it without the warning, and kept in the operator's ``fallback`` (and in the
result of every model-level function, ``result.fallback``). A monitor says it once per run
(its warnings are collected once per place that warns).
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

from lightning_curvature.errors import CurvatureWarning

__all__ = ["Fallback", "first_line"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message, with its type.

    Example:
        >>> first_line(RuntimeError(chr(10) + " no double backward " + chr(10) + "more"))
        'RuntimeError: no double backward'
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0].rstrip('.') if lines else ''}"


def _outside() -> int:
    """The ``stacklevel`` of the first caller outside this package's operator modules."""
    frame: FrameType | None = sys._getframe(2)  # the caller of Fallback.announce's caller
    level = 2
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == _HERE:
        frame, level = frame.f_back, level + 1
    return level


class Fallback:
    """The backend ``"auto"`` falls back to, and why (empty while it runs its first choice).

    Args:
        requested: the backend asked for (only ``"auto"`` falls back).

    Attributes:
        allowed: whether the backend asked for falls back (``"auto"``; on its first
            product only).
        note: ``"<backend>: <reason>"`` once fallen back, else ``""``.

    Example:
        >>> import warnings
        >>> fallback = Fallback("auto")
        >>> fallback.to("forward_over_reverse", "no double backward")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     fallback.announce()
        ...     fallback.announce()  # said once
        >>> fallback.note, len(caught)
        ('forward_over_reverse: no double backward', 1)
    """

    def __init__(self, requested: str) -> None:
        self.allowed = requested == "auto"
        self.note = ""
        self._said = False

    def to(self, backend: str, reason: str) -> None:
        """Note the fallback to ``backend`` (the last one noted is announced)."""
        self.note = f"{backend}: {reason}"

    def announce(self) -> None:
        """Warn once that ``"auto"`` fell back, naming the backend that ran and why."""
        if not self.note or self._said:
            return
        self._said = True
        backend, _, reason = self.note.partition(": ")
        checked = (
            " Its products are checked by the operator's self-check: a kink at the step's "
            "scale skips the measurement instead of returning it."
            if backend == "finite_difference"
            else ""
        )
        warnings.warn(
            f"backend='auto' runs {backend!r} for this model: {reason}.{checked} Pass "
            f"backend={backend!r} to choose it without this warning.",
            CurvatureWarning,
            stacklevel=_outside(),
        )
