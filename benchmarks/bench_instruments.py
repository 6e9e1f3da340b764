"""Cost of one measurement of issue 15's instruments, in HVPs and seconds.

On the ~95k-parameter CNN of ``common.py`` (eval-mode BatchNorm, synthetic 3x32x32 images,
batches of 128) and the 2.1k-parameter digits MLP (batches of 128), each timed as the
minimum over interleaved repeats, after one warm-up, against one plain gradient of one batch:

* ``gradient``: ``torch.autograd.grad`` of the loss of one batch (the unit);
* ``batch_sharpness (8 batches)``: ``batch_sharpness`` over 8 batches of 128;
* ``directional_curvature``: ``uᵀHu/‖u‖²`` along one direction (the update sharpness);
* ``eigenvalues k=10`` and ``+ return_gradient``: ``hessian_eigenvalues(k=10)`` with the
  eigenvectors, without and with the probe gradient (the gradient's share needs both);
* ``subspace_share``: the share itself, given the gradient and 10 eigenvectors;
* ``sam_gradient`` and ``curvature along ε``: SAM's two passes, and the free curvature's two
  float64 dot products (what the callback adds on a logged step).

    python benchmarks/bench_instruments.py --repeats 3   # ~2 min, 1 thread
"""

from __future__ import annotations

import argparse
import time

import torch
from common import (
    Timings,
    digits,
    head,
    load_average,
    loss_fn,
    machine,
    make_cnn,
    make_mlp,
    num_parameters,
    summary,
    synthetic_images,
    timed,
    trainable,
)
from torch import nn

from lightning_curvature import (
    batch_sharpness,
    directional_curvature,
    hessian_eigenvalues,
    sam_gradient,
    subspace_share,
)


def cases(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, object]:
    """Label -> a call returning ``(result, hvps)`` for one model and its 8 batches."""
    batches = [
        (data[0][i * 128 : (i + 1) * 128], data[1][i * 128 : (i + 1) * 128]) for i in range(8)
    ]
    one = batches[0]
    size = num_parameters(model)
    direction = torch.randn(size, generator=torch.Generator().manual_seed(0))
    found = hessian_eigenvalues(model, loss_fn, one, k=10, return_eigenvectors=True,
                                return_gradient=True)  # fmt: skip
    assert found.gradient is not None
    assert found.eigenvectors is not None
    gradient, basis = found.gradient, found.eigenvectors
    sam = sam_gradient(model, loss_fn, one, rho=0.05)
    params = trainable(model)

    def plain_gradient() -> tuple[object, int]:
        return torch.autograd.grad(loss_fn(model, one), params), 0

    def sharpness() -> tuple[object, int]:
        out = batch_sharpness(model, loss_fn, batches)
        return out, out.num_hvps

    def along() -> tuple[object, int]:
        out = directional_curvature(model, loss_fn, one, direction)
        return out, out.num_hvps

    def eigen(with_gradient: bool) -> tuple[object, int]:
        out = hessian_eigenvalues(
            model, loss_fn, one, k=10, return_eigenvectors=True, return_gradient=with_gradient
        )
        return out, out.num_hvps

    def share() -> tuple[object, int]:
        return subspace_share(gradient, basis), 0

    def sam_pass() -> tuple[object, int]:
        return sam_gradient(model, loss_fn, one, rho=0.05), 0

    def sam_curvature() -> tuple[object, int]:
        return sam.perturbation.curvature(sam.gradients, sam.gradients), 0

    return {
        "gradient": plain_gradient,
        "batch_sharpness (8 batches)": sharpness,
        "directional_curvature": along,
        "eigenvalues k=10": lambda: eigen(False),
        "eigenvalues k=10 + return_gradient": lambda: eigen(True),
        "subspace_share": share,
        "sam_gradient": sam_pass,
        "curvature along ε": sam_curvature,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), load_average()
    print(machine("lightning"))
    models = {
        "CNN 95k, batch 128": (make_cnn(0).eval(), synthetic_images(1024)),
        "MLP 2.1k (digits), batch 128": (make_mlp(0).eval(), head(digits(), 1024)),
    }
    for title, (model, data) in models.items():
        calls = cases(model, data)
        timings, hvps = Timings(), {}
        for call in calls.values():
            call()  # warm-up
        for _ in range(args.repeats):
            for label, call in calls.items():
                seconds, (_, used) = timed(call)  # type: ignore[misc, operator]
                timings.add(label, seconds)
                hvps[label] = used
        unit = timings.best("gradient")
        print(f"\n### {title} ({num_parameters(model)} parameters), min of {args.repeats}\n")
        print("| measurement | HVPs | seconds | gradients | spread |")
        print("|---|---|---|---|---|")
        for label in calls:
            best = timings.best(label)
            print(
                f"| {label} | {hvps[label]} | {best:.4f} | {best / unit:.1f} | "
                f"{timings.spread(label):.2f} |"
            )
    print(f"\n{summary(started, load)}")


if __name__ == "__main__":
    main()
