"""Run by test_ddp_landscape.py: two-process DDP (gloo, CPU) with the landscape monitors.

Usage: python ddp_landscape_script.py OUT_DIR (with|without). Each rank writes rank<r>.json
(the monitors' last values) and rank<r>.pt (its probe batches, the weights at the start of
steps 1 and 2, the optimizer's state at step 2 and the final weights).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from ddp_monitor_script import Regressor
from launch import run_rank
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import CriticalSharpnessMonitor, LossLandscapeMonitor


class Snapshots(pl.Callback):
    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizers: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = pl_module.state_dict()
        self.weights[trainer.global_step] = {k: v.clone() for k, v in state.items()}
        self.optimizers[trainer.global_step] = copy.deepcopy(trainer.optimizers[0].state_dict())


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    monitors = (
        [
            LossLandscapeMonitor(every_n_steps=2, num_points=5, tol=1e-5),
            CriticalSharpnessMonitor(every_n_steps=2, rtol=1e-4),
        ]
        if mode == "with"
        else []
    )
    snapshots = Snapshots()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        callbacks=[snapshots, *monitors],
        logger=CSVLogger(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = Regressor()
    trainer.fit(module, loader)
    rank = trainer.global_rank
    values = {type(m).__name__: m.last_metrics for m in monitors}
    (out / f"rank{rank}.json").write_text(json.dumps({"values": values}))
    torch.save(
        {
            "probe": [list(m.fixed_probe or []) for m in monitors],
            "weights": {step: snapshots.weights[step] for step in (1, 2)},
            "optimizer": snapshots.optimizers[2],
            "final": module.state_dict(),
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    run_rank(main)
