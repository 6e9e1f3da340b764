"""Peak memory and cost of one probe at 10⁶ and 10⁷ parameters, in gradients (issue 23).

The model is a deep tanh MLP (width ``w``, ``depth`` square hidden layers, 2 classes) sized
to the parameter count asked for, on a fixed batch of 256 random examples (2 classes). Each
measurement runs in a fresh process with one intra-op thread, so that its peak resident
memory (``resource.getrusage`` ``ru_maxrss``, which sees torch's allocations, unlike
``tracemalloc``) is its own; the baseline is the peak after the model was built and ran
one forward pass. Measured:

* ``gradient``: one plain gradient (``torch.autograd.grad``), the unit of memory (its peak
  increment) and of time (the minimum of three);
* ``product``: one Hessian-vector product through ``hessian_vector_product``;
* ``trace``: ``hessian_trace(num_hvps=16)`` (Hutchinson, Rademacher probes);
* ``lambda1``: ``hessian_eigenvalues(k=1)`` at its defaults (cold, ``tol=1e-3``),
  with its products, its seconds and ``λ₁``;
* ``eigenvectors``: the same with ``return_eigenvectors=True`` (a monitor's cold probe, the
  one that keeps a warm start), and ``top3``: ``k=3`` with eigenvectors. Above
  ``FULL_BASIS_ENTRIES`` both hold at most ``thick_restart``'s rows; ``--whole-basis``
  measures them keeping the whole basis instead (as before thick restarts);
* ``density``: ``spectral_density`` at its defaults (80 steps, one run): above
  ``FULL_BASIS_ENTRIES`` on two vectors (``--whole-basis``: on the whole basis);
* the peers' top 3 with eigenvectors, for ``top3``: PyHessian 0.1's ``eigenvalues(top_n=3)``
  at its defaults (power iteration with deflation), hessian-eigenthings 1.0.0a5's
  ``lanczos(k=3, which="LA")`` at its defaults, and scipy's ``eigsh(k=3, which="LA")`` on
  curvlinops 3.0.1's ``HessianLinearOperator`` (``--modes pyhessian_top3 eigenthings_top3
  eigsh_top3``, in a venv that has them).

Each row gives the peak increment in MiB, as a multiple of the gradient's and in vectors
of ``P`` float32 entries (the gradient's own increment moves by a few MiB from process to
process: the vectors are the steadier unit), its seconds, and, for ``lambda1``, the
Lanczos process's own seconds per step (each ``LanczosProcess.step`` less the product it
takes: reorthogonalisation, norms, the step's allocations) in gradients.

    OMP_NUM_THREADS=1 python benchmarks/bench_probe_memory.py [--sizes 1000000 10000000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# this checkout's package, not an installed one (a script's own folder leads sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH, INPUTS, CLASSES = 256, 256, 2
MODES = ("gradient", "product", "trace", "lambda1", "eigenvectors", "top3", "density")
#: The peers' top 3 (run with a Python that has them, e.g. the venv of benchmarks/README.md)
PEERS = ("pyhessian_top3", "eigenthings_top3", "eigsh_top3")


def _mlp(size: int) -> nn.Module:
    """A tanh MLP (an input layer, 3 square hidden ones, an output) of about ``size`` parameters."""
    depth = 4
    linear = INPUTS + CLASSES + depth  # the width's coefficient: 3 w² + linear·w ≈ size
    width = int((-linear + math.sqrt(linear**2 + 4 * (depth - 1) * size)) / (2 * (depth - 1)))
    layers: list[nn.Module] = [nn.Linear(INPUTS, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, CLASSES))
    torch.manual_seed(0)
    return nn.Sequential(*layers)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _probe(mode: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    from lightning_curvature import hessian_eigenvalues, hessian_trace, spectral_density
    from lightning_curvature.functional.operator.hvp import hessian_vector_product

    params = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, Any] = {}
    start = time.perf_counter()
    if mode == "gradient":
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.autograd.grad(_loss(model, batch), params)
            times.append(time.perf_counter() - start)
        out["seconds"] = min(times)
    elif mode == "product":
        vector = torch.randn(sum(p.numel() for p in params), generator=torch.Generator())
        hessian_vector_product(model, _loss, batch, vector)
        out.update(seconds=time.perf_counter() - start, products=1)
    elif mode == "density":
        esd = spectral_density(model, _loss, batch)
        out.update(seconds=time.perf_counter() - start, products=esd.num_hvps)
    elif mode in PEERS:
        out.update(_peer_top3(mode, model, batch))
        out["seconds"] = time.perf_counter() - start
    elif mode == "trace":
        trace = hessian_trace(model, _loss, batch, num_hvps=16)
        out.update(seconds=time.perf_counter() - start, products=trace.num_hvps)
    else:
        keywords = {
            "lambda1": {},
            "eigenvectors": {"return_eigenvectors": True},
            "top3": {"k": 3, "return_eigenvectors": True},
        }[mode]
        with _timed_steps() as own:
            found = hessian_eigenvalues(model, _loss, batch, **keywords)  # type: ignore[arg-type]
        out.update(seconds=time.perf_counter() - start, products=found.num_hvps)
        out.update(lambda1=float(found.eigenvalues[0]), converged=bool(found.converged.all()))
        out["lanczos_seconds"] = own["step"] - own["matvec"]
    return out


def _peer_top3(
    mode: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    """A peer's top three eigenvalues with their eigenvectors (imported here, in its venv).

    Its draws from the global generator are undone after it: the warm-up's must not change
    the weights of the model built next (``_mlp`` seeds after building its layers).
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)  # PyHessian draws its starts from the global generator
        return _peer_run(mode, model, batch)


def _peer_run(
    mode: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    if mode == "pyhessian_top3":
        from pyhessian import hessian

        values, _ = hessian(model, torch.nn.CrossEntropyLoss(), data=batch, cuda=False).eigenvalues(
            top_n=3
        )
        return {"lambda1": max(values), "converged": True}
    if mode == "eigenthings_top3":
        import hessian_eigenthings

        operator = hessian_eigenthings.HessianOperator(model, [batch], _loss)
        found = hessian_eigenthings.lanczos(operator, k=3, which="LA", seed=0)
        return {"lambda1": float(found.eigenvalues.max()), "converged": True}
    import curvlinops
    from scipy.sparse.linalg import eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    operator = curvlinops.HessianLinearOperator(
        model, torch.nn.CrossEntropyLoss(), params, [batch], check_deterministic=False
    ).to_scipy()
    values = eigsh(operator, k=3, which="LA", return_eigenvectors=True)[0]
    return {"lambda1": float(values.max()), "converged": True}


@contextlib.contextmanager
def _timed_steps() -> Iterator[dict[str, float]]:
    """Seconds spent in ``LanczosProcess.step`` and in the products it took (patched)."""
    from lightning_curvature.functional.linalg.lanczos import LanczosProcess

    spent = {"step": 0.0, "matvec": 0.0}
    step = LanczosProcess.step

    def timed_step(run: LanczosProcess) -> bool:
        matvec = run.matvec

        def timed_matvec(vector: torch.Tensor) -> torch.Tensor:
            begin = time.perf_counter()
            product = matvec(vector)
            spent["matvec"] += time.perf_counter() - begin
            return product

        run.matvec = timed_matvec
        begin = time.perf_counter()
        try:
            return step(run)
        finally:
            spent["step"] += time.perf_counter() - begin
            run.matvec = matvec

    LanczosProcess.step = timed_step  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        LanczosProcess.step = step  # type: ignore[method-assign]


def _worker(mode: str, size: int, whole_basis: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    if whole_basis:
        from lightning_curvature.functional.linalg import basis

        basis.FULL_BASIS_ENTRIES = 1 << 62
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(BATCH, INPUTS, generator=generator)
    batch = (inputs, torch.randint(0, CLASSES, (BATCH,), generator=generator))
    _probe(mode, _mlp(10_000), batch)  # warm-up: the code paths' own memory is not the probe's
    model = _mlp(size)
    with torch.no_grad():
        _loss(model, batch)
    base = _peak_mib()
    out = {"mode": mode, "parameters": sum(p.numel() for p in model.parameters())}
    out.update(_probe(mode, model, batch))
    out["peak_mib"] = _peak_mib() - base
    return out


def _run(mode: str, size: int, whole_basis: bool) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps([mode, size, whole_basis])],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**6, 10**7])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES + PEERS)
    parser.add_argument("--whole-basis", action="store_true", help="no thick restart")
    parser.add_argument("--one", type=str, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_worker(*json.loads(args.one))))
        return
    basis = "the whole basis" if args.whole_basis else "thick restarts above FULL_BASIS_ENTRIES"
    print(f"torch {torch.__version__}, 1 thread; tanh MLP, batch {BATCH}; {basis}")
    print()
    print("| P | probe | peak RSS increment (MiB) | × gradient | vectors | products | seconds "
          "| gradients | Lanczos' own s/step (gradients) | λ₁ |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        unit = _run("gradient", size, args.whole_basis)
        others = [mode for mode in args.modes if mode != "gradient"]
        rows = [unit] + [_run(mode, size, args.whole_basis) for mode in others]
        for r in rows:
            vector_mib = r["parameters"] * 4 / 2**20
            value, own = "", ""
            if "lambda1" in r:
                value = f"{r['lambda1']:.6g}" + ("" if r["converged"] else " (not converged)")
            if "lanczos_seconds" in r:
                step = r["lanczos_seconds"] / r["products"]
                own = f"{step:.4f} ({step / unit['seconds']:.2f})"
            print(
                f"| {r['parameters']:.2e} | {r['mode']} | {r['peak_mib']:.0f} "
                f"| {r['peak_mib'] / unit['peak_mib']:.1f} | {r['peak_mib'] / vector_mib:.1f} "
                f"| {r.get('products', '')} | {r['seconds']:.3f} "
                f"| {r['seconds'] / unit['seconds']:.1f} | {own} | {value} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
