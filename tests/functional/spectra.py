"""Spectra and starts the Lanczos tests share."""

from __future__ import annotations

import torch


def edge_of_stability(n: int, ratio: float, dtype: torch.dtype) -> torch.Tensor:
    """A top pair ``1, ratio`` over a decaying cluster (as benchmarks/bench_certificate.py)."""
    j = torch.arange(n - 2, dtype=torch.float64)
    cluster = 0.97 * torch.exp(-j / 12) - 0.02
    return torch.cat([torch.tensor([1.0, ratio], dtype=torch.float64), cluster]).to(dtype)


def gaussian(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A seeded Gaussian vector (a random start)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
