"""A labelled picture of a spectral density, for TensorBoard's image dashboard.

Hessian spectra are a bulk near zero and a few outliers far from it, with densities some
orders of magnitude apart, so the density is drawn on a log scale (down to ``floor`` times
its peak), with labelled axes, the quadrature nodes as a rug under the curve (an outlier of
weight ``1/P`` is always visible there), and vertical lines at ``lambda_max`` and, where known,
the stability threshold. Drawn with Pillow (a dependency of TensorBoard), no plotting
library needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

#: The fonts Pillow's ``load_default`` gives (FreeType where available, else the bitmap one).
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

__all__ = ["Font", "PlotBox", "density_image", "format_number", "image_tensor", "nice_ticks"]

_INK = (31, 90, 180)
_FILL = (170, 198, 238)
_GRID = (225, 225, 225)
_TEXT = (40, 40, 40)
_MARKERS = ((200, 30, 30), (230, 120, 0), (20, 140, 60))


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick positions (1, 2 or 5 times a power of ten apart) inside ``[low, high]``.

    Example:
        >>> nice_ticks(-3.2, 151.7)
        [0.0, 50.0, 100.0, 150.0]
    """
    if not high > low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw / 1.5)
    first = math.ceil(low / step) * step
    return [
        float(round(first + i * step, 10)) for i in range(int((high - first) / step + 1e-9) + 1)
    ]


def format_number(value: float) -> str:
    """A tick or marker label: 4 significant digits, or exponent notation from 1e5 on.

    Example:
        >>> format_number(0.123456), format_number(123456.0)
        ('0.1235', '1.235e+05')
    """
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as the ``(3, H, W)`` float tensor in [0, 1] TensorBoard takes.

    Example:
        >>> image_tensor(Image.new("RGB", (4, 2), "white")).shape
        torch.Size([3, 2, 4])
    """
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.reshape(height, width, 3).permute(2, 0, 1).float() / 255


@dataclass(frozen=True)
class PlotBox:
    """Where a plot lies in its picture, and its x axis: shared by every rendered chart.

    Example:
        >>> box = PlotBox(left=50, top=20, width=100, height=80, x_low=0.0, x_high=2.0)
        >>> box.px(1.0), box.bottom
        (100.0, 100)
    """

    left: int
    top: int
    width: int
    height: int
    x_low: float
    x_high: float

    @property
    def bottom(self) -> int:
        """The pixel row of the x axis."""
        return self.top + self.height

    def px(self, value: float) -> float:
        """The pixel column of ``value`` on the x axis."""
        return self.left + (value - self.x_low) / (self.x_high - self.x_low) * self.width

    def x_ticks(self, draw: ImageDraw.ImageDraw, font: Font) -> None:
        """Vertical grid lines at round values, labelled under the axis."""
        for tick in nice_ticks(self.x_low, self.x_high):
            col = self.px(tick)
            draw.line([(col, self.top), (col, self.bottom)], fill=_GRID)
            draw.text((col, self.bottom + 4), format_number(tick), fill=_TEXT, font=font,
                      anchor="ma")  # fmt: skip

    def markers(self, draw: ImageDraw.ImageDraw, font: Font, markers: Mapping[str, float]) -> None:
        """A dashed vertical line per marker, labelled; one off the axis named at its edge."""
        for i, (label, value) in enumerate(markers.items()):
            color = _MARKERS[i % len(_MARKERS)]
            text = f"{label} = {format_number(value)}"
            row = self.top + 4 + 18 * i
            right = self.left + self.width
            if value > self.x_high:
                draw.text((right - 2, row), f"{text} ->", fill=color, font=font, anchor="ra")
                continue
            if value < self.x_low:
                draw.text((self.left + 2, row), f"<- {text}", fill=color, font=font, anchor="la")
                continue
            col = self.px(value)
            for start in range(self.top, self.bottom, 8):  # dashed
                draw.line([(col, start), (col, min(start + 4, self.bottom))], fill=color, width=2)
            anchor = "ra" if col > self.left + self.width / 2 else "la"
            draw.text((col - 4 if anchor == "ra" else col + 4, row), text, fill=color, font=font,
                      anchor=anchor)  # fmt: skip


def density_image(
    grid: torch.Tensor,
    density: torch.Tensor,
    *,
    nodes: torch.Tensor | None = None,
    markers: Mapping[str, float] | None = None,
    title: str = "Hessian eigenvalue density",
    size: tuple[int, int] = (720, 340),
    floor: float = 1e-7,
) -> torch.Tensor:
    """Draw ``density`` over ``grid`` on a log scale as a ``(3, H, W)`` float image in [0, 1].

    Args:
        grid: increasing eigenvalues (the x axis).
        density: non-negative density at each grid point.
        nodes: quadrature nodes, drawn as a rug along the x axis.
        markers: label to eigenvalue of each vertical line (``{"lambda_max": 152.4}``; the
            built-in font has no Greek); one outside the axis is named at the edge it lies
            beyond.
        title: the line above the plot.
        size: ``(width, height)`` in pixels.
        floor: smallest density shown, relative to the peak.

    Example:
        >>> grid = torch.linspace(-1, 11, 200)
        >>> density = torch.exp(-grid**2 / 0.02) + 1e-4 * torch.exp(-(grid - 10)**2 / 0.02)
        >>> image = density_image(grid, density, markers={"lambda_max": 10.0, "threshold": 20.0})
        >>> image.shape, float(image.min()) >= 0, float(image.max()) <= 1
        (torch.Size([3, 340, 720]), True, True)
    """
    width, height = size
    left, right, top, bottom = 78, 18, 36, 52
    plot_w, plot_h = width - left - right, height - top - bottom
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=15)
    x = grid.detach().to(torch.float64).cpu()
    y = density.detach().to(torch.float64).cpu().clamp_min(0)
    x_low, x_high = float(x[0]), float(x[-1])
    if not x_high > x_low:
        x_high = x_low + 1.0
    peak = float(y.max()) if float(y.max()) > 0 else 1.0
    y_low, y_high = math.log10(peak * floor), math.log10(peak)

    box = PlotBox(left, top, plot_w, plot_h, x_low, x_high)
    px = box.px

    def py(log_value: float) -> float:
        return top + (y_high - log_value) / (y_high - y_low) * plot_h

    # axes, grid lines and tick labels
    for decade in range(math.ceil(y_low), math.floor(y_high) + 1):
        row = py(decade)
        draw.line([(left, row), (left + plot_w, row)], fill=_GRID)
        draw.text((left - 6, row), f"1e{decade}", fill=_TEXT, font=font, anchor="rm")
    box.x_ticks(draw, font)
    # the curve, filled down to the floor
    logs = y.clamp_min(peak * floor).log10()
    points = [(px(float(a)), py(float(b))) for a, b in zip(x, logs, strict=True)]
    base = top + plot_h
    draw.polygon([(points[0][0], base), *points, (points[-1][0], base)], fill=_FILL)
    draw.line(points, fill=_INK, width=2)
    if nodes is not None:  # the rug: every quadrature node, outliers included
        for node in nodes.detach().reshape(-1).cpu().tolist():
            if x_low <= node <= x_high:
                draw.line([(px(node), base - 7), (px(node), base)], fill=_INK, width=1)
    box.markers(draw, font, markers or {})
    draw.rectangle([left, top, left + plot_w, base], outline=_TEXT)
    draw.text((left, 10), title, fill=_TEXT, font=font)
    draw.text(
        (left + plot_w / 2, height - 6), "Hessian eigenvalue", fill=_TEXT, font=font, anchor="md"
    )
    axis = Image.new("RGB", (plot_h, 20), "white")
    ImageDraw.Draw(axis).text(
        (plot_h / 2, 10), "density (log scale)", fill=_TEXT, font=font, anchor="mm"
    )
    image.paste(axis.rotate(90, expand=True), (2, top))
    return image_tensor(image)
