"""The trace with batched products (issue 23, point 4) against one product at a time.

``hessian_trace(num_hvps=100)`` (Hutchinson, or Hutch++ with ``--method hutch++``; or with
``--method slq`` ``spectral_density`` of 10 runs of ``num_hvps / 10`` steps, its runs in
lockstep, the estimate its trace ``P·Σ τθ``; ``--models`` picks models by part of their
name) on four models, one intra-op thread, the median of
interleaved repeats: the digits MLP (2.1k parameters, 256 examples), the 95k CNN of
``common.py`` with BatchNorm in eval and in train mode (batch 128), and a transformers GPT-2
of 2 layers of width 128 (vocabulary 1024, 4×32 tokens; sdpa attention, the math kernel in
the double backward). "single" pins :class:`ProductBatches` to one product at a time (the
code before batching); "chosen" is the library as it runs, timing both ways on its first
groups and keeping the faster. The estimates of the two agree to rounding (they take the
same products of the same probes).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_trace_batches.py   # ~4 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

from common import digits, load_average, machine, make_cnn, make_mlp, summary, synthetic_images
from common import loss_fn as cross_entropy

from lightning_curvature import hessian_trace, spectral_density
from lightning_curvature.functional.linalg import product_batches


def gpt2() -> tuple[torch.nn.Module, Callable[..., torch.Tensor], torch.Tensor]:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=1024, n_positions=32, n_embd=128, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 1024, (4, 32), generator=torch.Generator().manual_seed(1))

    def next_token(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = m(input_ids=batch).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    return model, next_token, ids


def cases() -> dict[str, tuple[torch.nn.Module, Callable[..., Any], Any, str]]:
    x, y = digits()
    images = synthetic_images(128)
    return {
        "MLP (digits)": (make_mlp(), cross_entropy, (x[:256], y[:256]), "eval"),
        "CNN, BatchNorm eval": (make_cnn(), cross_entropy, images, "eval"),
        "CNN, BatchNorm train": (make_cnn(), cross_entropy, images, "train"),
        "GPT-2, 2 layers": (*gpt2(), "eval"),
    }


def estimate(model: torch.nn.Module, loss: Callable[..., Any], batch: Any, mode: str,
             method: str, num_hvps: int) -> float:  # fmt: skip
    """The trace from ``num_hvps`` products: Hutchinson's, Hutch++'s or SLQ's (10 runs)."""
    generator = torch.Generator().manual_seed(0)
    if method == "slq":
        esd = spectral_density(model, loss, batch, num_steps=num_hvps // 10, num_runs=10,
                               batch_norm=mode, generator=generator)  # fmt: skip
        return float(esd.num_parameters * (esd.nodes * esd.weights).sum(dim=1).mean())
    out = hessian_trace(model, loss, batch, num_hvps=num_hvps, batch_norm=mode, method=method,
                        generator=generator)  # fmt: skip
    return float(out.estimate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-hvps", type=int, default=100)
    parser.add_argument("--method", choices=["hutchinson", "hutch++", "slq"], default="hutchinson")
    parser.add_argument("--models", nargs="*", help="run only the models whose name has one")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    started, load = time.perf_counter(), load_average()
    chosen_way = product_batches.ProductBatches._way
    made: list[product_batches.ProductBatches] = []
    init = product_batches.ProductBatches.__init__

    def recording(self: product_batches.ProductBatches, *args: Any) -> None:
        init(self, *args)
        made.append(self)

    product_batches.ProductBatches.__init__ = recording  # type: ignore[method-assign]
    print(machine("transformers"))
    print("\n| model | single (s) | chosen (s) | chosen / single | way kept | estimates |")
    print("|---|---|---|---|---|---|")
    print(f"method {args.method}, {args.num_hvps} products")
    for name, (model, loss, batch, mode) in cases().items():
        if args.models and not any(part in name for part in args.models):
            continue
        times: dict[str, list[float]] = {"single": [], "chosen": []}
        kept, estimates = "", {}
        for _ in range(args.repeats):
            for label in ("single", "chosen"):  # interleaved
                pinned = (lambda self: "single") if label == "single" else chosen_way
                product_batches.ProductBatches._way = pinned  # type: ignore[method-assign]
                made.clear()
                start = time.perf_counter()
                estimates[label] = estimate(model, loss, batch, mode, args.method, args.num_hvps)
                times[label].append(time.perf_counter() - start)
                if label == "chosen":
                    kept = made[0]._way()
        single, chosen = (statistics.median(times[k]) for k in ("single", "chosen"))
        agree = f"{estimates['single']:.6g} / {estimates['chosen']:.6g}"
        print(
            f"| {name} | {single:.2f} | {chosen:.2f} | {chosen / single:.2f} | {kept} | {agree} |"
        )
    product_batches.ProductBatches._way = chosen_way  # type: ignore[method-assign]
    product_batches.ProductBatches.__init__ = init  # type: ignore[method-assign]
    print("\n" + summary(started, load))


if __name__ == "__main__":
    main()
