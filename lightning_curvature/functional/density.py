"""``spectral_density``: the Hessian eigenvalue density by stochastic Lanczos quadrature.

SLQ (Ghorbani, Krishnan & Xiao, ICML 2019; Lin, Saad & Yang 2016): each run starts Lanczos
from a normalised Rademacher vector; the eigenvalues of ``T`` (nodes) and the squared first
components of its eigenvectors (weights, summing to 1) are a Gauss quadrature of the spectral
measure ``(1/P) Σ δ(t − λ_i)``. Averaging runs and smoothing with a Gaussian kernel gives the
density. The extreme nodes converge to ``λ_max`` and ``λ_min`` first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_curvature.checks import MAX_BUDGET, check_budget, check_real, check_tensor
from lightning_curvature.functional.linalg.product_batches import product_groups
from lightning_curvature.functional.linalg.quadrature import lanczos_quadratures
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.parameters import ParameterPatterns
from lightning_curvature.functional.model.probe import BatchNormMode
from lightning_curvature.functional.operator.backends import AllReduce, HVPBackend
from lightning_curvature.functional.operator.ggn import Curvature
from lightning_curvature.functional.operator.options import OperatorOptions, open_operator

__all__ = ["SpectralDensity", "check_density_arguments", "density_on_grid", "spectral_density"]


def check_density_arguments(num_steps: Any, num_runs: Any, *, min_steps: int = 1) -> None:
    """Raise if ``num_steps`` or ``num_runs`` of :func:`spectral_density` is out of range.

    ``min_steps``: the fewest steps the caller accepts (the monitor asks for 2: one node
    makes no density).

    Raises:
        ValueError: naming the argument, what it allows and what it got.

    Example:
        >>> check_density_arguments(80, 1)  # fine: returns None
        >>> check_density_arguments(80, 0)
        Traceback (most recent call last):
        ...
        ValueError: `num_runs` must be an integer >= 1 and <= 1000000, got 0.
    """
    check_budget("num_steps", num_steps, min_steps)
    check_budget("num_runs", num_runs, 1)
    if num_steps * num_runs > MAX_BUDGET:
        raise ValueError(
            f"`num_steps` × `num_runs` (Hessian-vector products) must be at most {MAX_BUDGET}, "
            f"got {num_steps} × {num_runs}."
        )


def density_on_grid(
    nodes: torch.Tensor,
    weights: torch.Tensor,
    grid: torch.Tensor | None = None,
    *,
    num_points: int = 512,
    sigma: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth quadrature nodes/weights into a density on a grid (Gaussian kernel).

    Args:
        nodes: ``(runs, m)`` (or ``(m,)``) quadrature nodes.
        weights: matching weights, each run summing to 1.
        grid: points to evaluate at; default ``num_points`` points spanning the nodes
            extended by 5 kernel widths on each side.
        num_points: size of the default grid.
        sigma: kernel width; default 1% of the node range.

    Returns:
        ``(grid, density)``; the density integrates to 1 over the default grid.

    Raises:
        ValueError: naming the argument: ``nodes`` or ``weights`` not finite tensors of one
            shape, negative or all-zero ``weights``, a ``grid`` that is not a finite 1-D
            tensor, ``num_points`` not an integer in ``[2, MAX_BUDGET]``, or ``sigma`` not a
            finite number > 0.

    Example:
        >>> grid, density = density_on_grid(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]))
        >>> round(float(torch.trapezoid(density, grid)), 4)
        1.0
    """
    check_tensor("nodes", nodes)
    check_tensor("weights", weights, sign="nonnegative", nonzero=True)
    if weights.shape != nodes.shape:
        raise ValueError(
            f"`weights` must have the shape of `nodes` {tuple(nodes.shape)}, "
            f"got {tuple(weights.shape)}."
        )
    if grid is not None:
        check_tensor("grid", grid)
        if grid.dim() != 1:
            raise ValueError(f"`grid` must be one-dimensional, got shape {tuple(grid.shape)}.")
    check_budget("num_points", num_points, 2)
    check_real("sigma", sigma, 0, low_open=True, allow_none=True)
    nodes = nodes.reshape(-1, nodes.shape[-1]).to(device="cpu", dtype=torch.float64)
    weights = weights.reshape(nodes.shape).to(nodes)
    low, high = float(nodes.min()), float(nodes.max())
    width = sigma if sigma is not None else 0.01 * (high - low) or 0.01 * max(abs(high), 1.0)
    if grid is None:
        grid = torch.linspace(low - 5 * width, high + 5 * width, num_points, dtype=torch.float64)
    grid = grid.to(torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes.reshape(-1)[None, :]) / width) ** 2)
    kernel = kernel / (width * math.sqrt(2 * math.pi))
    density = kernel @ weights.reshape(-1) / nodes.shape[0]
    return grid, density


@dataclass(frozen=True)
class SpectralDensity:
    """Result of :func:`spectral_density`: tensors on the model's device, in its compute dtype.

    The quadrature itself runs in float64; the nodes and weights are returned like every
    other result, in the dtype the probe computes in.

    Attributes:
        nodes: ``(num_runs, num_steps)`` quadrature nodes (Ritz values) per run.
        weights: matching weights; each run's sum to 1 (padding nodes have weight 0).
        num_hvps: Hessian-vector products used.
        num_parameters: ``P``; ``weights * P`` estimates eigenvalue counts.
        backend: the Hessian-vector product backend that ran (``"auto"`` resolved).
        fallback: why ``backend="auto"`` ran another backend than ``"retained_graph"``
            (empty if it did not; said once as a warning too).

    Example:
        >>> net = nn.Linear(2, 1, bias=False)  # H = diag(9, 1)/2 as above: nodes 0.5 and 4.5
        >>> X = torch.diag(torch.tensor([3.0, 1.0]))
        >>> out = spectral_density(net, lambda m, x: 0.5 * m(x).pow(2).mean(), X, num_steps=2)
        >>> out.nodes.round(decimals=4), round(out.weights.sum().item(), 12)
        (tensor([[0.5000, 4.5000]]), 1.0)
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    num_hvps: int
    num_parameters: int
    backend: str = ""
    fallback: str = ""

    def density(
        self, grid: torch.Tensor | None = None, *, num_points: int = 512, sigma: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Smoothed density on a grid: see :func:`density_on_grid`."""
        return density_on_grid(self.nodes, self.weights, grid, num_points=num_points, sigma=sigma)


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    num_steps: int = 80,
    num_runs: int = 1,
    *,
    parameters: ParameterPatterns = None,
    backend: HVPBackend = "auto",
    batch_norm: BatchNormMode = "as_is",
    generator: torch.Generator | None = None,
    all_reduce: AllReduce | None = None,
    curvature: Curvature = "hessian",
    options: OperatorOptions | None = None,
) -> SpectralDensity:
    """Eigenvalue density of the Hessian by stochastic Lanczos quadrature.

    Beyond 30-80 steps the start-vector variance dominates: add runs, not steps. Runs go in
    lockstep groups of 8 where batched products may pay (models up to 65k parameters,
    :func:`~lightning_curvature.functional.linalg.product_batches.product_groups`): each step
    multiplies the group's vectors in one batched backward, or one by one, whichever was
    faster on the first steps; the same starts, the same values up to the products' rounding.

    Memory: a run keeps its whole Krylov basis (``num_steps + 1`` vectors) while it holds at
    most 2²⁴ entries (``FULL_BASIS_ENTRIES``: about 207k parameters at 80 steps); above, the
    last two vectors only (a quadrature needs ``T`` alone): at 10⁷ parameters the default
    probe then peaks at 10.4 vectors instead of 89.7. A converged eigenvalue's copies share its
    weight; on the digits edge-of-stability MLP the smoothed density from the same start
    moves by 10⁻⁷ (L1) at the default kernel, where one run's own error is 0.009, and by
    0.006-0.011 at a kernel 5x narrower, where it is 0.02 and the 10-run mean's error grows
    1.2-1.4x (``benchmarks/bench_slq_memory.py``).

    Args:
        model: the module; its trainable parameters are measured.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: one batch or an iterable of batches.
        num_steps: Lanczos steps (Hessian-vector products) per run.
        num_runs: independent runs averaged.
        parameters: glob pattern(s) selecting the measured parameters.
        backend: Hessian-vector product strategy (see :class:`HessianOperator`).
        batch_norm: BatchNorm mode during the probe (running statistics never change).
        generator: random source on the model's device (default: seeded with 0).
        all_reduce: averages a tensor across processes (DDP). Under FSDP2 (sharded
            parameters) the vectors are sharded instead and need none (see
            :class:`HessianOperator`).
        curvature: ``"hessian"``, or ``"ggn"`` for the density of the generalized
            Gauss–Newton matrix (``loss_fn`` an :class:`~lightning_curvature.OutputLoss`).
        options: the operator's settings as one
            :class:`~lightning_curvature.functional.operator.options.OperatorOptions`, instead of
            the keywords.

    Raises:
        ValueError: on invalid arguments (named in the message).
        NonFiniteCurvatureError: if the loss or a product is not finite.
        CurvatureCheckError: if the products fail their self-check (not derivatives).

    Example:
        >>> net = nn.Linear(3, 1, bias=False)
        >>> x = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> esd = spectral_density(net, lambda m, b: m(b).pow(2).mean(), x, num_steps=3)
        >>> esd.nodes  # the three eigenvalues 2/3, 8/3 and 6, each of weight 1/3 on average
        tensor([[0.6667, 2.6667, 6.0000]])
    """
    check_density_arguments(num_steps, num_runs)
    all_nodes, all_weights = [], []
    settings = OperatorOptions.of(options, parameters, backend, batch_norm, curvature, all_reduce)
    with open_operator(model, loss_fn, batch, settings, generator) as (operator, generator):
        shards = operator.shards
        steps = min(num_steps, shards.size)
        products, group = product_groups(
            operator.matvec, operator.matmat, shards.local_size, operator.device
        )
        for first in range(0, num_runs, group):
            draws = min(group, num_runs - first)
            starts = [
                shards.rademacher(generator, operator.dtype, operator.device) for _ in range(draws)
            ]
            found = lanczos_quadratures(
                operator.matvec, torch.stack(starts), steps, shards, products
            )
            for nodes, weights in found:
                pad = steps - nodes.numel()  # fewer nodes after an early (exact) breakdown
                all_nodes.append(torch.cat([nodes, nodes[-1:].expand(pad)]))
                all_weights.append(torch.cat([weights, weights.new_zeros(pad)]))
    device, dtype = operator.device, operator.dtype
    return SpectralDensity(
        nodes=torch.stack(all_nodes).to(device=device, dtype=dtype),
        weights=torch.stack(all_weights).to(device=device, dtype=dtype),
        num_hvps=operator.num_hvps,
        num_parameters=operator.shards.size,
        backend=operator.backend,
        fallback=operator.fallback,
    )
