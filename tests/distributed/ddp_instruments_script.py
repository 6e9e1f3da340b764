"""Run by test_ddp_instruments.py: two-process DDP (gloo, CPU) with issue 15's instruments.

Usage: python ddp_instruments_script.py OUT_DIR values. Each rank writes rank<r>.json (the
monitors' and SAM's last values) and rank<r>.pt (its probe batches and the weights at the
start of steps 1 and 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from ddp_monitor_script import Regressor
from launch import run_rank
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import SAM, BatchSharpnessMonitor, HessianEigenvalueMonitor


class Weights(pl.Callback):
    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = pl_module.state_dict()
        self.weights[trainer.global_step] = {k: v.clone() for k, v in state.items()}


def main() -> None:
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    sharpness = BatchSharpnessMonitor(num_batches=3, every_n_steps=2)
    eigen = HessianEigenvalueMonitor(
        k=2, tol=1e-5, every_n_steps=2, gradient_share=True, update_sharpness=True
    )
    sam, weights = SAM(rho=0.05, log_every_n_steps=1), Weights()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        callbacks=[weights, sharpness, eigen, sam],
        logger=CSVLogger(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Regressor(), loader)
    rank = trainer.global_rank
    values = {type(c).__name__: c.last_metrics for c in (sharpness, eigen, sam)}
    (out / f"rank{rank}.json").write_text(json.dumps({"values": values}))
    torch.save(
        {
            "sharpness_probe": list(sharpness.fixed_probe or []),
            "eigen_probe": list(eigen.fixed_probe or []),
            "weights": {step: weights.weights[step] for step in (1, 2)},
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    run_rank(main)
