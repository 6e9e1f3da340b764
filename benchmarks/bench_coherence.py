"""Cost of gradient_coherence as a multiple of one batch gradient.

On the ~95k-parameter CNN of ``common.py`` (BatchNorm in eval mode, so per-example
gradients are defined) with a batch of 128 synthetic 3x32x32 images, times, interleaved and
repeated. It prints the minimum of each, its ratio to the minimum batch gradient, and
("paired") the median over repeats of its ratio to the batch gradient timed just before it,
which is steadier when the load of a shared machine shifts during the run:

* ``batch gradient``: one ``torch.autograd.grad`` of the mean loss (the unit);
* ``per-example (vmap)``: ``gradient_coherence(mode="per_example")``, everything included
  (vmap of grad in the default chunks, the on-the-fly sums and the statistics);
* ``per-example, one chunk``: the same with all 128 examples in one ``vmap`` call;
* ``vmap(grad) only``: the per-example gradients (default chunks) without the sums;
* ``micro-batches of 8``: ``gradient_coherence(mode="micro_batch", micro_batch_size=8)``;
* ``python loop``: ``mode="micro_batch", micro_batch_size=1``, one backward per example.

    python benchmarks/bench_coherence.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from common import (
    Timings,
    load_average,
    loss_fn,
    machine,
    make_cnn,
    num_parameters,
    synthetic_images,
    timed,
)

from lightning_curvature.functional.coherence import default_chunk_size, gradient_coherence
from lightning_curvature.functional.gradients.per_example import GradientSampler


def cases(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Callable[[], object]]:
    """The measured calls, by label."""
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = GradientSampler(model, loss_fn, list(model.named_parameters()))

    def batch_gradient() -> object:
        return torch.autograd.grad(loss_fn(model, batch), params)

    def vmap_only() -> object:
        chunk = default_chunk_size(num_parameters(model), batch[0].device)
        return list(sampler.per_example(batch, chunk_size=chunk))

    def coherence(**kwargs: object) -> Callable[[], object]:
        return lambda: gradient_coherence(model, loss_fn, batch, **kwargs)  # type: ignore[arg-type]

    return {
        "batch gradient": batch_gradient,
        "per-example (vmap)": coherence(mode="per_example"),
        "per-example, one chunk": coherence(mode="per_example", chunk_size=len(batch[1])),
        "vmap(grad) only": vmap_only,
        "micro-batches of 8": coherence(mode="micro_batch", micro_batch_size=8),
        "python loop": coherence(mode="micro_batch", micro_batch_size=1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load = load_average()
    print(f"Machine: {machine('lightning')}")
    model = make_cnn().eval()
    batch = synthetic_images(args.batch_size)
    calls = cases(model, batch)
    for call in calls.values():  # warm-up
        call()
    timings = Timings()
    for _ in range(args.repeats):
        for label, call in calls.items():
            seconds, _ = timed(call)
            timings.add(label, seconds)

    out = gradient_coherence(model, loss_fn, batch)
    unit = timings.best("batch gradient")
    print(
        f"CNN with {num_parameters(model)} parameters, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, min of {args.repeats} interleaved repeats"
    )
    print(f"{'method':<24}{'seconds':>10}{'x batch grad':>14}{'paired':>8}{'spread':>8}")
    for label in calls:
        best = timings.best(label)
        paired = statistics.median(
            t / u
            for t, u in zip(timings.seconds[label], timings.seconds["batch gradient"], strict=True)
        )
        print(
            f"{label:<24}{best:>10.4f}{best / unit:>14.2f}{paired:>8.2f}"
            f"{timings.spread(label):>8.2f}"
        )
    print(
        f"values: coherence {out.coherence.item():.3f}, mean cosine {out.mean_cosine.item():.4f}, "
        f"noise scale {out.noise_scale.item():.1f}, snr {out.snr.item():.4f} ({out.mode})"
    )
    print(f"load average (1, 5, 15 min) {load} at start, {load_average()} at end")


if __name__ == "__main__":
    main()
