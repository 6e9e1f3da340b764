"""A dependency-free picture of a spectral density, for TensorBoard's image dashboard."""

from __future__ import annotations

import torch

__all__ = ["density_image"]


def density_image(density: torch.Tensor, height: int = 160, floor: float = 1e-6) -> torch.Tensor:
    """Render a density curve on a log scale as a ``(3, height, len(density))`` image.

    Each column is filled up to ``log10(density)`` between ``log10(floor · max)`` (bottom) and
    ``log10(max)`` (top): the bulk near zero and the outliers are both visible.

    Args:
        density: non-negative values on an evenly spaced grid (one column each).
        height: image height in pixels.
        floor: smallest density shown, relative to the maximum.

    Example:
        >>> image = density_image(torch.tensor([1.0, 1e-3, 0.0]), height=6)
        >>> image.shape
        torch.Size([3, 6, 3])
        >>> (image[0] < 1).sum(dim=0).tolist()  # filled pixels: full, half (1e-3 of 1e-6), none
        [6, 3, 0]
    """
    values = density.to(torch.float64).clamp_min(0)
    top = float(values.max()) if float(values.max()) > 0 else 1.0
    levels = (values / top).clamp_min(floor).log10() / -torch.tensor(floor).log10() + 1  # in [0, 1]
    rows = torch.arange(height, 0, -1, dtype=torch.float64)[:, None] / height  # top row = 1
    filled = (rows <= levels[None, :] + 1e-12) & (values[None, :] > 0)
    background = torch.tensor([1.0, 1.0, 1.0])[:, None, None]
    ink = torch.tensor([0.1, 0.35, 0.75])[:, None, None]
    return torch.where(filled[None], ink, background).to(torch.float32)
