"""Is ``converged=True`` true at the edge of stability? False certificates and their cost.

A cold Lanczos run (random start) certifies its top Ritz value once the error bound passes;
the bound says the value is near *an* eigenvalue, not the largest. The old rule added a guard
(the Ritz value below the top k converged too); the new one goes on until the chance that the
random start missed a larger eigenvalue is at most ``δ`` (``functional/linalg/missed.py``).
This script counts, over many random starts, the runs that returned ``converged=True`` more
than ``tol`` off λ₁ (``|θ₁ − λ₁| > tol·|θ₁|``), and the products each rule used:

1. A synthetic diagonal operator, n = 500, shaped like the edge-of-stability Hessians (a top
   pair λ₂/λ₁ = 0.98, 0.995, 0.999 over a smoothly decaying cluster
   ``0.97·exp(−j/12) − 0.02``), and an easy one (the pair over a bulk uniform in [0, 0.9]);
   float64, ``lanczos_eigenpairs(tol=1e-3, max_iter=default_max_iter(1))`` (50). A
   Gaussian start makes Lanczos on ``QΛQᵀ`` the same in law as on ``Λ``: diagonal is general.
2. The digits edge-of-stability run (examples/edge_of_stability.py: full-batch GD, lr 0.2,
   1000 examples, MSE, tanh MLP 64-64-64-10, P = 8970), every 10 steps from 800 to 1500:
   cold ``hessian_eigenvalues(tol=1e-3)`` (float32, as the monitors run) from ``--seeds``
   random starts per step; and the monitor's warm probes, each started from the previous
   probe's ``warm_start`` (every 10 and every 50 steps). Truth: ARPACK (scipy ``eigsh``) on
   the float64 Hessian product, ``tol=1e-13``; ``--dense`` also checks it against
   ``eigvalsh`` of the dense float64 Hessian at three steps (about 4 min each).

``--bounded`` runs every cold run (the warm probes return eigenvectors: whole basis) with
``bounded=True``: the Lanczos that keeps only its last two basis vectors, which the library
picks by itself only above ``FULL_BASIS_ENTRIES`` (``P ≈ 1.3·10⁶``), checked here where the
truth is known.

    python benchmarks/bench_certificate.py             # about 15 min on 2 shared cores
    python benchmarks/bench_certificate.py --seeds 3 --synthetic-seeds 50   # a quick look
    python benchmarks/bench_certificate.py --seeds 3 --synthetic-seeds 50 --bounded
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import load_average, machine, summary
from scipy.sparse.linalg import LinearOperator, eigsh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from edge_of_stability import DigitsRegressor, digits_dataset

import lightning_curvature.functional.eigenvalues as model_level
from lightning_curvature import hessian_eigenvalues
from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.linalg.eigenpairs import (
    MISS_PROBABILITY,
    default_max_iter,
    lanczos_eigenpairs,
)

TOL = 1e-3
LIBRARY = model_level.lanczos_eigenpairs
# rule name -> the miss_probability a random start is run with (None: the old guard)
RULES: dict[str, float | None] = {"old (guard)": None, "new, δ = 1e-2": 1e-2}
RULES |= {"new, δ = 1e-3": 1e-3, "new, δ = 1e-4": 1e-4}
Batch = tuple[torch.Tensor, torch.Tensor]
BOUNDED: dict[str, bool | None] = {"bounded": None}  # --bounded: True in every cold run


def library_rule(miss: float | None) -> Callable[..., Any]:
    """``lanczos_eigenpairs`` with a random start's ``miss_probability`` replaced."""

    @functools.wraps(LIBRARY)
    def patched(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("miss_probability") is not None:
            kwargs["miss_probability"] = miss
        if not kwargs.get("return_eigenvectors"):
            kwargs["bounded"] = BOUNDED["bounded"]
        return LIBRARY(*args, **kwargs)

    return patched


def wrong(value: float, truth: float) -> bool:
    """A certificate more than ``tol`` off λ₁."""
    return abs(value - truth) > TOL * abs(value)


def table(title: str, rows: dict[tuple[str, str], list[tuple[int, bool, float]]]) -> None:
    """One markdown table: per case and rule, certificates, false ones, products."""
    print(f"\n### {title}\n")
    print("| case | rule | runs | certified | false certificates | worst certified error |"
          " products median | max |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for (case, rule), runs in rows.items():
        products = [p for p, _, _ in runs]
        certified = [e for _, c, e in runs if c]
        false = sum(e > TOL for e in certified)
        worst = f"{max(certified):.1e}" if certified else "–"
        print(f"| {case} | {rule} | {len(runs)} | {len(certified)} | {false} | {worst} | "
              f"{statistics.median(products):g} | {max(products)} |")  # fmt: skip


# -- 1. synthetic ---------------------------------------------------------------------------
def spectra(n: int = 500) -> Iterable[tuple[str, torch.Tensor]]:
    """The clustered (edge-of-stability-like) and the easy operator, per λ₂/λ₁."""
    j = torch.arange(n - 2, dtype=torch.float64)
    cluster = 0.97 * torch.exp(-j / 12) - 0.02
    bulk = 0.9 * torch.rand(n - 2, generator=torch.Generator().manual_seed(1000)).double()
    for ratio in (0.98, 0.995, 0.999):
        for name, rest in (("cluster", cluster), ("bulk", bulk)):
            yield f"{name}, λ₂/λ₁ = {ratio}", torch.cat([torch.tensor([1.0, ratio]), rest])


def synthetic(seeds: int) -> None:
    rows: dict[tuple[str, str], list[tuple[int, bool, float]]] = {}
    for case, spectrum in spectra():
        for rule, miss in RULES.items():
            for seed in range(seeds):
                generator = torch.Generator().manual_seed(seed)
                start = torch.randn(spectrum.numel(), generator=generator, dtype=torch.float64)
                out = lanczos_eigenpairs(
                    lambda v, s=spectrum: s * v,
                    start,
                    tol=TOL,
                    max_iter=default_max_iter(1),
                    generator=generator,
                    miss_probability=miss,
                    bounded=BOUNDED["bounded"],
                )
                value = float(out.eigenvalues[0])
                rows.setdefault((case, rule), []).append(
                    (out.num_steps, bool(out.converged[0]), abs(value - 1.0) / abs(value))
                )
    table(f"Synthetic operator, n = 500, {seeds} random starts each (float64)", rows)


# -- 2. digits at the edge of stability -----------------------------------------------------
def loss_fn(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return 0.5 * (model.net(x) - y).pow(2).sum(1).mean()  # type: ignore[operator]


def trajectory(batch: Batch) -> dict[int, dict[str, torch.Tensor]]:
    """The weights every 10 steps from 800 to 1500 of full-batch GD at lr 0.2."""
    torch.manual_seed(0)
    model = DigitsRegressor(0.2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    states = {}
    for step in range(1501):
        if step >= 800 and step % 10 == 0:
            states[step] = copy.deepcopy(model.state_dict())
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
    return states


def float64_product(model: DigitsRegressor, batch: Batch) -> tuple[Callable[..., Any], int]:
    """The float64 Hessian-vector product of the loss (numpy in, numpy out) and ``P``."""
    net = copy.deepcopy(model.net).double()
    params = {n: p.detach() for n, p in net.named_parameters()}
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    x, y = batch[0].double(), batch[1].double()

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = [c.reshape(s) for c, s in zip(flat.split(sizes), shapes, strict=True)]
        out = torch.func.functional_call(net, dict(zip(names, chunks, strict=True)), (x,))
        return 0.5 * (out - y).pow(2).sum(1).mean()

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    gradient = torch.func.grad(flat_loss)

    def product(v: Any) -> Any:
        vector = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
        return torch.func.jvp(gradient, (flat,), (vector,))[1]

    return product, sum(sizes)


def truth(model: DigitsRegressor, batch: Batch, dense: bool) -> tuple[float, float]:
    """λ₁ and λ₂ (ARPACK, float64); with ``dense``, checked against the dense Hessian."""
    product, size = float64_product(model, batch)
    operator = LinearOperator((size, size), matvec=lambda v: product(v).numpy(), dtype=np.float64)
    top = eigsh(operator, k=2, which="LA", tol=1e-13, ncv=40, v0=np.ones(size))[0]
    if dense:
        eye = torch.eye(size, dtype=torch.float64)
        columns = [torch.func.vmap(product)(eye[i : i + 256]) for i in range(0, size, 256)]
        hessian = torch.cat(columns)
        exact = torch.linalg.eigvalsh(0.5 * (hessian + hessian.T))[-2:].tolist()
        gap = max(abs(a - b) / abs(b) for a, b in zip(sorted(top), exact, strict=True))
        print(f"  dense check: eigvalsh {exact[::-1]}, ARPACK {sorted(top)[::-1]}, "
              f"largest relative difference {gap:.1e}")  # fmt: skip
    return float(top.max()), float(top.min())


def digits(seeds: int, dense: bool) -> None:
    batch = digits_dataset(1000).tensors
    states = trajectory(batch)
    model = DigitsRegressor(0.2)
    cold: dict[tuple[str, str], list[tuple[int, bool, float]]] = {}
    warm: dict[tuple[str, str], list[tuple[int, bool, float]]] = {}
    previous: dict[int, torch.Tensor] = {}
    dense_steps = {1300, 1410, 1500} if dense else set()
    print("\n| step | λ₁ | λ₂/λ₁ |\n|---|---|---|")
    for step, state in states.items():
        model.load_state_dict(state)
        top, second = truth(model, batch, step in dense_steps)
        regime = "λ₂/λ₁ > 0.98" if second / top > 0.98 else "λ₂/λ₁ ≤ 0.98"
        print(f"| {step} | {top:.6f} | {second / top:.4f} |")
        for rule, miss in RULES.items():
            model_level.lanczos_eigenpairs = library_rule(miss)  # type: ignore[assignment]
            for seed in range(seeds):
                out = hessian_eigenvalues(
                    model, loss_fn, batch, tol=TOL, generator=torch.Generator().manual_seed(seed)
                )
                value = float(out.eigenvalues[0])
                cold.setdefault((regime, rule), []).append(
                    (out.num_hvps, bool(out.converged[0]), abs(value - top) / abs(value))
                )
        model_level.lanczos_eigenpairs = LIBRARY  # type: ignore[assignment]
        for every in (10, 50):
            if step % every:
                continue
            out = hessian_eigenvalues(
                model,
                loss_fn,
                batch,
                tol=TOL,
                init=previous.get(every),
                return_eigenvectors=True,
                generator=torch.Generator().manual_seed(step),
            )
            assert out.warm_start is not None
            previous[every] = out.warm_start
            label = "cold (the first probe)" if step == 800 else f"warm, every {every} steps"
            value = float(out.eigenvalues[0])
            warm.setdefault((f"{regime}, {label}", "library"), []).append(
                (out.num_hvps, bool(out.converged[0]), abs(value - top) / abs(value))
            )
    table(f"Digits edge of stability, cold, {seeds} random starts per step (float32)", cold)
    table("Digits edge of stability, the monitor's warm probes (float32)", warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="cold starts per digits step")
    parser.add_argument("--synthetic-seeds", type=int, default=200)
    parser.add_argument("--dense", action="store_true", help="check the truth, ~12 min more")
    parser.add_argument("--bounded", action="store_true", help="cold runs keep two vectors")
    args = parser.parse_args()
    BOUNDED["bounded"] = True if args.bounded else None
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", CurvatureWarning)
    started, load = time.perf_counter(), load_average()
    print(f"Machine: {machine('lightning', 'scipy')}")
    print(f"Library miss probability: {MISS_PROBABILITY:g}; tol = {TOL:g}; "
          f"cold runs bounded: {args.bounded}")  # fmt: skip
    synthetic(args.synthetic_seeds)
    digits(args.seeds, args.dense)
    print(f"\n{summary(started, load)}")


if __name__ == "__main__":
    main()
