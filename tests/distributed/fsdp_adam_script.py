"""Run by test_fsdp_adam.py: critical sharpness along AdamW's next update, sharded or not.

Usage: python fsdp_adam_script.py OUT_DIR MODE, MODE ``fsdp`` (two processes, gloo, CPU,
ModelParallelStrategy with ``fully_shard``; each rank trains on its own half of every
16-example batch) or ``single`` (one process on the whole 16-example batches). Both train
the smooth MLP of ``fsdp_script.py`` with AdamW (decoupled weight decay) for 4 steps with
``CriticalSharpnessMonitor(probe="current")`` at every step, so each probe measures the
same union batch along the update AdamW would take from the same state: in ``fsdp`` mode
read from the shards of ``exp_avg``, ``exp_avg_sq`` and the parameters. The values are in
``OUT_DIR/MODE/version_0/metrics.csv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from fsdp_script import Sharded, data, loss_of, make_net
from launch import run_rank
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, Subset

from lightning_curvature import CriticalSharpnessMonitor

STEPS, HALF = 4, 8


def adamw(module: pl.LightningModule) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=0.01, weight_decay=0.1)


class ShardedAdam(Sharded):
    """Rank r takes examples ``16s + 8r … 16s + 8r + 7`` at step s: their union is step s's
    batch of the single-process run."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adamw(self)

    def train_dataloader(self) -> DataLoader:
        rank = self.global_rank
        own = [2 * HALF * s + HALF * rank + i for s in range(STEPS) for i in range(HALF)]
        return DataLoader(Subset(data(), own), batch_size=HALF)


class Whole(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return loss_of(self.net, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adamw(self)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Subset(data(), range(2 * HALF * STEPS)), batch_size=2 * HALF)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    sharded = mode == "fsdp"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2 if sharded else 1,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        if sharded
        else "auto",
        use_distributed_sampler=False,
        max_steps=STEPS,
        callbacks=[CriticalSharpnessMonitor(every_n_steps=1, probe="current")],
        logger=CSVLogger(out, name=mode),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(ShardedAdam() if sharded else Whole())


if __name__ == "__main__":
    run_rank(main)
