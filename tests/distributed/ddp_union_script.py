"""Run by test_ddp_union_batch.py: two-process DDP (gloo, CPU) with unequal probe sizes.

Usage: python ddp_union_script.py OUT_DIR. For each split of ``SPLITS`` (examples on rank 0
and on rank 1) one ``fit`` of one step, float64, every monitor probing the initial weights
at step 0: the eigenvalue and trace monitors on one batch per rank (16 and 5, or 16 and 1
examples), the batch-sharpness monitor on two batches per rank. Each rank writes
``<split>_rank<r>.pt``: its probe batches, the initial weights and what its monitors logged.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from launch import run_rank
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import BatchSharpnessMonitor, HessianEigenvalueMonitor, HessianTraceMonitor

#: name: (the eigenvalue/trace probe's size, the two batch-sharpness batches' sizes), per rank
SPLITS = {
    "16_5": ((16, (8, 8)), (5, (3, 2))),
    "16_1": ((16, (8, 8)), (1, (1, 1))),
}
#: P = 13 parameters; Hutch++ with 3·13 products sketches the whole space: the trace is exact
TRACE_HVPS = 42


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x).squeeze(-1) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def examples(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.sin(3 * x[:, 0]) + x[:, 1] ** 2)


def batches_of(sizes: tuple[int, ...], seed: int) -> DataLoader:
    data = examples(sum(sizes), seed)
    return DataLoader(data, batch_sampler=_Fixed(sizes))


class _Fixed:
    """Consecutive batches of the given sizes."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = sizes

    def __iter__(self):
        start = 0
        for size in self.sizes:
            yield list(range(start, start + size))
            start += size

    def __len__(self) -> int:
        return len(self.sizes)


def run(out: Path, name: str) -> None:
    pl.seed_everything(0)
    rank = int(__import__("os").environ.get("LOCAL_RANK", 0))
    probe_size, sharpness_sizes = SPLITS[name][rank]
    monitors = [
        HessianEigenvalueMonitor(
            k=1, tol=1e-10, every_n_steps=1, probe_dataloader=batches_of((probe_size,), rank)
        ),
        HessianTraceMonitor(
            TRACE_HVPS,
            method="hutch++",
            every_n_steps=1,
            probe_dataloader=batches_of((probe_size,), rank),
        ),
        BatchSharpnessMonitor(
            num_batches=2, every_n_steps=1, probe_dataloader=batches_of(sharpness_sizes, 10 + rank)
        ),
    ]
    model = Regressor()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        callbacks=monitors,
        logger=CSVLogger(out, name=name),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(examples(32, 99), batch_size=8))
    torch.save(
        {
            "weights": initial,
            "probe": monitors[0]._fixed_batches,
            "sharpness_batches": monitors[2]._fixed_batches,
            "logged": {type(m).__name__: m.last_metrics for m in monitors},
        },
        out / f"{name}_rank{trainer.global_rank}.pt",
    )


def main() -> None:
    out = Path(sys.argv[1])
    for name in SPLITS:
        run(out, name)


if __name__ == "__main__":
    run_rank(main)
