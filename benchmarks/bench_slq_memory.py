"""Stochastic Lanczos quadrature on two vectors against the whole basis (issue 23, point 1).

``spectral_density`` keeps its whole Krylov basis only below ``FULL_BASIS_ENTRIES``; above,
the run keeps the recurrence's last two vectors. A density needs ``T`` alone, but without
full reorthogonalisation converged eigenvalues get copies, so this script checks what a
user sees, on the digits edge-of-stability MLP (P = 8970, float32, GD at lr 0.2 after 800
and 1500 steps, ``bench_certificate.py``'s states) against its exact spectrum (the dense
float64 Hessian's eigenvalues): for 10 Rademacher starts of 80 steps, each run's smoothed
density (``density_on_grid``, the default kernel of 1 % of the range and a 5x narrower one)
from the whole basis and from two vectors, and

* the L1 distance of each run's density to the exact one (median over the runs), for both;
* the L1 distance between the two densities of the same start (median / max);
* the same for the 10-run averages.

Memory is ``bench_probe_memory.py --modes density`` (with and without ``--whole-basis``).

    OMP_NUM_THREADS=1 python benchmarks/bench_slq_memory.py    # about 3 min on 2 cores
"""

from __future__ import annotations

import statistics

import torch
from bench_certificate import loss_fn, trajectory
from common import load_average, machine
from edge_of_stability import DigitsRegressor, digits_dataset

from lightning_curvature import spectral_density
from lightning_curvature.functional.density import density_on_grid
from lightning_curvature.functional.linalg import basis

RUNS, STEPS = 10, 80


def exact_spectrum(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The float64 Hessian's eigenvalues, its columns from batched products of unit vectors."""
    model = model.double()
    params = [p for p in model.parameters() if p.requires_grad]
    double_batch = tuple(t.double() for t in batch)
    grads = torch.autograd.grad(loss_fn(model, double_batch), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    size = flat.numel()
    columns = []
    for first in range(0, size, 512):
        units = torch.eye(size, dtype=torch.float64)[first : first + 512]
        rows = torch.autograd.grad(flat, params, units, retain_graph=True, is_grads_batched=True)
        columns.append(torch.cat([r.reshape(len(units), -1) for r in rows], dim=1))
    hessian = torch.cat(columns)
    model.float()
    return torch.linalg.eigvalsh((hessian + hessian.T) / 2)


def densities(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
              whole: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    basis.FULL_BASIS_ENTRIES = 1 << 62 if whole else 1
    out = spectral_density(model, loss_fn, batch, num_steps=STEPS, num_runs=RUNS,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    basis.FULL_BASIS_ENTRIES = 1 << 24
    return out.nodes.double(), out.weights.double()


def l1(a: torch.Tensor, b: torch.Tensor, grid: torch.Tensor) -> float:
    return float(torch.trapezoid((a - b).abs(), grid))


def main() -> None:
    torch.set_num_threads(1)
    print(f"{machine()}; load {load_average()}")
    batch = digits_dataset(1000).tensors
    states = trajectory(batch)
    print("\n| step | kernel (of the range) | L1 to exact, whole basis, per run (median) | two "
          "vectors | same start, whole vs two: median / max | 10-run mean to exact: whole "
          "| two | 10-run means, whole vs two |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for step in (800, 1500):
        model = DigitsRegressor(0.2)
        model.load_state_dict(states[step])
        spectrum = exact_spectrum(model, batch)
        found = {whole: densities(model, batch, whole) for whole in (True, False)}
        low, high = float(spectrum.min()), float(spectrum.max())
        for fraction in (0.01, 0.002):
            sigma = fraction * (high - low)
            grid = torch.linspace(low - 5 * sigma, high + 5 * sigma, 2048, dtype=torch.float64)
            flat = torch.full((1, spectrum.numel()), 1.0 / spectrum.numel(), dtype=torch.float64)
            truth = density_on_grid(spectrum[None, :], flat, grid, sigma=sigma)[1]
            per_run = {
                whole: [
                    density_on_grid(n, w, grid, sigma=sigma)[1]
                    for n, w in zip(*found[whole], strict=True)
                ]
                for whole in found
            }
            means = {whole: density_on_grid(*found[whole], grid, sigma=sigma)[1] for whole in found}
            to_truth = {w: statistics.median(l1(d, truth, grid) for d in per_run[w]) for w in found}
            pairs = [l1(a, b, grid) for a, b in zip(per_run[True], per_run[False], strict=True)]
            print(
                f"| {step} | {fraction:g} | {to_truth[True]:.3g} | {to_truth[False]:.3g} | "
                f"{statistics.median(pairs):.2g} / {max(pairs):.2g} | "
                f"{l1(means[True], truth, grid):.3g} | {l1(means[False], truth, grid):.3g} | "
                f"{l1(means[True], means[False], grid):.2g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
