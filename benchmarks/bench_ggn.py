"""Cost and values of ``curvature="ggn"`` next to the Hessian.

Two models of ``common.py``: the tanh MLP after 300 SGD steps on scikit-learn's digits
(probe: 256 examples) and the ~95k-parameter CNN at init (eval BatchNorm, 128 synthetic
images). For each, the seconds of one product (mean of ``--calls`` consecutive products
after one warm-up, minimum over ``--repeats`` interleaved repeats) as a multiple of one
batch gradient, for the Hessian and for the GGN with each backend; then λ₁, λ_min (Lanczos,
``tol=1e-3``) and the Hutchinson trace (64 products) of both matrices.

    python benchmarks/bench_ggn.py --repeats 3
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    Timings,
    digits,
    head,
    load_average,
    loss_fn,
    machine,
    make_cnn,
    make_mlp,
    minibatches,
    num_parameters,
    per_call_seconds,
    summary,
    synthetic_images,
    train_sgd,
)
from torch import nn

from lightning_curvature import (
    HessianOperator,
    OutputLoss,
    hessian_eigenvalues,
    hessian_trace,
)

SPLIT = OutputLoss(lambda model, batch: (model(batch[0]), batch[1]), F.cross_entropy)
VARIANTS = {
    "Hessian (retained_graph)": {"curvature": "hessian", "backend": "retained_graph"},
    "GGN (retained_graph)": {"curvature": "ggn", "backend": "retained_graph"},
    "GGN (double_backward)": {"curvature": "ggn", "backend": "double_backward"},
    "GGN (forward_over_reverse)": {"curvature": "ggn", "backend": "forward_over_reverse"},
}


def _gradient(model: nn.Module, batch: Any) -> None:
    torch.autograd.grad(loss_fn(model, batch), [p for p in model.parameters()])


def _costs(model: nn.Module, batch: Any, calls: int, repeats: int) -> None:
    timings = Timings()
    vector = torch.randn(num_parameters(model), generator=torch.Generator().manual_seed(0))
    for _ in range(repeats):
        timings.add("gradient", per_call_seconds(lambda: _gradient(model, batch), calls))
        for label, settings in VARIANTS.items():
            with HessianOperator(model, SPLIT, batch, **settings) as operator:  # type: ignore[arg-type]
                timings.add(label, per_call_seconds(lambda: operator.matvec(vector), calls))
    unit = timings.best("gradient")
    print("| product | seconds | × gradient | spread max/min |")
    print("|---|---|---|---|")
    print(f"| one batch gradient | {unit:.4f} | 1.00 | {timings.spread('gradient'):.2f} |")
    for label in VARIANTS:
        best = timings.best(label)
        print(f"| {label} | {best:.4f} | {best / unit:.2f} | {timings.spread(label):.2f} |")


def _values(model: nn.Module, batch: Any) -> None:
    print("| matrix | λ₁ | λ_min | trace ± SE (64 HVPs) | products (λ₁, λ_min run) |")
    print("|---|---|---|---|---|")
    for curvature in ("hessian", "ggn"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the GGN's λ_min is 0, not certifiable relatively
            eig = hessian_eigenvalues(model, SPLIT, batch, smallest=True, curvature=curvature)  # type: ignore[arg-type]
        trace = hessian_trace(model, SPLIT, batch, 64, curvature=curvature)  # type: ignore[arg-type]
        print(
            f"| {curvature} | {float(eig.eigenvalues[0]):.4g} | "
            f"{float(eig.smallest_eigenvalue):.3g} | "  # type: ignore[arg-type]
            f"{float(trace.estimate):.4g} ± {float(trace.std_error):.2g} | {eig.num_hvps} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), load_average()
    print(machine(), "\n")
    data = digits()
    mlp = make_mlp()
    train_sgd(mlp, minibatches(data, 64, seed=0), steps=300, lr=0.05)
    cnn = make_cnn().eval()
    for name, model, batch in (
        (f"tanh MLP, digits, P = {num_parameters(mlp)}, 256 examples", mlp, head(data, 256)),
        (f"CNN, P = {num_parameters(cnn)}, 128 images", cnn, synthetic_images(128)),
    ):
        print(f"### {name}\n")
        _costs(model, batch, args.calls, args.repeats)
        print()
        _values(model, batch)
        print()
    print(summary(started, load))


if __name__ == "__main__":
    main()
