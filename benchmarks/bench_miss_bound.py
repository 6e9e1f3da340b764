"""Is the cold certificate's miss bound loose? Its polynomial against the best one (issue 23).

A cold run certifies λ₁ once ``√(2n/π)·‖p(A)b̂‖/|p(x₀)|`` is at most ``δ = 10⁻³``, with ``p``
the characteristic polynomial of the run's tridiagonal ``T_m`` and ``x₀ = θ₁ + tol·|θ₁|``
(``functional/linalg/missed.py``; van Dorsselaer, Hochstenbach & van der Vorst 2000). The
inequality ``|⟨b̂, v⟩|·|q(λ)| ≤ ‖q(A)b̂‖`` holds for *every* polynomial ``q`` of degree ≤ m;
the one that makes ``‖q(A)b̂‖/|q(x₀)|`` least is the kernel polynomial
``K(x) = Σ_{j≤m} φ_j(x₀)φ_j(x)`` of the orthonormal Lanczos polynomials ``φ_j`` (``φ_j(A)b̂ =
q_{j+1}``), giving ``1/√(Σ_j φ_j(x₀)²)`` (the Christoffel function, by its extremal
property; Gautschi, *Orthogonal Polynomials*, 2004). Every ``φ_j`` has its roots below
``θ₁`` (interlacing), so ``K`` grows past ``x₀`` and the bound covers the whole region above
it. The characteristic polynomial is
``φ_m`` alone: the gain is ``√(Σ φ_j²)/|φ_m|``. This script counts the products each bound
needs to reach ``δ`` from random starts on ``bench_certificate.py``'s synthetic spectra,
and, for scale, the first product whose θ₁ is within ``tol`` of λ₁ (the oracle) and the first
whose error bound ``min(r, r²/δ)`` passes ``tol`` (what a rule without the miss bound needs).

    python benchmarks/bench_miss_bound.py    # about 20 s
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from bench_certificate import spectra
from common import load_average, machine, summary

from lightning_curvature.functional.linalg.eigenpairs import _absolute_bounds
from lightning_curvature.functional.linalg.lanczos import LanczosProcess
from lightning_curvature.functional.linalg.missed import miss_probabilities

TOL, DELTA, SEEDS, BUDGET = 1e-3, 1e-3, 50, 60


def christoffel(run: LanczosProcess, x0: float) -> float:
    """``√(2n/π)/√(Σ_{j ≤ m} φ_j(x₀)²)``, the bound of the best polynomial of degree ≤ m."""
    betas = [*run.betas[: run.num_steps - 1], run.residual_norm]
    previous, current, total = 0.0, 1.0, 1.0
    for j, alpha in enumerate(run.alphas):
        before = betas[j - 1] if j else 0.0
        previous, current = current, ((x0 - alpha) * current - before * previous) / betas[j]
        total += current * current
    return math.sqrt(2 * run.size / math.pi) / math.sqrt(total)


def main() -> None:
    torch.set_num_threads(1)
    started, load = time.perf_counter(), load_average()
    print(f"Machine: {machine()}")
    print(f"\n### Products until the miss bound is ≤ {DELTA:g} ({SEEDS} random starts each)\n")
    print("| spectrum | oracle median | error bound ≤ tol median | characteristic polynomial "
          "(the library) median / max | best polynomial median / max | products saved in "
          "all |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, spectrum in spectra():
        library, best, oracle, passed = [], [], [], []
        for seed in range(SEEDS):
            start = torch.randn(spectrum.numel(), generator=torch.Generator().manual_seed(seed))
            run = LanczosProcess(lambda v, s=spectrum: s * v, start.double(), BUDGET)
            reached: dict[str, int] = {}
            while run.step() and len(reached) < 4:
                values, _, residuals = run.ritz()
                theta = float(values[-1])
                if abs(theta - 1.0) <= TOL * theta:
                    reached.setdefault("oracle", run.num_steps)
                if float(_absolute_bounds(values, residuals)[-1]) <= TOL * theta:
                    reached.setdefault("bound", run.num_steps)
                x0 = float(values[-1]) * (1 + TOL)
                bounds = {"library": miss_probabilities(run, values, 1, TOL)[0][0]}
                bounds["best"] = christoffel(run, x0)
                for key, bound in bounds.items():
                    if bound <= DELTA:
                        reached.setdefault(key, run.num_steps)
            library.append(reached.get("library", BUDGET))
            best.append(reached.get("best", BUDGET))
            oracle.append(reached.get("oracle", BUDGET))
            passed.append(reached.get("bound", BUDGET))
        print(f"| {name} | {statistics.median(oracle):g} | {statistics.median(passed):g} | "
              f"{statistics.median(library):g} / {max(library)} | "
              f"{statistics.median(best):g} / {max(best)} | "
              f"{sum(library) - sum(best)} |")  # fmt: skip
    print(f"\n{summary(started, load)}")


if __name__ == "__main__":
    main()
