"""The headline as a picture in TensorBoard: sharpness against its threshold, told apart.

At each probe of a ``HessianEigenvalueMonitor`` with ``stability=True`` and a TensorBoard
logger, the image ``curvature/sharpness_chart`` redraws the run so far
(:func:`~lightning_curvature.callbacks.reporting.line_chart.line_chart`): the sharpness the
threshold is about (λ₁ of the Hessian for SGD, Adam's preconditioned λ₁(P⁻¹H)), the batch
sharpness of a ``BatchSharpnessMonitor`` of the same ``name`` (SGD), and the threshold dashed,
each in a colour of its own with a legend, on a log axis. The Images tab's slider steps
through the probes; the last picture is the whole run. It is drawn from the values the
monitors logged, as they logged them (their histories), and costs a few milliseconds a probe.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_curvature.callbacks.measurement import cost_tag
from lightning_curvature.callbacks.reporting.line_chart import Line, line_chart
from lightning_curvature.callbacks.reporting.logging import tensorboard_writers
from lightning_curvature.callbacks.reporting.summary import ProbeHistory

__all__ = ["PICTURE_TAG", "sharpness_lines", "write_sharpness_picture"]

#: The image's tag (under the monitor's ``name`` and ``ggn_`` like every tag).
PICTURE_TAG = "curvature/sharpness_chart"
_BLUE, _GREEN, _ORANGE = (31, 90, 180), (20, 140, 60), (230, 120, 0)


def _with_gaps(history: ProbeHistory, tag: str, probes: str) -> list[tuple[int, float]]:
    """``tag``'s points, with a ``nan`` at every probe (``probes``' steps) that left it out."""
    logged = dict(history.series.get(tag, []))
    steps = sorted({step for step, _ in history.series.get(probes, [])} | set(logged))
    return [(step, logged.get(step, float("nan"))) for step in steps]


def sharpness_lines(
    history: ProbeHistory,
    tag: Any,
    cost_name: str,
    batch: tuple[ProbeHistory, Any, str] | None = None,
    matrix: str = "Hessian",
) -> list[Line]:
    """The lines of the picture from the monitors' histories.

    Args:
        history: the eigenvalue monitor's.
        tag: its tag function (``name`` and ``ggn_`` applied).
        cost_name: its cost name (whose seconds' steps are its probes).
        batch: a batch-sharpness monitor's history, tag function and cost name, if any.
        matrix: ``"Hessian"`` or ``"GGN"``.

    Example:
        >>> history = ProbeHistory("HessianEigenvalueMonitor")
        >>> history.record(0, {"curvature/eigenvalue_1": 2.0, "curvature/stability_threshold":
        ...     10.0, "probe_cost/eigenvalue_seconds": 0.1}, seconds=0.1)
        >>> [line.label for line in sharpness_lines(history, str, "eigenvalue")]
        ['lambda_1 (Hessian)', 'stability threshold']
    """
    probes = tag(cost_tag(cost_name, "seconds"))
    preconditioned = tag("curvature/preconditioned_eigenvalue_1")
    lines = []
    if preconditioned in history.series:  # Adam: its threshold is about P^-1 H
        points = _with_gaps(history, preconditioned, probes)
        lines.append(Line(f"lambda_1 of inv(P) {matrix[0]} (Adam)", points, _BLUE))
    else:
        points = _with_gaps(history, tag("curvature/eigenvalue_1"), probes)
        lines.append(Line(f"lambda_1 ({matrix})", points, _BLUE))
        if batch is not None:
            other, other_tag, other_cost = batch
            points = _with_gaps(
                other,
                other_tag("curvature/batch_sharpness"),
                other_tag(cost_tag(other_cost, "seconds")),
            )
            lines.append(Line("batch sharpness", points, _GREEN))
    threshold = _with_gaps(history, tag("curvature/stability_threshold"), probes)
    lines.append(Line("stability threshold", threshold, _ORANGE, dashed=True))
    return [line for line in lines if line.points]


def write_sharpness_picture(trainer: pl.Trainer, monitor: Any, step: int) -> None:
    """Draw ``monitor``'s picture at ``step`` into every TensorBoard logger of ``trainer``."""
    writers = list(tensorboard_writers(trainer))
    if not writers:
        return
    batch = next(
        (
            (c.report.history, c.tag, c.cost_name)
            for c in trainer.callbacks  # type: ignore[attr-defined]
            if getattr(c, "cost_name", None) == "batch_sharpness" and c.name == monitor.name
        ),
        None,
    )
    history, matrix = monitor.report.history, monitor.matrix
    lines = sharpness_lines(history, monitor.tag, monitor.cost_name, batch, matrix=matrix)
    if len(lines) < 2:  # no threshold (yet): nothing to compare
        return
    title = f"sharpness vs. stability threshold (log scale), step {step}"
    image = line_chart(lines, title=title, y_label="eigenvalue")
    for writer in writers:
        writer.add_image(monitor.tag(PICTURE_TAG), image, global_step=step)
