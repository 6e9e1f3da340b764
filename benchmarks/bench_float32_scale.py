"""Float32 Lanczos at 10⁶-5·10⁷ parameters: the error of λ₁ on an operator with a known spectrum.

The operator is diagonal (``v -> d * v``): its products are exact in float32, so every error
left is Lanczos' own (its inner products, norms and reorthogonalisation over P entries). The
spectrum: outliers 10, 9, 8 over a bulk uniform in [0, 1] (an outlier above a bulk, as in
trained classifiers). Each configuration runs in a fresh process so its peak RSS is its own.

Modes:
  float64-accumulated: the library as it is (reductions in float64, a slice at a time);
  float32-accumulated: the same run with every reduction done in float32 (what the library
                       did before; monkeypatched here, for comparison only).

Run: python benchmarks/bench_float32_scale.py [--sizes 1000000 10000000 50000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

SPECTRUM_TOP = (10.0, 9.0, 8.0)


def _float32_inner_products(rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return (rows @ vector).to(torch.float64)


def run_one(size: int, mode: str, k: int, seed: int) -> dict[str, object]:
    from lightning_curvature.functional.linalg import basis, eigenpairs

    if mode == "float32-accumulated":
        basis.inner_products = _float32_inner_products  # type: ignore[assignment]
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(seed)
    diagonal = torch.rand(size, generator=generator)
    diagonal[: len(SPECTRUM_TOP)] = torch.tensor(SPECTRUM_TOP)
    start = torch.randn(size, generator=generator)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    begin = time.perf_counter()
    out = eigenpairs.lanczos_eigenpairs(
        lambda v: diagonal * v, start, k=k, tol=1e-3, max_iter=30, generator=generator
    )
    seconds = time.perf_counter() - begin
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact = torch.tensor(SPECTRUM_TOP[:k], dtype=torch.float64)
    return {
        "size": size,
        "mode": mode,
        "k": k,
        "seed": seed,
        "relative_error": float(((out.eigenvalues - exact).abs() / exact).max()),
        "converged": bool(out.converged.all()),
        "hvps": out.num_steps,
        "seconds": seconds,
        "extra_peak_mib": (peak - before) / 1024,
        "vector_mib": size * 4 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**6, 10**7, 5 * 10**7])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--one", type=str, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size, mode, k, seed = json.loads(args.one)
        print(json.dumps(run_one(size, mode, k, seed)))
        return
    print(f"torch {torch.__version__}, 1 thread; diagonal operator, top {SPECTRUM_TOP} + U[0, 1]")
    print()
    print(
        "| P | reductions | seed | λ₁..λ_k max rel. error | converged | HVPs | seconds "
        "| extra peak RSS (MiB) | one vector (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for mode in ("float64-accumulated", "float32-accumulated"):
            for seed in range(args.seeds):
                spec = json.dumps([size, mode, args.k, seed])
                done = subprocess.run(
                    [sys.executable, __file__, "--one", spec],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"| {size:.0e} | {mode} | {seed} | {r['relative_error']:.1e} "
                    f"| {r['converged']} | {r['hvps']} | {r['seconds']:.2f} "
                    f"| {r['extra_peak_mib']:.0f} | {r['vector_mib']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
