"""How often does Lanczos' stopping test stop on the wrong eigenvalue? (issue 2 follow-up)

``hessian_eigenvalues`` used to stop once the top Ritz value's bound ``min(r, r²/δ)/|θ₁|`` was
below ``tol`` (``δ``: distance to the next Ritz value) after ``min_iter=3`` products. A bound built
from Ritz values cannot see an eigenvalue the Krylov space has not found yet: from a random
start with a small component along the top eigenvector, θ₁ converges to λ₂ first, its
residual is small, and the test passes with θ₁ ≈ λ₂.

This script records full Lanczos runs (the library's ``LanczosProcess`` on the library's
``HessianOperator``) from many random starts and from warm starts (the previous state's top
eigenvector plus 1e-3 noise, as ``hessian_eigenvalues(init=...)`` builds it) at several
points of a training run, and replays candidate stopping rules on the recorded Ritz values:

* the rule before the guard (bound ≤ tol, at least 3 products);
* ``min_iter=6``: the same rule, trusted from 6 products on;
* ``guard``: also require the *second* Ritz value's bound (relative to |θ₁|) ≤ tol, the
  library's rule since this benchmark (``eigenpairs._next_one_converged``);
* ``residual``: ``r/|θ₁| ≤ tol`` alone (no gap);
* ``oracle``: the first product whose θ₁ is within ``tol`` of the truth, which no rule can
  beat (it bounds what any stopping rule, and so any warm start's saving, can reach).

For each it prints the products used and the true relative error of θ₁ (truth: a 40-step
Lanczos at tol=1e-8, accurate to ~1e-5 in fp32 on the CNN, to 1e-7 on the MLP).

    python benchmarks/bench_lanczos_stopping.py             # about 11 minutes on 2 cores
    python benchmarks/bench_lanczos_stopping.py --seeds 10  # about 6 minutes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Batch,
    digits,
    head,
    load_average,
    loss_fn,
    machine,
    make_cnn,
    make_mlp,
    minibatches,
    relative_error,
    summary,
    synthetic_images,
    train_sgd,
)

from lightning_curvature import CurvatureWarning, HessianOperator, hessian_eigenvalues
from lightning_curvature.functional.linalg.lanczos import LanczosProcess

TOL = 1e-3
MAX_STEPS = 16


@dataclass
class Step:
    """Ritz values (largest first) and their residual norms after one product."""

    values: list[float]
    residuals: list[float]


Trajectory = list[Step]
Rule = Callable[[Step, int, float], bool]  # (step, products so far, truth: the oracle's only)


def relative_bounds(step: Step) -> list[float]:
    """``min(r, r²/δ)/|θ₁|`` for every Ritz value, ``δ`` the distance to its neighbour less r."""
    values, residuals = step.values, step.residuals
    scale = max(abs(v) for v in values) or 1.0
    bounds = []
    for i, (value, residual) in enumerate(zip(values, residuals, strict=True)):
        others = [abs(value - v) for j, v in enumerate(values) if j != i]
        gap = min(others, default=float("inf")) - residual
        bounds.append((min(residual, residual**2 / gap) if gap > 0 else residual) / scale)
    return bounds


def _current(step: Step, n: int, truth: float, min_steps: int = 3) -> bool:
    return n >= min_steps and relative_bounds(step)[0] <= TOL


def _guard(step: Step, n: int, truth: float) -> bool:
    bounds = relative_bounds(step)
    return n >= 3 and bounds[0] <= TOL and (len(bounds) < 2 or bounds[1] <= TOL)


def _residual(step: Step, n: int, truth: float) -> bool:
    return n >= 3 and step.residuals[0] / abs(step.values[0]) <= TOL


def _oracle(step: Step, n: int, truth: float) -> bool:
    return relative_error(step.values[0], truth) <= TOL


RULES: dict[str, Rule] = {
    "bound ≤ tol, ≥ 3 HVPs (the rule before the guard)": _current,
    "same, trusted from 6 HVPs": lambda s, n, t: _current(s, n, t, 6),
    "guard: 2nd Ritz bound ≤ tol too (the library's rule)": _guard,
    "residual r/|θ₁| ≤ tol only": _residual,
    "oracle: first θ₁ within tol of the truth (a lower bound)": _oracle,
}


def trajectory(operator: HessianOperator, start: torch.Tensor) -> Trajectory:
    """All Ritz values and residuals of a ``MAX_STEPS``-step Lanczos run from ``start``."""
    run = LanczosProcess(operator.matvec, start, MAX_STEPS)
    steps: Trajectory = []
    while True:
        more = run.step()
        if run.num_steps > len(steps):  # a product was taken (also on a final breakdown)
            values, _, residuals = run.ritz()
            steps.append(Step(values.flip(0).tolist(), residuals.flip(0).tolist()))
        if not more:
            return steps


def replay(steps: Trajectory, rule: Rule, truth: float) -> tuple[int, float]:
    """Products used and true relative error of θ₁ where ``rule`` first stops."""
    for n, step in enumerate(steps, start=1):
        if rule(step, n, truth) or n == len(steps):
            return n, relative_error(step.values[0], truth)
    raise ValueError("empty trajectory")


def warm_start(previous: torch.Tensor, seed: int) -> torch.Tensor:
    """``v/‖v‖ + 1e-3·ξ/‖ξ‖``, the start ``hessian_eigenvalues(init=v)`` builds."""
    noise = torch.randn(previous.numel(), generator=torch.Generator().manual_seed(seed))
    return previous / previous.norm() + 1e-3 * noise / noise.norm()


def true_top(model: nn.Module, batch: Batch) -> tuple[float, torch.Tensor]:
    """Top eigenpair from a 40-step Lanczos at tol=1e-8.

    Its start is seeded apart from the replayed cold starts (seeds ``0 .. seeds-1``), so that
    a start which misses the top direction cannot also spoil the truth.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)
        found = hessian_eigenvalues(
            model,
            loss_fn,
            batch,
            tol=1e-8,
            min_iter=40,
            max_iter=40,
            return_eigenvectors=True,
            generator=torch.Generator().manual_seed(12345),
        )
    assert found.eigenvectors is not None
    return float(found.eigenvalues[0]), found.eigenvectors[0]


def record(name: str, seeds: int) -> dict[str, list[tuple[Trajectory, float]]]:
    """Cold and warm trajectories at three points of a training run, with their truth."""
    if name == "MLP":
        data, model, lr, warmup = digits(), make_mlp(), 0.05, 60
        probe = head(data, 512)
    else:
        data, model, lr, warmup = synthetic_images(4096), make_cnn(), 0.02, 50
        probe = head(data, 128)
    stream = minibatches(data, 128, seed=1)
    train_sgd(model, stream, warmup, lr)
    _, previous = true_top(model, probe)
    runs: dict[str, list[tuple[Trajectory, float]]] = {"cold": [], "warm": []}
    for steps in (20, 10, 30):
        train_sgd(model, stream, steps, lr)
        truth, vector = true_top(model, probe)
        with HessianOperator(model, loss_fn, probe) as operator:
            for seed in range(seeds):
                cold = torch.randn(operator.size, generator=torch.Generator().manual_seed(seed))
                runs["cold"].append((trajectory(operator, cold), truth))
                runs["warm"].append((trajectory(operator, warm_start(previous, seed)), truth))
        previous = vector
        print(f"[{name}] recorded {seeds} cold + {seeds} warm runs, {steps} steps on", flush=True)
    return runs


def table_rows(name: str, runs: dict[str, list[tuple[Trajectory, float]]]) -> list[str]:
    """One markdown row per start kind and rule."""
    rows = []
    for kind, trajectories in runs.items():
        for label, rule in RULES.items():
            stops = [replay(steps, rule, truth) for steps, truth in trajectories]
            hvps = [n for n, _ in stops]
            errors = [e for _, e in stops]
            wrong = sum(e > TOL for e in errors)
            rows.append(
                f"| {name} | {kind} | {label} | {statistics.median(hvps):.0f} | "
                f"{statistics.fmean(hvps):.1f} | {statistics.median(errors):.1e} | "
                f"{max(errors):.1e} | {wrong}/{len(errors)} |"
            )
    return rows


def main() -> None:
    """Record, replay and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="random starts per state")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), load_average()
    print(f"Machine: {machine('lightning')}", flush=True)
    rows = []
    for name in ("MLP", "CNN"):
        rows += table_rows(name, record(name, args.seeds))
    print(f"\n### Stopping rules at tol={TOL} ({args.seeds} starts × 3 training states)\n")
    print("| model | start | rule | HVPs median | HVPs mean | error median | error max | > tol |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{summary(started, load)}")


if __name__ == "__main__":
    main()
