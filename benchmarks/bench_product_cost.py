"""Time of one retained-graph Hessian-vector product against PyHessian's (issue 23).

Both take ``H v`` by one backward through a gradient graph built once with
``create_graph=True``: PyHessian's ``hessian_vector_product(gradsH, params, v)`` returns the
per-parameter pieces of ``torch.autograd.grad``; this project's ``HessianOperator.matvec``
returns one flat vector, checked finite, with the self-check's four inner products
(``operator/self_check.py``). The models: the tanh MLPs of ``bench_probe_memory.py`` (batch
256) at 10⁵, 10⁶ and 10⁷ parameters, and the random-init transformers GPT-2 of
``bench_peers.py`` (P = 536k, 2 x 32 tokens). Both operators stay open side by side and
take their products alternately, one at a time (one thread; the order flips every repeat),
so that a burst of load from elsewhere hits both; the table gives the minimum and the
median of the seconds per product over all of them.

Needs PyHessian and transformers (the peers' venv of ``bench_peers.py``):

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=.. /work/peers-venv/bin/python \\
        bench_product_cost.py [--models 1e5 1e6 1e7 gpt2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable

import torch
from bench_probe_memory import BATCH, CLASSES, INPUTS, _loss, _mlp
from torch import nn

from lightning_curvature.functional.operator.operator import HessianOperator

Batch = tuple[torch.Tensor, torch.Tensor]


def _problem(name: str) -> tuple[nn.Module, Batch]:
    if name == "gpt2":
        from bench_peers import gpt2

        problem = gpt2()
        return problem.model, problem.batch  # type: ignore[return-value]
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(BATCH, INPUTS, generator=generator)
    return _mlp(int(float(name))), (
        inputs,
        torch.randint(0, CLASSES, (BATCH,), generator=generator),
    )


def _seconds(product: Callable[[], object]) -> float:
    start = time.perf_counter()
    product()
    return time.perf_counter() - start


def measure(name: str, repeats: int) -> str:
    """One table row: seconds per product, ours and PyHessian's, and their ratio."""
    model, batch = _problem(name)
    size = sum(p.numel() for p in model.parameters())
    calls = max(1, min(20, int(3e7 // size)))
    vector = torch.randn(size, generator=torch.Generator().manual_seed(0))
    pyhessian = importlib.import_module("pyhessian.hessian")
    engine = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=False)
    params = engine.params
    chunks = torch.split(vector, [p.numel() for p in params])
    pieces = [c.view_as(p) for c, p in zip(chunks, params, strict=True)]
    times: dict[str, list[float]] = {"ours": [], "PyHessian": []}
    with HessianOperator(model, _loss, batch, backend="retained_graph") as operator:
        ways = {
            "ours": lambda: operator.matvec(vector),
            "PyHessian": lambda: pyhessian.hessian_vector_product(engine.gradsH, params, pieces),
        }
        for way in ways.values():  # warm-up
            way()
        for repeat in range(repeats):
            order = list(ways) if repeat % 2 == 0 else list(reversed(ways))
            for _ in range(calls):
                for label in order:
                    times[label].append(_seconds(ways[label]))
    ours, theirs = times["ours"], times["PyHessian"]
    return (
        f"| {name} | {size:,} | {calls} x {repeats} | {min(ours) * 1e3:.2f} "
        f"| {min(theirs) * 1e3:.2f} "
        f"| **{min(ours) / min(theirs):.3f}** | {statistics.median(ours) * 1e3:.2f} "
        f"| {statistics.median(theirs) * 1e3:.2f} "
        f"| {statistics.median(ours) / statistics.median(theirs):.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["1e5", "1e6", "1e7", "gpt2"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    print()
    print("| model | P | calls x repeats | ours min (ms) | PyHessian min (ms) | ratio of min "
          "| ours median | PyHessian median | ratio of median |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        print(measure(name, args.repeats), flush=True)


if __name__ == "__main__":
    main()
