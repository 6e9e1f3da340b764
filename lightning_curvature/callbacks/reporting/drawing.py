"""What every picture of the package is drawn with: a canvas, an x axis, ticks, dashes.

The pictures (:mod:`~lightning_curvature.callbacks.reporting.rendering`'s spectral density,
:mod:`~lightning_curvature.callbacks.reporting.slice_rendering`'s loss slices,
:mod:`~lightning_curvature.callbacks.reporting.line_chart`'s sharpness chart) are drawn with
Pillow (a dependency of TensorBoard, so no plotting library is needed) in one style: a white
canvas and Pillow's default font (no Greek: labels spell ``lambda``), grey grid lines at
round ticks, a framed plot in a :class:`PlotBox`, dashed lines for models and markers, and
the ``(3, H, W)`` float tensor TensorBoard's image dashboard takes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

#: The fonts Pillow's ``load_default`` gives (FreeType where available, else the bitmap one).
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

__all__ = [
    "GRID",
    "MARKERS",
    "TEXT",
    "Font",
    "PlotBox",
    "canvas",
    "dashed",
    "format_number",
    "image_tensor",
    "nice_ticks",
]

GRID = (225, 225, 225)
TEXT = (40, 40, 40)
#: The colours of the vertical markers, in the order they are given.
MARKERS = ((200, 30, 30), (230, 120, 0), (20, 140, 60))


def canvas(size: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw, Font]:
    """A white RGB picture of ``size`` (width, height), its drawing context and the font.

    Example:
        >>> image, draw, font = canvas((40, 20))
        >>> image.size
        (40, 20)
    """
    image = Image.new("RGB", size, "white")
    return image, ImageDraw.Draw(image), ImageFont.load_default(size=15)


def dashed(
    draw: ImageDraw.ImageDraw,
    points: Sequence[tuple[float, float]],
    color: tuple[int, int, int],
    dash: float = 6.0,
) -> None:
    """A dashed line through ``points``: ``dash`` pixels drawn, ``dash`` left out, along it.

    Example:
        >>> image, draw, _ = canvas((40, 3))
        >>> dashed(draw, [(0, 1), (10, 1), (30, 1)], (0, 0, 0))
        >>> [image.getpixel((x, 1)) for x in (2, 8, 14, 20)]
        [(0, 0, 0), (255, 255, 255), (0, 0, 0), (255, 255, 255)]
    """
    drawn, run = True, 0.0  # whether the current dash is drawn, and how far it has gone
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        length = math.hypot(x1 - x0, y1 - y0)
        at = 0.0
        while at < length:
            step = min(dash - run, length - at)
            if drawn:
                a, b = at / length, (at + step) / length
                start = (x0 + a * (x1 - x0), y0 + a * (y1 - y0))
                end = (x0 + b * (x1 - x0), y0 + b * (y1 - y0))
                draw.line([start, end], fill=color, width=2)
            at, run = at + step, run + step
            if run >= dash:
                drawn, run = not drawn, 0.0


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
            draw.line([(col, self.top), (col, self.bottom)], fill=GRID)
            draw.text((col, self.bottom + 4), format_number(tick), fill=TEXT, font=font,
                      anchor="ma")  # fmt: skip

    def decades(
        self,
        draw: ImageDraw.ImageDraw,
        font: Font,
        row: Callable[[float], float],
        low: int,
        high: int,
    ) -> None:
        """Horizontal grid lines at the decades ``low..high`` of a log axis, labelled ``1e<d>``.

        ``row`` gives the pixel row of a base-10 logarithm.
        """
        for decade in range(low, high + 1):
            y = row(decade)
            draw.line([(self.left, y), (self.left + self.width, y)], fill=GRID)
            draw.text((self.left - 6, y), f"1e{decade}", fill=TEXT, font=font, anchor="rm")

    def y_label(self, image: Image.Image, font: Font, text: str) -> None:
        """``text`` turned a quarter, along the y axis at the picture's left edge."""
        axis = Image.new("RGB", (self.height, 20), "white")
        ImageDraw.Draw(axis).text((self.height / 2, 10), text, fill=TEXT, font=font, anchor="mm")
        image.paste(axis.rotate(90, expand=True), (2, self.top))

    def frame(self, draw: ImageDraw.ImageDraw) -> None:
        """The plot's outline."""
        draw.rectangle([self.left, self.top, self.left + self.width, self.bottom], outline=TEXT)

    def markers(self, draw: ImageDraw.ImageDraw, font: Font, markers: Mapping[str, float]) -> None:
        """A dashed vertical line per marker, labelled; one off the axis named at its edge."""
        for i, (label, value) in enumerate(markers.items()):
            color = MARKERS[i % len(MARKERS)]
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
            dashed(draw, [(col, self.top), (col, self.bottom)], color)
            anchor = "ra" if col > self.left + self.width / 2 else "la"
            draw.text((col - 4 if anchor == "ra" else col + 4, row), text, fill=color, font=font,
                      anchor=anchor)  # fmt: skip
