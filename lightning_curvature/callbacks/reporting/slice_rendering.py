"""A labelled picture of loss slices, for TensorBoard's image dashboard.

One panel per direction, stacked: the loss measured along the slice (a line through its
points), the second-order model of the same probe (dashed), a dotted level at the loss of the
current weights (where the loss neither rose nor fell), and dashed vertical markers (the
optimizer's step, ``2/λ``; the built-in font has no Greek). The y range is that of the
measured points; the quadratic model is clipped to half that range again above and below, so
a model that shoots off does not flatten the measurement. Non-finite points are left out.
Drawn with :mod:`~lightning_curvature.callbacks.reporting.drawing`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from PIL import ImageDraw

from lightning_curvature.callbacks.reporting.drawing import (
    GRID,
    TEXT,
    Font,
    PlotBox,
    canvas,
    dashed,
    format_number,
    image_tensor,
    nice_ticks,
)

__all__ = ["SlicePanel", "slice_image"]

_MEASURED = (31, 90, 180)
_MODEL = (140, 60, 170)
_LEVEL = (120, 120, 120)


@dataclass(frozen=True)
class SlicePanel:
    """One direction's slice, as drawn.

    Attributes:
        title: what the direction is (``"top eigenvector v1"``).
        offsets: increasing positions along the slice (the x axis).
        losses: the measured loss at each offset.
        quadratic: ``(L₀, gᵀd, dᵀHd)``: the model ``L₀ + t·gᵀd + ½t²·dᵀHd`` in the offsets'
            units; ``L₀``, the loss of the current weights, is also drawn as a dotted level.
        x_label: what the offsets count.
        markers: label to offset of each vertical line.

    Example:
        >>> t = torch.linspace(-1, 1, 5)
        >>> panel = SlicePanel("v1", t, t**2, (0.0, 0.0, 2.0), "step size", {"lr": 0.5})
        >>> panel.model(torch.tensor([0.5]))
        tensor([0.2500])
    """

    title: str
    offsets: torch.Tensor
    losses: torch.Tensor
    quadratic: tuple[float, float, float]
    x_label: str
    markers: Mapping[str, float] = field(default_factory=dict)

    @property
    def level(self) -> float:
        """``L₀``: the loss of the current weights."""
        return self.quadratic[0]

    def model(self, offsets: torch.Tensor) -> torch.Tensor:
        """The quadratic model at ``offsets``."""
        value, slope, curvature = self.quadratic
        return value + offsets * slope + 0.5 * offsets * offsets * curvature


def _y_range(panel: SlicePanel) -> tuple[float, float]:
    finite = [v for v in panel.losses.tolist() if math.isfinite(v)] + [panel.level]
    low, high = min(finite), max(finite)
    span = high - low if high > low else max(abs(high), 1.0) * 1e-3
    return low - 0.08 * span, high + 0.08 * span


def _panel(draw: ImageDraw.ImageDraw, font: Font, panel: SlicePanel,
           box: PlotBox) -> None:  # fmt: skip
    y_low, y_high = _y_range(panel)
    span = y_high - y_low

    def py(value: float) -> float:
        return box.top + (y_high - value) / span * box.height

    for tick in nice_ticks(y_low, y_high, 5):
        draw.line([(box.left, py(tick)), (box.left + box.width, py(tick))], fill=GRID)
        draw.text((box.left - 6, py(tick)), format_number(tick), fill=TEXT, font=font,
                  anchor="rm")  # fmt: skip
    box.x_ticks(draw, font)
    level = py(panel.level)
    for start in range(box.left, box.left + box.width, 6):  # dotted level of L(w)
        draw.line([(start, level), (start + 2, level)], fill=_LEVEL, width=1)
    x = panel.offsets.tolist()
    fine = torch.linspace(x[0], x[-1], 121, dtype=torch.float64)
    model = panel.model(fine).clamp(y_low - span / 2, y_high + span / 2)
    points = [
        (box.px(a), py(b))
        for a, b in zip(x, panel.losses.tolist(), strict=True)
        if math.isfinite(b)
    ]
    if len(points) > 1:
        draw.line(points, fill=_MEASURED, width=3)
    for cx, cy in points:
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=_MEASURED)
    # the model over the measurement, so that where they agree both show
    dashed(draw, [(box.px(float(a)), py(float(b))) for a, b in zip(fine, model, strict=True)],
           _MODEL)  # fmt: skip
    box.markers(draw, font, panel.markers)
    box.frame(draw)
    draw.text((box.left, box.top - 20), panel.title, fill=TEXT, font=font)
    draw.text((box.left + box.width, box.top - 20), "loss (solid), quadratic model (dashed)",
              fill=TEXT, font=font, anchor="ra")  # fmt: skip
    draw.text((box.left + box.width / 2, box.bottom + 22), panel.x_label, fill=TEXT, font=font,
              anchor="ma")  # fmt: skip


def slice_image(
    panels: Sequence[SlicePanel], *, title: str, width: int = 720, panel_height: int = 250
) -> torch.Tensor:
    """Draw the panels one under the other as a ``(3, H, W)`` float image in [0, 1].

    Args:
        panels: one per direction.
        title: the line above the first panel.
        width: in pixels.
        panel_height: pixels per panel.

    Example:
        >>> t = torch.linspace(-1, 1, 9, dtype=torch.float64)
        >>> loss = 1 + t**2 + 0.3 * t**3
        >>> panel = SlicePanel("v1", t, loss, (1.0, 0.0, 2.0), "step size", {"2/lambda": 0.8})
        >>> image = slice_image([panel, panel], title="step 100")
        >>> image.shape, float(image.min()) >= 0, float(image.max()) <= 1
        (torch.Size([3, 540, 720]), True, True)
    """
    left, right, head, foot = 78, 18, 30, 50  # head: the panel's title; foot: its x axis
    height = 40 + panel_height * len(panels)
    image, draw, font = canvas((width, height))
    draw.text((left, 10), title, fill=TEXT, font=font)
    for i, panel in enumerate(panels):
        x_low, x_high = float(panel.offsets[0]), float(panel.offsets[-1])
        if not x_high > x_low:
            x_high = x_low + 1.0
        top = 40 + i * panel_height + head
        box = PlotBox(left, top, width - left - right, panel_height - head - foot, x_low, x_high)
        _panel(draw, font, panel, box)
    return image_tensor(image)
