"""Thick-restarted Lanczos: products and certificates against the whole basis (issue 23, 1).

A run that returns Ritz vectors (a monitor's warm start, the top k > 1) above
``FULL_BASIS_ENTRIES`` holds at most ``thick_restart``'s rows: the basis stays bounded
whatever the number of products, and the question is what the restarts cost in products and
whether any certificate goes wrong. Measured here, from random starts to
``MISS_PROBABILITY`` (cold) and from the previous warm start (warm):

* synthetic edge-of-stability spectra (``bench_certificate.py``'s: a top pair at
  λ₂/λ₁ = 0.98 and 0.995 over a decaying cluster, n = 2000, float32), k = 1 and 3, for the
  whole basis and 2(k + 1) + 4, 2(k + 1) + 6 (the default's fewest) and 16 rows: products
  (median / max over 20 starts), certificates more than tol off the truth, runs left
  uncertified; warm: a run from the cold run's ``warm_start`` summed, perturbed by 5 % in
  norm;
* which Ritz vectors to keep at a restart, at 10 rows (k = 1) and 14 (k = 3);
* the smallest eigenvalue at the end of a dense spectrum (spacing 10⁻², n = 300, k = 2,
  ``tol=1e-3``): the bottom Ritz vectors kept;
* the monitor's warm probes on the digits edge-of-stability run (``bench_certificate.py``'s
  states: GD at lr 0.2, every 10 steps from 800 to 1500; truth from ARPACK), with
  the default rows for k = 1 (10) against the whole basis: products and false certificates.

    OMP_NUM_THREADS=1 python benchmarks/bench_thick_restart.py    # about 4 min on 2 cores
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Iterator

import torch
from bench_certificate import loss_fn, trajectory, truth
from common import load_average, machine
from edge_of_stability import DigitsRegressor, digits_dataset

from lightning_curvature import hessian_eigenvalues
from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.linalg import basis
from lightning_curvature.functional.linalg.basis import THICK_ROOM, ThickRestart
from lightning_curvature.functional.linalg.eigenpairs import (
    MISS_PROBABILITY,
    default_max_iter,
    lanczos_eigenpairs,
)

TOL = 1e-3
SEEDS = 20


def edge_of_stability(n: int, ratio: float) -> torch.Tensor:
    j = torch.arange(n - 2, dtype=torch.float64)
    cluster = 0.97 * torch.exp(-j / 12) - 0.02
    return torch.cat([torch.tensor([1.0, ratio], dtype=torch.float64), cluster]).float()


def starts(n: int) -> Iterator[tuple[torch.Tensor, torch.Generator]]:
    for seed in range(SEEDS):
        generator = torch.Generator().manual_seed(seed)
        yield torch.randn(n, generator=generator), generator


def spread(values: list[int]) -> str:
    return f"{statistics.median(values):g} / {max(values)}"


def wrong(values: torch.Tensor, converged: torch.Tensor, truth: torch.Tensor) -> int:
    off = (values.double() - truth).abs() > TOL * truth.abs()
    return int((off & converged).sum())


def synthetic() -> None:
    print("\n### Edge-of-stability spectra, n = 2000, float32, 20 starts, tol = 1e-3\n")
    print("| λ₂/λ₁ | k | rows | cold products median / max | cold false | cold uncertified "
          "| warm products median / max | warm false |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    n = 2000
    for ratio in (0.98, 0.995):
        spectrum = edge_of_stability(n, ratio)

        def matvec(v: torch.Tensor, spectrum: torch.Tensor = spectrum) -> torch.Tensor:
            return spectrum * v

        for k in (1, 3):
            truth_k = spectrum.double().sort(descending=True).values[:k]
            least = 2 * (k + 1) + THICK_ROOM
            for rows in (None, least - 2, least, 16):
                cold, warm, false, warm_false, open_ = [], [], 0, 0, 0
                for start, generator in starts(n):
                    out = lanczos_eigenpairs(
                        matvec, start, k=k, tol=TOL,
                        max_iter=default_max_iter(k), miss_probability=MISS_PROBABILITY,
                        return_eigenvectors=True, rows=rows, generator=generator,
                    )  # fmt: skip
                    assert out.warm_start is not None
                    cold.append(out.num_steps)
                    false += wrong(out.eigenvalues, out.converged, truth_k)
                    open_ += int(not out.converged.all())
                    init = out.warm_start.sum(0)
                    noise = torch.randn(n, generator=generator)
                    init = init + 0.05 * init.norm() * noise / noise.norm()
                    again = lanczos_eigenpairs(
                        matvec, init, k=k, tol=TOL,
                        max_iter=default_max_iter(k), return_eigenvectors=True, rows=rows,
                    )  # fmt: skip
                    warm.append(again.num_steps)
                    warm_false += wrong(again.eigenvalues, again.converged, truth_k)
                print(f"| {ratio} | {k} | {rows or 'whole'} | {spread(cold)} | {false} | {open_} "
                      f"| {spread(warm)} | {warm_false} |", flush=True)  # fmt: skip


def forced(policy: ThickRestart) -> Callable[..., ThickRestart]:
    return lambda *args, **kwargs: policy


def kept() -> None:
    print("\n### Ritz vectors kept at a restart (λ₂/λ₁ = 0.98, cold, 20 starts)\n")
    print("| k | rows | top kept | products median / max |")
    print("|---|---|---|---|")
    n = 2000
    spectrum = edge_of_stability(n, 0.98)
    default = basis.thick_restart
    for k, rows in ((1, 10), (3, 14)):
        for top in sorted({k + 1, k + 2, rows // 2, rows - 3}):
            basis.thick_restart = forced(ThickRestart(rows, top))  # type: ignore[assignment]
            products = []
            for start, generator in starts(n):
                out = lanczos_eigenpairs(
                    lambda v: spectrum * v, start, k=k, tol=TOL, max_iter=default_max_iter(k),
                    miss_probability=MISS_PROBABILITY, return_eigenvectors=True, rows=rows,
                    generator=generator,
                )  # fmt: skip
                products.append(out.num_steps)
            basis.thick_restart = default
            mark = " (default)" if default(k, False, n, rows).top == top else ""
            print(f"| {k} | {rows} | {top}{mark} | {spread(products)} |", flush=True)


def dense_smallest() -> None:
    print("\n### The smallest at a dense end (spacing 1e-2, n = 300, k = 2, tol = 1e-3)\n")
    print("| rows | top / bottom kept | products | smallest certified | its miss bound |")
    print("|---|---|---|---|---|")
    n = 300
    spectrum = torch.cat([torch.linspace(-2.0, 1.0, n - 2), torch.tensor([3.0, 4.0])]).double()
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(5)))  # fmt: skip
    matrix = (q * spectrum) @ q.T
    default = basis.thick_restart
    for rows, policy in (
        (None, None),
        (10, ThickRestart(10, 3, 1)),
        (12, None),
        (14, None),
        (16, None),
    ):
        if policy is not None:
            basis.thick_restart = forced(policy)  # type: ignore[assignment]
        out = lanczos_eigenpairs(
            lambda v: matrix @ v, torch.randn(n, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(0)),
            k=2, smallest=True, tol=TOL, max_iter=200, miss_probability=MISS_PROBABILITY,
            return_eigenvectors=True, rows=rows,
        )  # fmt: skip
        basis.thick_restart = default
        chosen = policy or (default(2, True, n, rows) if rows else None)
        split = f"{chosen.top} / {chosen.bottom}" if chosen else "all"
        assert out.smallest is not None
        print(f"| {rows or 'whole'} | {split} | {out.num_steps} | {out.smallest.converged} "
              f"| {out.smallest.miss:.2g} |", flush=True)  # fmt: skip


def digits_chain() -> None:
    print("\n### The monitor's warm probes, digits edge of stability, every 10 steps\n")
    print("| basis | probes | products median / mean / max | where λ₂/λ₁ > 0.98 | false |")
    print("|---|---|---|---|---|")
    batch = digits_dataset(1000).tensors
    states = trajectory(batch)
    model = DigitsRegressor(0.2)
    results: dict[str, tuple[list[int], list[int], int]] = {}
    for held in ("whole", "thick"):
        # FULL_BASIS_ENTRIES 1: the default's fewest rows for k = 1 (10) on this small model
        basis.FULL_BASIS_ENTRIES = 1 if held == "thick" else 1 << 24
        previous, products, close, false = None, [], [], 0
        for step, state in states.items():
            model.load_state_dict(state)
            top, second = truth(model, batch, False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CurvatureWarning)
                out = hessian_eigenvalues(
                    model, loss_fn, batch, tol=TOL, init=previous, return_eigenvectors=True,
                    generator=torch.Generator().manual_seed(step),
                )  # fmt: skip
            if previous is not None:
                products.append(out.num_hvps)
                if second / top > 0.98:
                    close.append(out.num_hvps)
                value = float(out.eigenvalues[0])
                false += int(bool(out.converged[0]) and abs(value - top) > TOL * abs(value))
            previous = out.warm_start
        results[held] = (products, close, false)
    basis.FULL_BASIS_ENTRIES = 1 << 24
    for held, (products, close, false) in results.items():
        print(f"| {held} | {len(products)} | {statistics.median(products):g} / "
              f"{statistics.fmean(products):.2f} / {max(products)} | "
              f"{statistics.median(close):g} / {max(close)} | {false} |")  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    print(f"{machine()}; load {load_average()}")
    synthetic()
    kept()
    dense_smallest()
    digits_chain()


if __name__ == "__main__":
    main()
