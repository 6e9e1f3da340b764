"""A line chart with a legend and a log axis, for TensorBoard's image dashboard.

TensorBoard's own charts draw every run of a tag in one colour without a legend, on a linear
axis, smoothed, and join points across probes that logged nothing: a threshold that a
learning-rate schedule moves over decades then flattens the sharpness under it, in the same
colour. This picture draws each quantity in a colour of its own, named in a legend, on a
log axis whose decades are labelled, with a marker at every probe and a gap where a probe
left a value out. Drawn with Pillow (a dependency of TensorBoard); the built-in font has no
Greek, so the labels spell ``lambda``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import ImageDraw

from lightning_curvature.callbacks.reporting.drawing import (
    TEXT,
    Font,
    PlotBox,
    canvas,
    dashed,
    image_tensor,
)

__all__ = ["Line", "line_chart"]


@dataclass(frozen=True)
class Line:
    """One quantity of the chart.

    Attributes:
        label: its legend entry.
        points: ``(step, value)`` in step order; a ``nan`` value is a gap.
        color: RGB.
        dashed: drawn dashed, without markers (a threshold that moves with the schedule).
    """

    label: str
    points: Sequence[tuple[int, float]]
    color: tuple[int, int, int]
    dashed: bool = False


def _decades(lines: Sequence[Line]) -> tuple[int, int]:
    values = [v for line in lines for _, v in line.points if v > 0 and math.isfinite(v)]
    if not values:
        return 0, 1
    low = math.floor(math.log10(min(values)) - 0.02)  # (a point on a decade stays inside)
    high = math.ceil(math.log10(max(values)) + 0.02)
    return low, max(high, low + 1)


def _segments(points: Sequence[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Runs of drawable points (a ``nan`` or a non-positive value on a log axis breaks one)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if math.isfinite(y):
            runs[-1].append((x, y))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def line_chart(
    lines: Sequence[Line],
    *,
    title: str,
    y_label: str,
    size: tuple[int, int] = (720, 360),
) -> torch.Tensor:
    """Draw ``lines`` over the optimizer step on a log y axis, as a ``(3, H, W)`` image in [0, 1].

    Example:
        >>> sharpness = Line("lambda_1", [(0, 2.0), (10, float("nan")), (20, 9.0)], (31, 90, 180))
        >>> threshold = Line("2/lr", [(0, 1e4), (10, 300.0), (20, 1e3)], (230, 120, 0), dashed=True)
        >>> image = line_chart([sharpness, threshold], title="sharpness", y_label="eigenvalue")
        >>> image.shape, float(image.min()) >= 0, float(image.max()) <= 1
        (torch.Size([3, 360, 720]), True, True)
    """
    width, height = size
    left, right, top, bottom = 78, 18, 58, 52
    image, draw, font = canvas(size)
    steps = [s for line in lines for s, _ in line.points] or [0]
    x_low, x_high = min(steps), max(steps)
    if not x_high > x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = _decades(lines)
    box = PlotBox(left, top, width - left - right, height - top - bottom, x_low, x_high)

    def py(log_value: float) -> float:
        return top + (y_high - log_value) / (y_high - y_low) * box.height

    box.decades(draw, font, py, y_low, y_high)
    box.x_ticks(draw, font)
    for line in lines:
        drawable = [(s, v if v > 0 else math.nan) for s, v in line.points]
        for run in _segments(drawable):
            xy = [(box.px(s), py(math.log10(v))) for s, v in run]
            if line.dashed:
                dashed(draw, xy, line.color)
                continue
            if len(xy) > 1:
                draw.line(xy, fill=line.color, width=2)
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=line.color)
    _legend(draw, font, lines, left, 30)
    box.frame(draw)
    draw.text((left, 10), title, fill=TEXT, font=font)
    draw.text((left + box.width / 2, height - 6), "optimizer step", fill=TEXT, font=font,
              anchor="md")  # fmt: skip
    box.y_label(image, font, f"{y_label} (log scale)")
    return image_tensor(image)


def _legend(
    draw: ImageDraw.ImageDraw,
    font: Font,
    lines: Sequence[Line],
    left: float,
    top: float,
) -> None:
    """The legend in a row above the plot (it never hides a line): a sample and a label each."""
    x = left
    for line in lines:
        if not line.points:
            continue
        y = top + 10
        if line.dashed:
            dashed(draw, [(x, y), (x + 26, y)], line.color)
        else:
            draw.line([(x, y), (x + 26, y)], fill=line.color, width=2)
            draw.ellipse([x + 10, y - 3, x + 16, y + 3], fill=line.color)
        draw.text((x + 32, y), line.label, fill=TEXT, font=font, anchor="lm")
        x += 32 + draw.textlength(line.label, font=font) + 24
