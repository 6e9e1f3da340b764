"""Run by test_fsdp_coherence.py: two processes (gloo, CPU), ModelParallelStrategy + FSDP2.

Usage: python fsdp_coherence_script.py OUT_DIR MODE, MODE in {"train", "nosync"}.

Trains the smooth MLP of ``fsdp_script`` sharded with ``fully_shard`` and
``accumulate_grad_batches=ACCUMULATE`` twice, with ``GradientCoherenceMonitor(
source="accumulation", per_layer=True)`` measuring every step and without it. Each rank writes
rank<r>.pt: the monitor's values of every step, its training micro-batches, the full weights
at each step start, the final full weights of both trainings, and what tensor hooks on the
sharded parameters saw (FSDP2's autograd leaves are the unsharded copies it gathers).
``nosync``: the model turns FSDP2's gradient reduction off on all micro-batches but a step's
last (``set_requires_gradient_sync``); each rank writes the monitor's values and warnings.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from fsdp_script import Capture, Sharded, data, full_weights
from launch import run_rank
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from lightning_curvature import CurvatureWarning, GradientCoherenceMonitor

ACCUMULATE = 3
MAX_STEPS = 2
BATCH_SIZE = 4


class EveryStep(pl.Callback):
    """The monitor's values after each optimizer step, by step."""

    def __init__(self, monitor: GradientCoherenceMonitor) -> None:
        self.monitor = monitor
        self.values: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % ACCUMULATE == 0:  # this batch ended step global_step - 1
            metrics = self.monitor.last_metrics
            self.values[trainer.global_step - 1] = {k: float(v) for k, v in metrics.items()}


class ShardHooks(pl.Callback):
    """Counts the calls of tensor hooks on the sharded parameters during each backward."""

    def __init__(self) -> None:
        self.calls = 0
        self.handles: list = []
        self.grad_types: set[str] = set()

    def on_before_backward(self, trainer, pl_module, loss):
        for p in pl_module.parameters():
            self.handles.append(p.register_hook(self._count))

    def _count(self, grad):
        self.calls += 1

    def on_after_backward(self, trainer, pl_module):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.grad_types |= {type(p.grad).__name__ for p in pl_module.parameters()}


class NoSync(Sharded):
    def on_train_batch_start(self, batch, batch_idx):
        self.net.set_requires_gradient_sync((batch_idx + 1) % ACCUMULATE == 0)


def fit(
    callbacks: list[pl.Callback], out: Path, module: Sharded | None = None
) -> tuple[pl.Trainer, Sharded]:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=MAX_STEPS,
        accumulate_grad_batches=ACCUMULATE,
        callbacks=callbacks,
        logger=CSVLogger(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = module or Sharded()
    trainer.fit(module, DataLoader(data(), batch_size=BATCH_SIZE))
    return trainer, module


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    capture = Capture()
    monitor = GradientCoherenceMonitor(source="accumulation", per_layer=True, every_n_steps=1)
    every_step = EveryStep(monitor)
    if mode == "nosync":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CurvatureWarning)
            trainer, _ = fit([monitor, every_step], out, NoSync())
        messages = [str(w.message) for w in caught if w.category is CurvatureWarning]
        report = {"values": every_step.values, "warnings": messages}
        torch.save(report, out / f"rank{trainer.global_rank}.pt")
        return
    hooks = ShardHooks()
    trainer, module = fit([capture, monitor, every_step, hooks], out)
    with_monitor = full_weights(module.net)
    _, plain = fit([], out)
    torch.save(
        {
            "values": every_step.values,
            "shard_hook_calls": hooks.calls,
            "grad_types": sorted(hooks.grad_types),
            "batches": capture.batches,
            "weights": capture.weights,
            "final": with_monitor,
            "final_without_monitor": full_weights(plain.net),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    run_rank(main)
