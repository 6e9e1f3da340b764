"""Lanczos' own cost per step, without the product (issue 23, point 2).

A diagonal float32 operator (``d * v``: one pass, timed and subtracted) at ``P`` entries;
30 steps of :class:`~lightning_curvature.functional.linalg.lanczos.LanczosProcess` with the
window of two rows (``keep=2``, what a λ₁ probe above 2²⁴ basis entries runs) and with the
whole basis. Reported: the process's own milliseconds per step (minimum and median over
repeats), and the same in "reductions", the time of one ``inner_products(v, v)`` over ``P``
entries (the unit of a pass over memory). With ``--compare PATH``, the Lanczos of another
checkout (its ``lanczos.py``, ``basis.py`` and ``reductions.py``) runs in the same process,
interleaved, on the same starts (before/after).

    OMP_NUM_THREADS=1 python benchmarks/bench_lanczos_step.py [--sizes 1000000 10000000] \\
        [--compare /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import load_average, machine, summary  # noqa: E402

from lightning_curvature.functional.linalg.reductions import inner_products  # noqa: E402

STEPS = 30


def load_lanczos(checkout: Path) -> ModuleType:
    """``functional/linalg/lanczos.py`` of ``checkout``, with the package modules it imports.

    The package is imported afresh from ``checkout`` (the modules already loaded are set
    aside and put back), so that each version runs its own ``basis.py`` and ``reductions.py``.
    """
    package = "lightning_curvature"

    def loaded() -> dict[str, ModuleType]:
        return {k: m for k, m in sys.modules.items() if k == package or k.startswith(package + ".")}

    aside = loaded()
    for key in aside:
        del sys.modules[key]
    sys.path.insert(0, str(checkout))
    try:
        return importlib.import_module(f"{package}.functional.linalg.lanczos")
    finally:
        sys.path.remove(str(checkout))
        for key in loaded():
            del sys.modules[key]
        sys.modules.update(aside)


def own_seconds(module: ModuleType, diagonal: torch.Tensor, keep: int | None, seed: int) -> float:
    """Seconds per step of one run, less its products."""
    spent = [0.0]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = diagonal * v
        spent[0] += time.perf_counter() - start
        return out

    start_vector = torch.randn(diagonal.numel(), generator=torch.Generator().manual_seed(seed))
    run = module.LanczosProcess(matvec, start_vector, STEPS, keep=keep)
    started = time.perf_counter()
    while run.step():
        pass
    return (time.perf_counter() - started - spent[0]) / run.num_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**6, 10**7])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--compare", type=Path, help="another checkout, run interleaved")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load = time.perf_counter(), load_average()
    print(machine())
    versions = {"this checkout": load_lanczos(ROOT)}
    if args.compare:
        versions[f"{args.compare}"] = load_lanczos(args.compare.resolve())
    print("\n| P | basis | version | own ms/step, min | median | in reductions (min) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        diagonal = torch.rand(size, generator=torch.Generator().manual_seed(0))
        diagonal[:3] += 2.0  # a separated top
        vector = torch.randn(size)
        reduction = min(
            timed_reduction(vector) for _ in range(max(3, args.repeats))
        )  # fmt: skip
        for keep in (2, None):
            repeats = args.repeats if keep else max(3, args.repeats // 3)
            seconds: dict[str, list[float]] = {name: [] for name in versions}
            for seed in range(repeats):
                for name, module in versions.items():  # interleaved
                    seconds[name].append(own_seconds(module, diagonal, keep, seed))
            for name, values in seconds.items():
                basis = "two rows" if keep else "whole"
                print(
                    f"| {size:.0e} | {basis} | {name} | {1e3 * min(values):.2f} "
                    f"| {1e3 * statistics.median(values):.2f} | {min(values) / reduction:.1f} |",
                    flush=True,
                )
    print("\n" + summary(started, load))


def timed_reduction(vector: torch.Tensor) -> float:
    start = time.perf_counter()
    inner_products(vector, vector)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
