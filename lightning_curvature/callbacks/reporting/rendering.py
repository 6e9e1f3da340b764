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

import torch

from lightning_curvature.callbacks.reporting.drawing import TEXT, PlotBox, canvas, image_tensor

__all__ = ["density_image"]

_INK = (31, 90, 180)
_FILL = (170, 198, 238)


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
    image, draw, font = canvas(size)
    x = grid.detach().to(torch.float64).cpu()
    y = density.detach().to(torch.float64).cpu().clamp_min(0)
    x_low, x_high = float(x[0]), float(x[-1])
    if not x_high > x_low:
        x_high = x_low + 1.0
    peak = float(y.max()) if float(y.max()) > 0 else 1.0
    y_low, y_high = math.log10(peak * floor), math.log10(peak)
    box = PlotBox(left, top, width - left - right, height - top - bottom, x_low, x_high)

    def py(log_value: float) -> float:
        return top + (y_high - log_value) / (y_high - y_low) * box.height

    box.decades(draw, font, py, math.ceil(y_low), math.floor(y_high))
    box.x_ticks(draw, font)
    # the curve, filled down to the floor
    logs = y.clamp_min(peak * floor).log10()
    points = [(box.px(float(a)), py(float(b))) for a, b in zip(x, logs, strict=True)]
    base = box.bottom
    draw.polygon([(points[0][0], base), *points, (points[-1][0], base)], fill=_FILL)
    draw.line(points, fill=_INK, width=2)
    if nodes is not None:  # the rug: every quadrature node, outliers included
        for node in nodes.detach().reshape(-1).cpu().tolist():
            if x_low <= node <= x_high:
                draw.line([(box.px(node), base - 7), (box.px(node), base)], fill=_INK, width=1)
    box.markers(draw, font, markers or {})
    box.frame(draw)
    draw.text((left, 10), title, fill=TEXT, font=font)
    draw.text((left + box.width / 2, height - 6), "Hessian eigenvalue", fill=TEXT, font=font,
              anchor="md")  # fmt: skip
    box.y_label(image, font, "density (log scale)")
    return image_tensor(image)
