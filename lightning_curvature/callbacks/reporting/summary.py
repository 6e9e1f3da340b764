"""What a monitor measured over a fit, kept as it was logged, and the table of it at the end.

:class:`ProbeHistory` holds every value a monitor wrote (the floats the loggers got, at the
steps they got them), how many probes it made and the seconds they took; :func:`summary_table`
turns the histories of a Trainer's monitors into the table printed at the end of ``fit``:
per monitor its probes and time (and that time's share of the fit), per quantity the first,
last, smallest and largest value and how many points its chart has.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lightning_curvature.callbacks.reporting.progress import format_value, headline

__all__ = ["ProbeHistory", "SeriesSummary", "summary_table"]


@dataclass(frozen=True)
class SeriesSummary:
    """One quantity over a fit.

    Attributes:
        first: its value at the first probe that logged it.
        last: at the last.
        min: the smallest value.
        max: the largest.
        points: how many values were logged (the points of its chart).
        first_step: the step of the first, ``last_step`` of the last.
        last_step: see ``first_step``.

    Example:
        >>> SeriesSummary.of([(0, 2.0), (10, 5.0), (20, 3.0)])
        SeriesSummary(first=2.0, last=3.0, min=2.0, max=5.0, points=3, first_step=0, last_step=20)
    """

    first: float
    last: float
    min: float
    max: float
    points: int
    first_step: int
    last_step: int

    @classmethod
    def of(cls, series: list[tuple[int, float]]) -> SeriesSummary:
        """The summary of ``(step, value)`` pairs (at least one)."""
        values = [value for _, value in series]
        return cls(
            values[0],
            values[-1],
            min(values),
            max(values),
            len(values),
            series[0][0],
            series[-1][0],
        )


@dataclass
class ProbeHistory:
    """A monitor's fit: the values it logged, its probes and their seconds.

    Attributes:
        owner: the monitor (its class, and its ``name`` if it has one).
        series: tag to ``(step, value)`` in the order logged (cost tags included).
        probes: the probes made, those skipped by bad luck included.
        skipped: the probes that logged nothing.
        seconds: the seconds the probes took.

    Example:
        >>> history = ProbeHistory("HessianTraceMonitor")
        >>> history.record(0, {"curvature/trace": 4.0}, seconds=0.5)
        >>> history.record(50, None, seconds=0.25)  # skipped
        >>> history.record(100, {"curvature/trace": 3.0}, seconds=0.5)
        >>> history.probes, history.skipped, history.seconds
        (3, 1, 1.25)
        >>> history.summary()["curvature/trace"].min
        3.0
    """

    owner: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    probes: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def clear(self) -> None:
        """Forget the fit before (a new fit begins)."""
        self.series, self.probes, self.skipped, self.seconds = {}, 0, 0, 0.0

    def record(self, step: int, values: Mapping[str, float] | None, seconds: float) -> None:
        """Note one probe at ``step``: what it logged (``None``: nothing) and its seconds."""
        self.probes += 1
        self.seconds += seconds
        if values is None:
            self.skipped += 1
            return
        for tag, value in values.items():
            self.series.setdefault(tag, []).append((step, float(value)))

    def summary(self, costs: bool = False) -> dict[str, SeriesSummary]:
        """Each quantity's summary (the cost tags too with ``costs=True``), in logged order."""
        kept = self.series if costs else headline(dict.fromkeys(self.series, 0.0))
        return {tag: SeriesSummary.of(self.series[tag]) for tag in kept}


_COLUMNS = ("first", "last", "min", "max", "points")


def _share(seconds: float, fit_seconds: float | None) -> str:
    if fit_seconds is None or not fit_seconds > 0 or not math.isfinite(fit_seconds):
        return ""
    return f", {100 * seconds / fit_seconds:.1f}% of the fit's {fit_seconds:.3g} s"


def summary_table(histories: Iterable[ProbeHistory], fit_seconds: float | None) -> str:
    """The end-of-fit table of every monitor's history.

    Args:
        histories: one per monitor.
        fit_seconds: the fit's time, which the probes' time is a share of.

    Example:
        >>> history = ProbeHistory("HessianTraceMonitor")
        >>> for step, trace in ((0, 4.0), (50, 3.0), (100, 3.5)):
        ...     history.record(step, {"curvature/trace": trace}, seconds=0.5)
        >>> print(summary_table([history], fit_seconds=60.0))
        HessianTraceMonitor: 3 probes, 1.5 s, 2.5% of the fit's 60 s
          quantity         first      last       min        max        points
          curvature/trace  4          3.5        3          4          3
    """
    blocks = []
    for history in histories:
        skipped = f" ({history.skipped} skipped)" if history.skipped else ""
        head = (
            f"{history.owner}: {history.probes} probes{skipped}, {history.seconds:.3g} s"
            f"{_share(history.seconds, fit_seconds)}"
        )
        rows = [
            [tag, *(format_value(getattr(s, c)) for c in _COLUMNS[:-1]), str(s.points)]
            for tag, s in history.summary().items()
        ]
        if not rows:
            blocks.append(f"{head}\n  nothing logged")
            continue
        width = max(len("quantity"), *(len(row[0]) for row in rows)) + 2
        lines = [head, "  " + "quantity".ljust(width) + "".join(c.ljust(11) for c in _COLUMNS)]
        for row in rows:
            lines.append("  " + row[0].ljust(width) + "".join(v.ljust(11) for v in row[1:]))
        blocks.append("\n".join(line.rstrip() for line in lines))
    return "\n".join(blocks)
