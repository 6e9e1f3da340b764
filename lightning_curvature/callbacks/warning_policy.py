"""Quiet on bad luck: one warning per kind of bad luck of a monitor, naming it and the step.

A probe that cannot run (a ``training_step`` returning ``None``, a non-finite loss or
product, any exception on any rank) is skipped, and values that are not finite are left out;
each kind is said once per monitor, on rank zero, as a
:class:`~lightning_curvature.errors.CurvatureWarning`. The warnings raised during a probe
are collected and said once it is over, one per place that warns.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_curvature.callbacks.isolation import RETURNED_NONE
from lightning_curvature.errors import (
    CurvatureCheckError,
    CurvatureWarning,
    NonFiniteCurvatureError,
    PiecewiseLinearError,
    ProbeFailure,
)

__all__ = ["WarningPolicy"]


class WarningPolicy:
    """The warnings of one monitor: each kind once, on rank zero.

    Args:
        owner: the monitor's class name, which starts every message.

    Example:
        >>> policy = WarningPolicy("MyMonitor")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     kept = [policy.finite({"a": 1.0, "b": float("nan")}, step) for step in (3, 4)]
        >>> kept[-1], [str(w.message) for w in caught]
        ({'a': 1.0}, ['MyMonitor: left the non-finite value(s) of b out at step 3.'])
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        #: What follows a probe skipped because ``training_step`` returned ``None`` (said
        #: after the reason, e.g. that another fixed probe batch is drawn).
        self.none_note = ""
        self._warned: set[str] = set()
        self._pending: list[str] | None = None  # warn_once's messages during a probe

    def warn_once(self, key: str, message: str) -> None:
        """One :class:`CurvatureWarning` per ``key``, on rank zero (after the probe, in one)."""
        if key not in self._warned:
            self._warned.add(key)
            text = f"{self.owner}: {message}"
            if self._pending is not None:  # inside a probe, whose warnings are being collected
                self._pending.append(text)
            else:
                rank_zero_warn(text, category=CurvatureWarning)

    @contextlib.contextmanager
    def collected(self, step: int) -> Iterator[None]:
        """Collect the warnings raised inside, and say them on exit, once per kind.

        A ``CurvatureWarning`` is said once per place that warns (e.g. Lanczos not
        converging), naming ``step``; other warnings are raised again as they were; then
        the messages :meth:`warn_once` was given inside. On an exception none is said.
        """
        self._pending = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CurvatureWarning)
                yield
        finally:
            pending, self._pending = self._pending, None
        for record in caught:
            if issubclass(record.category, CurvatureWarning):
                # One warning per place that warns, not one per category: every
                # CurvatureWarning shares the category.
                key = f"{record.filename}:{record.lineno}"
                self.warn_once(key, f"at step {step}: {record.message}")
            else:
                warnings.warn_explicit(
                    record.message, record.category, record.filename, record.lineno
                )
        for text in pending:  # warn_once calls made inside, already deduplicated
            rank_zero_warn(text, category=CurvatureWarning)

    def skipped(
        self,
        step: int,
        failure: ProbeFailure,
        what: str = "the probe",
        then: str = "training goes on",
    ) -> None:
        """One warning per kind of failure that skipped ``what`` (agreed by every rank).

        It names the step and what failed (on several processes, the rank). Non-finite
        losses or products are one kind, whatever their values, and so are products that
        fail their self-check (:class:`CurvatureCheckError`); any other failure is a kind of
        its own per rank, class and message.

        Example:
            >>> policy = WarningPolicy("SAM")
            >>> with warnings.catch_warnings(record=True) as caught:
            ...     warnings.simplefilter("always")
            ...     failure = ProbeFailure({1: "MemoryError: out of memory"}, world_size=2)
            ...     policy.skipped(3, failure, "its pass", "plain step")
            >>> print(caught[0].message)
            SAM: skipped its pass at step 3 (rank 1 raised MemoryError: out of memory); plain step.
        """
        why = failure.describe().strip().rstrip(".")
        if self.none_note and any(RETURNED_NONE in what for what in failure.failures.values()):
            why = f"{why}; {self.none_note}"  # (what follows: another fixed probe batch)
        nonfinite = failure.kinds == {NonFiniteCurvatureError.__name__}
        checked = failure.kinds <= {CurvatureCheckError.__name__, PiecewiseLinearError.__name__}
        # Products that are not derivatives: one kind too (their messages carry the numbers).
        key = "nonfinite" if nonfinite else "not_derivatives" if checked else f"failure: {why}"
        self.warn_once(key, f"skipped {what} at step {step} ({why}); {then}.")

    def finite(self, metrics: dict[str, float], step: int) -> dict[str, float]:
        """``metrics`` without its non-finite values (one warning names them)."""
        bad = [name for name, value in metrics.items() if not math.isfinite(value)]
        if bad:
            self.warn_once(
                "nonfinite_values",
                f"left the non-finite value(s) of {', '.join(bad)} out at step {step}.",
            )
        return {name: value for name, value in metrics.items() if name not in bad}
