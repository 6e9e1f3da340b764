"""Cost of a loss slice and of a critical-sharpness measurement, against a training step.

On the ~95k-parameter CNN of ``common.py`` (eval-mode BatchNorm, synthetic 3x32x32 images,
batch 128) and a 23M-parameter GPT-2 from ``transformers`` (random init from a config: 6
layers, width 512, 8 heads, vocabulary 8192; next-token loss on 2 sequences of 32 tokens; the
config of ``bench_hvp_backends.py``), one intra-op thread, each timed as the minimum over
interleaved repeats after a warm-up:

* ``training step``: forward, backward and an SGD step (the unit);
* ``forward``: the loss under ``torch.no_grad``;
* ``slice, 1 line``: ``loss_slice`` along one direction at 15 offsets (the monitor's default:
  13 evenly spaced and ±1 step; the offset 0 is free): 15 forward passes, 1 gradient
  (the retained graph's) and 1 Hessian-vector product;
* ``slice, 2 lines``: along v₁ and the last update, as one ``LossLandscapeMonitor`` probe
  (k=1) slices;
* ``Lanczos k=1, warm``: ``hessian_eigenvalues`` started from the converged vectors, what the
  landscape monitor adds when the eigenvalue monitor has just probed the same Hessian;
* ``critical sharpness, cold``: ``critical_sharpness`` along the gradient (plain SGD's next
  update) from ``init=lr``; ``warm``: from 1.05 times the cold ``η_c`` (a 5% drift since
  the previous probe).

    nice -n 10 python benchmarks/bench_landscape.py --repeats 3   # ~6 min, 1 thread
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    Timings,
    load_average,
    loss_fn,
    machine,
    make_cnn,
    num_parameters,
    summary,
    synthetic_images,
    timed,
)
from torch import nn

from lightning_curvature import critical_sharpness, hessian_eigenvalues, loss_slice
from lightning_curvature.callbacks.landscape_lines import offsets_around

GPT2 = {"vocab_size": 8192, "n_positions": 64, "n_embd": 512, "n_layer": 6, "n_head": 8}
OFFSETS = offsets_around(13, 2.0, [-1.0, 1.0])  # the monitor's, with an exact 0
LR = 0.05


def gpt2() -> tuple[nn.Module, Callable[[nn.Module, Any], torch.Tensor], torch.Tensor]:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        **GPT2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, GPT2["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))

    def next_token(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = m(input_ids=batch).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    return model, next_token, ids


def cases(
    model: nn.Module, loss: Callable[[nn.Module, Any], torch.Tensor], batch: Any
) -> dict[str, Callable[[], tuple[int, int]]]:
    """Label -> a call returning ``(forward passes, HVPs)``."""
    size = num_parameters(model)
    generator = torch.Generator().manual_seed(0)
    lines = torch.randn(2, size, generator=generator) * 1e-3
    warm = hessian_eigenvalues(model, loss, batch, return_eigenvectors=True).warm_start
    cold = critical_sharpness(model, loss, batch, lambda g: g, init=LR)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR)

    def step() -> tuple[int, int]:  # then the weights are put back, for the next call
        saved = [p.detach().clone() for p in params]
        optimizer.zero_grad(set_to_none=True)
        loss(model, batch).backward()
        optimizer.step()
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
                p.grad = None
        return 1, 0

    def forward() -> tuple[int, int]:
        with torch.no_grad():
            loss(model, batch)
        return 1, 0

    def sliced(count: int) -> Callable[[], tuple[int, int]]:
        def run() -> tuple[int, int]:
            out = loss_slice(model, loss, batch, lines[:count], OFFSETS)
            return out.num_forwards, out.num_hvps

        return run

    def lanczos() -> tuple[int, int]:
        return 0, hessian_eigenvalues(model, loss, batch, init=warm).num_hvps

    def critical(init: float) -> Callable[[], tuple[int, int]]:
        def run() -> tuple[int, int]:
            return critical_sharpness(model, loss, batch, lambda g: g, init=init).num_forwards, 0

        return run

    return {
        "training step": step,
        "forward": forward,
        "slice, 1 line": sliced(1),
        "slice, 2 lines": sliced(2),
        "Lanczos k=1, warm": lanczos,
        "critical sharpness, cold": critical(LR),
        "critical sharpness, warm": critical(1.05 * cold.step_size),
    }


def report(title: str, model: nn.Module, loss: Any, batch: Any, repeats: int) -> None:
    calls = cases(model, loss, batch)
    timings, counts = Timings(), {}
    for call in calls.values():
        call()  # warm-up
    for _ in range(repeats):
        for label, call in calls.items():
            seconds, counted = timed(call)
            timings.add(label, seconds)
            counts[label] = counted
    unit = timings.best("training step")
    print(f"\n### {title} ({num_parameters(model)} parameters), min of {repeats}\n")
    print("| measurement | forwards | HVPs | seconds | training steps | spread |")
    print("|---|---|---|---|---|---|")
    for label in calls:
        forwards, hvps = counts[label]
        best = timings.best(label)
        print(
            f"| {label} | {forwards} | {hvps} | {best:.4f} | {best / unit:.2f} | "
            f"{timings.spread(label):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-gpt2", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load = time.perf_counter(), load_average()
    print(machine("transformers"))
    cnn = make_cnn().eval()
    images = synthetic_images(128)
    report("CNN 95k, batch 128", cnn, loss_fn, images, args.repeats)
    if not args.skip_gpt2:
        model, next_token, ids = gpt2()
        report("GPT-2 23M, batch 2x32", model, next_token, ids, args.repeats)
    print(f"\n{summary(started, load)}")


if __name__ == "__main__":
    main()
