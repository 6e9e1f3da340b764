"""The curvature monitors in a Lightning Fabric loop shaped like litgpt's pretraining.

A small litgpt ``GPT`` (random init from a ``litgpt.Config``: 2 layers, about 30k
parameters) learns sequences of random tokens drawn from a fixed random Markov chain (no
download, no tokenizer), in the loop of ``litgpt/pretrain.py``'s ``fit`` in small: AdamW,
warmup then cosine learning rate, micro-batches with gradient accumulation and no backward
sync while accumulating, gradient clipping, a ``state`` dict for ``fabric.save``. The loop
adds two lines for the monitors (marked ``# curvature``), and a third after it for a probe
of the final weights:

    curvature = FabricMonitors(fabric, model, optimizer, monitors, loss_fn=..., probe_data=...)
    curvature.on_train_batch_start(state["step_count"], train_data)  # before each forward
    curvature.on_train_end(state["step_count"])

Run it, then look at the charts (the *Custom Scalars* tab has λ₁(P⁻¹H) against Adam's
stability threshold):

    python examples/fabric_litgpt.py
    python -m tensorboard.main --logdir lightning_logs
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers import TensorBoardLogger
from litgpt import GPT, Config
from litgpt.utils import chunked_cross_entropy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lightning_curvature import (
    FabricMonitors,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    hessian_eigenvalues,
)

VOCAB = 64
BLOCK = 32


def markov_tokens(sequences: int, seed: int = 0) -> torch.Tensor:
    """``sequences`` rows of ``BLOCK + 1`` tokens from one random first-order Markov chain."""
    g = torch.Generator().manual_seed(seed)
    transitions = torch.softmax(3 * torch.randn(VOCAB, VOCAB, generator=g), dim=-1)
    tokens = torch.empty(sequences, BLOCK + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(VOCAB, (sequences,), generator=g)
    for t in range(BLOCK):
        tokens[:, t + 1] = torch.multinomial(transitions[tokens[:, t]], 1, generator=g)[:, 0]
    return tokens


def loss_fn(model: torch.nn.Module, train_data: torch.Tensor) -> torch.Tensor:
    """litgpt's next-token loss of a batch of token rows (what the loop and the probes measure)."""
    input_ids = train_data[:, 0:BLOCK].contiguous().long()
    targets = train_data[:, 1 : BLOCK + 1].contiguous().long()
    return chunked_cross_entropy(model(input_ids), targets)


def get_lr(learning_rate: float, it: int, warmup_iters: int, max_iters: int) -> float:
    """litgpt's warmup and cosine decay, counted from 1 (litgpt's first step has lr 0)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    decay_ratio = (it - warmup_iters) / max(max_iters - warmup_iters, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(decay_ratio, 1.0))) * learning_rate


def fit(
    fabric: L.Fabric,
    state: dict[str, Any],
    train_dataloader: Any,
    curvature: FabricMonitors,
    max_steps: int,
    accumulation: int,
) -> list[float]:
    """litgpt's ``fit``, its validation and throughput left out: the losses of each step."""
    model, optimizer = state["model"], state["optimizer"]
    max_iters, warmup_iters = max_steps * accumulation, 10 * accumulation
    losses: list[float] = []
    while state["iter_num"] < max_iters:
        for train_data in train_dataloader:
            if state["iter_num"] >= max_iters:
                break
            lr = get_lr(optimizer.defaults["lr"], state["iter_num"], warmup_iters, max_iters)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            state["iter_num"] += 1
            curvature.on_train_batch_start(state["step_count"], train_data)  # curvature
            is_accumulating = state["iter_num"] % accumulation != 0
            with fabric.no_backward_sync(model, enabled=is_accumulating):
                loss = loss_fn(model, train_data)
                fabric.backward(loss / accumulation)
            if not is_accumulating:
                fabric.clip_gradients(model, optimizer, max_norm=1.0)
                optimizer.step()
                optimizer.zero_grad()
                state["step_count"] += 1
                losses.append(loss.item())
                fabric.log_dict({"loss": losses[-1], "learning_rate": lr}, state["step_count"])
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--every-n-steps", type=int, default=20)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args()
    started = time.perf_counter()

    logger = TensorBoardLogger(args.log_dir, name="fabric_litgpt")
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true", loggers=logger)
    fabric.seed_everything(0)
    config = Config(
        block_size=BLOCK, vocab_size=VOCAB, padded_vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32
    )
    with fabric.init_module():
        model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    model, optimizer = fabric.setup(model, optimizer)
    train_dataloader = fabric.setup_dataloaders(
        DataLoader(markov_tokens(512), batch_size=16, shuffle=True)
    )
    eigen = HessianEigenvalueMonitor(every_n_steps=args.every_n_steps, on_train_end=True)
    trace = HessianTraceMonitor(num_hvps=8, every_n_steps=2 * args.every_n_steps)
    curvature = FabricMonitors(  # curvature
        fabric, model, optimizer, [eigen, trace], loss_fn=loss_fn, probe_data=train_dataloader
    )
    state = {"model": model, "optimizer": optimizer, "curvature": curvature}
    state |= {"iter_num": 0, "step_count": 0}

    losses = fit(fabric, state, train_dataloader, curvature, args.max_steps, accumulation=2)
    curvature.on_train_end(state["step_count"])  # curvature: the final weights
    fabric.save(f"{logger.log_dir}/final.ckpt", state)  # the monitors' state goes with it
    logger.finalize("success")

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    for tag in sorted(t for t in events.Tags()["scalars"] if t.startswith("curvature/")):
        print(f"{tag:42s}", "  ".join(f"{step}: {value:.4g}" for step, value in series(tag)))
    top, ratio = series("curvature/eigenvalue_1"), series("curvature/sharpness_ratio")
    traces, errors = series("curvature/trace"), series("curvature/trace_std_error")
    peak_step, peak = max(ratio, key=lambda point: point[1])
    probing = sum(v for t in ("eigenvalue", "trace") for _, v in series(f"probe_cost/{t}_seconds"))
    # The same number without the monitors: the final weights, the monitor's probe batch.
    direct = hessian_eigenvalues(curvature.module, loss_fn, eigen.fixed_probe, tol=1e-5)
    seconds = time.perf_counter() - started
    print(
        f"CONCLUSION: over {state['step_count']} AdamW steps of a {config.n_layer}-layer litgpt "
        f"GPT ({sum(p.numel() for p in model.parameters())} parameters) the loss fell from "
        f"{losses[0]:.3f} to {losses[-1]:.3f}; the top Hessian eigenvalue went from "
        f"{top[0][1]:.4f} at step 0 to {top[-1][1]:.4f} at step {top[-1][0]} "
        f"(hessian_eigenvalues at the final weights: {float(direct.eigenvalues[0]):.4f}), the "
        f"trace from {traces[0][1]:.2f} ± {errors[0][1]:.2f} to {traces[-1][1]:.2f} ± "
        f"{errors[-1][1]:.2f}; λ₁(P⁻¹H) peaked at {peak:.3f} of Adam's stability threshold "
        f"38/lr (step {peak_step}), far from the edge. {len(top) + len(traces)} probes took "
        f"{probing:.1f} s of the {seconds:.0f} s run."
    )
    command = f"{shlex.quote(sys.executable)} -m tensorboard.main --logdir"
    print(f"TensorBoard logs in {logger.log_dir}: {command} {shlex.quote(logger.log_dir)}")


if __name__ == "__main__":
    main()
