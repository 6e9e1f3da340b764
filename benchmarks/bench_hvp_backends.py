"""The four Hessian-vector product backends on a 23M-parameter GPT-2, CPU, float32 (issue 14).

A transformers ``GPT2LMHeadModel`` random-initialised from a config (6 layers, width 512,
8 heads, vocabulary 8192, tied embeddings; no download), next-token loss on 2 sequences of
32 tokens, ``attn_implementation="sdpa"``. Each backend runs in a fresh subprocess (one
intra-op thread), so that its peak resident memory (``resource.getrusage`` ``ru_maxrss``,
which sees torch's allocations, unlike ``tracemalloc``) is its own:

* ``gradient``: one plain gradient (``torch.autograd.grad``), the unit of time;
* per backend: the operator's set-up (``retained_graph`` builds its gradient graph there),
  the minimum over ``--repeats`` products of the time per product, divided by the minimum
  of gradients timed between them in the same process (the machine's load changes between
  processes); the relative error of one product against the ``double_backward`` product
  on the same vector; then ``hessian_eigenvalues`` (``tol=1e-3``, the same start) and its
  λ₁'s error against the ``double_backward`` λ₁;
* the peak RSS over the model alone (built, one forward), for the product and for the
  eigenvalue run (which adds the Lanczos basis).

The double-backward backends run attention on the math kernel (the probe selects it; the
fused CPU kernel has no second derivative); ``finite_difference`` runs the fused kernel
training runs. The Lanczos basis: ``(max_iter + 1) × P`` floats preallocated before (the
default ``max_iter = 30 + 8k`` = 38 for k = 1), blocks of 8 rows allocated as the run goes
now (``functional/linalg/lanczos.py``), i.e. ``8·⌈(steps + 1)/8⌉ × P``.

    nice -n 10 python benchmarks/bench_hvp_backends.py  # 13 min on 2 shared cores
    nice -n 10 python benchmarks/bench_hvp_backends.py --skip-eigen  # products only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("double_backward", "retained_graph", "forward_over_reverse", "finite_difference")
CONFIG = {"vocab_size": 8192, "n_positions": 64, "n_embd": 512, "n_layer": 6, "n_head": 8}
BATCH, LENGTH, BLOCK = 2, 32, 8


def _build() -> tuple[torch.nn.Module, torch.Tensor]:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        **CONFIG, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, LENGTH),
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    return model, ids


def loss_fn(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker(backend: str, repeats: int, skip_eigen: bool) -> dict[str, Any]:
    from lightning_curvature.functional import hessian_eigenvalues
    from lightning_curvature.functional.operator.operator import HessianOperator

    torch.set_num_threads(1)
    model, ids = _build()
    params = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() for p in params)
    with torch.no_grad():
        loss_fn(model, ids)
    base = _peak_mib()
    out: dict[str, Any] = {"backend": backend, "parameters": size}
    if backend == "gradient":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.autograd.grad(loss_fn(model, ids), params)
            times.append(time.perf_counter() - start)
        out.update(seconds=min(times), peak_mib=_peak_mib() - base)
        return out
    v = torch.randn(size, generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    with HessianOperator(model, loss_fn, ids, backend=backend) as operator:  # type: ignore[arg-type]
        setup = time.perf_counter() - start
        times, gradients, product = [], [], None
        for _ in range(repeats):  # interleaved with gradients: the ratio sees the same load
            start = time.perf_counter()
            product = operator.matvec(v)
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.autograd.grad(loss_fn(model, ids), params)
            gradients.append(time.perf_counter() - start)
    out.update(setup=setup, seconds=min(times), gradient_seconds=min(gradients),
               peak_mib=_peak_mib() - base)  # fmt: skip
    torch.save(product, f"/tmp/bench_hvp_backends_{backend}.pt")
    if skip_eigen:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        result = hessian_eigenvalues(model, loss_fn, ids, tol=1e-3, backend=backend,  # type: ignore[arg-type]
                                     generator=torch.Generator().manual_seed(3))  # fmt: skip
        out["eig_seconds"] = time.perf_counter() - start
    out.update(
        top=float(result.eigenvalues[0]),
        converged=bool(result.converged[0]),
        hvps=result.num_hvps,
        eig_peak_mib=_peak_mib() - base,
    )
    return out


def _run(backend: str, repeats: int, skip_eigen: bool) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--skip-eigen"] if skip_eigen else []
    done = subprocess.run(
        [sys.executable, __file__, "--worker", backend, "--repeats", str(repeats), *flags],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-eigen", action="store_true", help="products only (~2 min)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.repeats, args.skip_eigen)))
        return
    started, load = time.time(), os.getloadavg()
    rows = {name: _run(name, args.repeats, args.skip_eigen) for name in ("gradient", *BACKENDS)}
    gradient = rows["gradient"]
    size = gradient["parameters"]
    reference = torch.load("/tmp/bench_hvp_backends_double_backward.pt")
    print(f"GPT-2 {CONFIG}, batch {BATCH}x{LENGTH}, P = {size:,}, float32, 1 thread, "
          f"torch {torch.__version__}; load {' '.join(f'{x:.1f}' for x in load)}\n")  # fmt: skip
    print(f"one gradient: {gradient['seconds']:.3f} s, peak RSS +{gradient['peak_mib']:.0f} MiB "
          "over the model\n")  # fmt: skip
    print("| backend | set-up s | s / HVP | s / gradient (same process) | HVP / gradient "
          "| HVP peak RSS MiB | HVP rel. error |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in BACKENDS:
        row = rows[name]
        product = torch.load(f"/tmp/bench_hvp_backends_{name}.pt")
        error = float((product - reference).norm() / reference.norm())
        print(
            f"| {name} | {row['setup']:.2f} | {row['seconds']:.3f} | "
            f"{row['gradient_seconds']:.3f} | {row['seconds'] / row['gradient_seconds']:.2f}x | "
            f"{row['peak_mib']:.0f} | {error:.1e} |"
        )
    if args.skip_eigen:
        return
    top = rows["double_backward"]["top"]
    print("\n| backend | λ₁ | λ₁ rel. error | HVPs | eigen s | eigen peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name in BACKENDS:
        row = rows[name]
        print(
            f"| {name} | {row['top']:.5g}{'' if row['converged'] else ' (not certified)'} | "
            f"{abs(row['top'] - top) / abs(top):.1e} | {row['hvps']} | {row['eig_seconds']:.1f} | "
            f"{row['eig_peak_mib']:.0f} |"
        )
    gib = 4 * size / 2**30
    steps = [rows[name]["hvps"] for name in BACKENDS]
    now = [BLOCK * math.ceil((s + 1) / BLOCK) for s in steps]
    print(f"\nLanczos basis (float32, P = {size:,}): before (max_iter + 1) x P = 39 x P = "
          f"{39 * gib:.2f} GiB; now 8·⌈(steps + 1)/8⌉ x P for the runs above "
          f"({min(steps)}-{max(steps)} steps): {min(now)}-{max(now)} rows, "
          f"{min(now) * gib:.2f}-{max(now) * gib:.2f} GiB")  # fmt: skip
    end = os.getloadavg()
    print(f"\n{time.time() - started:.0f} s; load at the end {' '.join(f'{x:.1f}' for x in end)}")


if __name__ == "__main__":
    main()
