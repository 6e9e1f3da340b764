"""The monitor's warm probes against two oracles at the edge of stability (issue 23, point 5).

A warm probe (``hessian_eigenvalues(init=previous.warm_start)``) stops once θ₁'s error bound
``min(r, r²/δ)`` passes *and* the Ritz value below it converged too (the guard; ``δ`` the
distance to the other Ritz values). Issue 23 asks for a rule within 1.3x of the oracle (the
first product whose θ₁ is within ``tol`` of λ₁). This script measures, on the digits
edge-of-stability run (``bench_certificate.py``'s states: GD at lr 0.2, every 10 steps from
800 to 1500, truth from ARPACK on the float64 product), for each of the monitor's probes:

* the products the library used and whether its ``converged=True`` was right;
* the oracle, from a 40-step run replayed from the same start vector;
* the Kato–Temple oracle: the first product at which θ₁'s residual proves it within ``tol``
  of λ₁ *given the true λ₂* (``θ₁ > λ₂`` and ``min(r, r²/(θ₁ − λ₂)) + floor ≤ tol·|θ₁|``;
  Temple 1928, Kato 1949): what a rule could certify if it knew the gap, which no rule
  does (the run has to find λ₂ first);
* the provable warm certificate: a warm start ``u + ε·ĝ`` (``ĝ`` a uniform unit vector, ``u``
  independent of it) has ``P(|⟨b, v⟩| ≤ t) ≤ √(2n/π)·t/ε`` for any fixed ``v`` (the law of
  ``⟨ĝ, v⟩`` is symmetric and unimodal, so shifting it by ``⟨u, v⟩`` only lowers the mass
  near 0) and ``‖b‖ ≤ 1 + ε``: ``functional/linalg/missed.py``'s bound times ``(1 + ε)/ε``
  is then a miss probability, as for a cold start. The first product at which it is
  ``≤ 10⁻³`` with θ₁'s bound passed, for the library's ``ε = 10⁻³`` and for ``ε = 0.3``.

Two starts: ``warm_start`` (the top k + 1 Ritz vectors summed, what the monitor keeps) and
the eigenvector alone; each start is also replayed under the guard loosened to 3·tol. Last,
the adversarial case: synthetic n = 500 spectra (those of ``bench_certificate.py`` plus a
well-separated pair), started at ``v₂`` plus the library's noise: how often the guard
certifies λ₂; and over 300 such runs, the guard loosened and the noise raised.

    python benchmarks/bench_warm_oracle.py    # about 5 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_certificate import loss_fn, spectra, trajectory, truth
from common import load_average, machine, summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from edge_of_stability import DigitsRegressor, digits_dataset

import lightning_curvature.functional.eigenvalues as model_level
import lightning_curvature.functional.linalg.eigenpairs as eigenpairs
from lightning_curvature import hessian_eigenvalues
from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.linalg.eigenpairs import _absolute_bounds, lanczos_eigenpairs
from lightning_curvature.functional.linalg.lanczos import LanczosProcess
from lightning_curvature.functional.linalg.missed import miss_probabilities

TOL = 1e-3
DELTA = 1e-3  # the miss probability a provable certificate is held to (the library's)
REPLAY = 40  # products of the replayed run (no oracle was later than 17)
LIBRARY = model_level.lanczos_eigenpairs
GUARD = eigenpairs._next_one_converged
LOOSE = 3.0  # the loosened guard replayed: the Ritz value below θ₁ converged to LOOSE·tol


@dataclass
class Probe:
    """One probe: what the library did, and its start replayed for ``REPLAY`` products."""

    ratio: float  # λ₂/λ₁
    products: int
    wrong: bool  # converged=True more than tol off λ₁
    oracle: int
    kato_temple: int
    certificate: int  # first product of the provable warm certificate (REPLAY + 1: never)
    loose: int  # where the guard at LOOSE·tol would have stopped this start
    loose_wrong: bool  # and whether θ₁ was more than tol off λ₁ there


def v2_start(seed: int, noise: float) -> tuple[torch.Tensor, torch.Generator]:
    """A start along ``v₂`` (the second axis of the diagonal spectra) plus ``noise`` of a
    random unit vector, and the generator that drew it (the run's restarts go on with it)."""
    generator = torch.Generator().manual_seed(seed)
    draw = torch.randn(500, generator=generator, dtype=torch.float64)
    start = torch.zeros(500, dtype=torch.float64)
    start[1] = 1.0
    return start + noise * draw / draw.norm(), generator


def first(flags: list[bool]) -> int:
    """The first product (1-based) whose flag is set; ``len + 1`` if none is."""
    return next((m for m, flag in enumerate(flags, 1) if flag), len(flags) + 1)


def replay(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, top: float,
           second: float, noise: float) -> tuple[int, int, int, int, bool]:  # fmt: skip
    """Oracle, Kato–Temple oracle, provable warm certificate and loosened guard of a start."""
    run = LanczosProcess(matvec, start.clone(), REPLAY)
    near, proved, certified, loose, thetas = [], [], [], [], []
    while True:
        more = run.step()
        values, _, residuals = run.ritz()
        theta, r = float(values[-1]), float(residuals[-1])
        thetas.append(theta)
        floor, reach = float(run.resolution(values)[-1]), TOL * abs(theta)
        near.append(abs(theta - top) <= reach)
        gap_bound = min(r, r * r / (theta - second)) if theta > second else r
        proved.append(gap_bound + floor <= reach)
        bound = float(_absolute_bounds(values, residuals)[-1])
        miss = miss_probabilities(run, values, 1, TOL)[0][0] * (1 + noise) / noise
        certified.append(bound + floor <= reach and miss <= DELTA)
        guarded = GUARD(run, values, residuals, 1, LOOSE * TOL)
        loose.append(run.num_steps >= 3 and bound + floor <= reach and guarded)
        if not more:
            break
    stop = first(loose)
    wrong = stop <= len(thetas) and abs(thetas[stop - 1] - top) > TOL * abs(thetas[stop - 1])
    return first(near), first(proved), first(certified), stop, wrong


def recording(top: float, second: float, noise: float, seen: dict[str, Any]) -> Any:
    """The library's ``lanczos_eigenpairs``, also replaying its start (into ``seen``)."""

    @functools.wraps(LIBRARY)
    def patched(matvec: Any, start: torch.Tensor, **kwargs: Any) -> Any:
        seen["replay"] = replay(matvec, start, top, second, noise)
        out = LIBRARY(matvec, start, **kwargs)
        seen["products"] = out.num_steps
        return out

    return patched


def chains(noise: float, starts: tuple[str, ...]) -> dict[tuple[str, int], list[Probe]]:
    """The monitor's warm probes every 10 and 50 steps, from each kind of start."""
    batch = digits_dataset(1000).tensors
    states = trajectory(batch)
    model = DigitsRegressor(0.2)
    model_level.WARM_NOISE = noise  # type: ignore[attr-defined]
    probes: dict[tuple[str, int], list[Probe]] = {}
    previous: dict[tuple[str, int], torch.Tensor] = {}
    for step, state in states.items():
        model.load_state_dict(state)
        top, second = truth(model, batch, False)
        for kind in starts:
            for every in (10, 50):
                if step % every:
                    continue
                seen: dict[str, Any] = {}
                model_level.lanczos_eigenpairs = recording(top, second, noise, seen)
                out = hessian_eigenvalues(
                    model, loss_fn, batch, tol=TOL, init=previous.get((kind, every)),
                    return_eigenvectors=True, generator=torch.Generator().manual_seed(step),
                )  # fmt: skip
                model_level.lanczos_eigenpairs = LIBRARY
                assert out.warm_start is not None
                assert out.eigenvectors is not None
                kept = out.warm_start if kind == "warm_start (k + 1)" else out.eigenvectors
                if (kind, every) not in previous:  # the first probe is cold
                    previous[kind, every] = kept
                    continue
                previous[kind, every] = kept
                value = float(out.eigenvalues[0])
                wrong = bool(out.converged[0]) and abs(value - top) > TOL * abs(value)
                probes.setdefault((kind, every), []).append(
                    Probe(second / top, seen["products"], wrong, *seen["replay"])
                )
    model_level.WARM_NOISE = 1e-3  # type: ignore[attr-defined]
    return probes


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} / {max(values):.3g}"


def table(probes: dict[tuple[str, int], list[Probe]], noise: float) -> None:
    print(f"\n### The monitor's warm probes (ε = {noise:g}), tol = {TOL:g}\n")
    print(
        "| start | every | λ₂/λ₁ | probes | products median / max | mean | oracle median | "
        "Kato–Temple oracle median | products / oracle, median / worst | products / "
        "Kato–Temple, median / worst | provable certificate median / max | false | guard at "
        f"{LOOSE:g}·tol (replayed) median / max | its false |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for (kind, every), rows in probes.items():
        for regime, keep in (("all", lambda p: True), ("> 0.98", lambda p: p.ratio > 0.98)):
            chosen = [p for p in rows if keep(p)]
            if not chosen:
                continue
            products = [float(p.products) for p in chosen]
            print(
                f"| {kind} | {every} | {regime} | {len(chosen)} | {spread(products)} | "
                f"{statistics.fmean(products):.2f} | "
                f"{statistics.median(p.oracle for p in chosen):g} | "
                f"{statistics.median(p.kato_temple for p in chosen):g} | "
                f"{spread([p.products / p.oracle for p in chosen])} | "
                f"{spread([p.products / p.kato_temple for p in chosen])} | "
                f"{spread([float(p.certificate) for p in chosen])} | "
                f"{sum(p.wrong for p in chosen)} | "
                f"{spread([float(p.loose) for p in chosen])} | "
                f"{sum(p.loose_wrong for p in chosen)} |"
            )


def adversarial(seeds: int) -> None:
    """Warm starts at ``v₂`` plus the library's noise: how often the guard certifies λ₂."""
    print(f"\n### A warm start at v₂ (plus 1e-3 noise), n = 500, {seeds} seeds each\n")
    print("| spectrum | products median / max | certified | λ₂ certified as λ₁ "
          "(|θ₁ − 1| > tol·θ₁) | worst certified error |")  # fmt: skip
    print("|---|---|---|---|---|")
    far = torch.rand(498, generator=torch.Generator().manual_seed(1000)).double() * 0.5
    cases = [*spectra(), ("far, λ₂/λ₁ = 0.9", torch.cat([torch.tensor([1.0, 0.9]), far]))]
    for name, spectrum in cases:
        runs = []
        for seed in range(seeds):
            start, generator = v2_start(seed, 1e-3)
            out = lanczos_eigenpairs(
                lambda v, s=spectrum: s * v, start, tol=TOL, max_iter=50, generator=generator
            )
            value = float(out.eigenvalues[0])
            runs.append((out.num_steps, bool(out.converged[0]), abs(value - 1) / abs(value)))
        errors = [e for _, c, e in runs if c]
        steps = [float(s) for s, _, _ in runs]
        print(f"| {name} | {spread(steps)} | {len(errors)} | {sum(e > TOL for e in errors)} | "
              f"{max(errors, default=0.0):.1e} |")  # fmt: skip


def guard_at(factor: float) -> Callable[..., bool]:
    """The library's guard with the Ritz value below θ₁ converged to ``factor·tol``."""

    def guard(run: Any, values: Any, residuals: Any, k: int, tol: float) -> bool:
        return GUARD(run, values, residuals, k, tol * factor)

    return guard


def gap_guard(fraction: float) -> Callable[..., bool]:
    """The guard, or the Ritz value below θ₁ converged to ``fraction`` of ``θ₁ − θ₂``."""

    def guard(run: Any, values: Any, residuals: Any, k: int, tol: float) -> bool:
        if GUARD(run, values, residuals, k, tol):
            return True
        if values.numel() <= k:
            return False
        below = values.numel() - 1 - k
        gap = float(values[below + 1] - values[below])
        return float(_absolute_bounds(values, residuals)[below]) <= fraction * gap

    return guard


def sweep(seeds: int) -> None:
    """The v₂ start over 300 cases: the guard loosened, and more noise in the start."""
    print(f"\n### A warm start at v₂ over 15 spectra x {seeds} seeds: the guard varied\n")
    print("| rule | noise ε | products mean | λ₂ certified as λ₁ | where |")
    print("|---|---|---|---|---|")
    j = torch.arange(498, dtype=torch.float64)
    uniform = torch.rand(498, generator=torch.Generator().manual_seed(1000)).double()
    rests = {"cluster": 0.97 * torch.exp(-j / 12) - 0.02, "bulk": 0.9 * uniform}
    rests["far"] = 0.5 * uniform
    variants = [("guard (the library)", 1.0, 1e-3), (f"guard at {LOOSE:g}·tol", LOOSE, 1e-3)]
    variants += [("guard at 10·tol", 10.0, 1e-3)]
    variants += [("guard (the library)", 1.0, noise) for noise in (1e-2, 0.1, 0.3)]
    variants += [(f"guard, or within {c:g}·(θ₁ − θ₂)", -c, 1e-3) for c in (0.05, 0.1, 0.25)]
    for label, factor, noise in variants:
        rule = guard_at(factor) if factor > 0 else gap_guard(-factor)
        eigenpairs._next_one_converged = rule
        steps, wrong = [], {}
        for name, rest in rests.items():
            for ratio in (0.5, 0.9, 0.98, 0.995, 0.999):
                spectrum = torch.cat([torch.tensor([1.0, ratio], dtype=torch.float64), rest])
                for seed in range(seeds):
                    start, generator = v2_start(seed, noise)
                    out = lanczos_eigenpairs(
                        lambda v, s=spectrum: s * v, start, tol=TOL, max_iter=50,
                        generator=generator,
                    )  # fmt: skip
                    value = float(out.eigenvalues[0])
                    steps.append(out.num_steps)
                    if bool(out.converged[0]) and abs(value - 1) > TOL * abs(value):
                        wrong[f"{name} {ratio}"] = wrong.get(f"{name} {ratio}", 0) + 1
        where = ", ".join(f"{case}: {count}" for case, count in wrong.items())
        print(f"| {label} | {noise:g} | {statistics.fmean(steps):.2f} | "
              f"{sum(wrong.values())} / {len(steps)} | {where} |")  # fmt: skip
    eigenpairs._next_one_converged = GUARD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic-seeds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", CurvatureWarning)
    started, load = time.perf_counter(), load_average()
    print(f"Machine: {machine('lightning', 'scipy')}")
    table(chains(1e-3, ("warm_start (k + 1)", "eigenvector")), 1e-3)
    table(chains(0.3, ("warm_start (k + 1)",)), 0.3)
    adversarial(args.synthetic_seeds)
    sweep(args.synthetic_seeds)
    print(f"\n{summary(started, load)}")


if __name__ == "__main__":
    main()
