"""Run by test_ddp_monitors.py: two-process DDP (gloo, CPU) with all curvature monitors.

Usage: python ddp_monitor_script.py OUT_DIR MODE, MODE in {"values", "nan_on_rank_1", "ggn"}
("ggn": the eigenvalue and trace monitors with ``curvature="ggn"``).
Each rank writes rank<r>.json (its monitors' last values and how many probes it logged),
its probe batch and the weights it probed (rank<r>.pt).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from launch import run_rank
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import (
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    OutputLoss,
    SpectralDensityMonitor,
)


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x).squeeze(-1) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.5)


def regressor_outputs(module, batch):
    x, y = batch
    return module.net(x).squeeze(-1), y


SPLIT = OutputLoss(regressor_outputs, F.mse_loss)  # Regressor's loss, split at its outputs


def nan_on_rank_1_at_step_0(module, batch):
    loss = Regressor.training_step(module, batch, 0)
    if module.trainer.global_rank == 1 and module.trainer.global_step == 0:
        return loss * math.nan
    return loss


class Capture(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.weights = out, None

    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    loss_fn = nan_on_rank_1_at_step_0 if mode == "nan_on_rank_1" else None
    monitors = [
        HessianEigenvalueMonitor(k=2, tol=1e-5, every_n_steps=1, loss_fn=loss_fn),
        HessianTraceMonitor(num_hvps=8, every_n_steps=1, loss_fn=loss_fn),
        SpectralDensityMonitor(num_steps=10, every_n_steps=1, loss_fn=loss_fn),
    ]
    if mode == "ggn":
        ggn = {"every_n_steps": 1, "curvature": "ggn", "loss_fn": SPLIT}
        monitors = [HessianEigenvalueMonitor(k=2, tol=1e-5, **ggn), HessianTraceMonitor(8, **ggn)]
    capture = Capture(out)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2 if mode == "nan_on_rank_1" else 1,
        callbacks=[*monitors, capture],
        logger=CSVLogger(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Regressor(), loader)
    rank = trainer.global_rank
    values = {type(m).__name__: m.last_metrics for m in monitors}
    steps = {type(m).__name__: m.schedule.last_step for m in monitors}
    (out / f"rank{rank}.json").write_text(json.dumps({"values": values, "last_step": steps}))
    torch.save(
        {"probe": monitors[0]._fixed_batches, "weights": capture.weights}, out / f"rank{rank}.pt"
    )


if __name__ == "__main__":
    run_rank(main)
