"""Run by test_ddp_ggn.py: two-process DDP (gloo, CPU) with GGN eigenvalue and trace monitors.

Usage: python ddp_ggn_script.py OUT_DIR MODE (MODE is ignored). Each rank writes
rank<r>.json (its monitors' last values) and rank<r>.pt (its probe batch and the weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from ddp_monitor_script import Capture, Regressor
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import HessianEigenvalueMonitor, HessianTraceMonitor, OutputLoss


def regressor_outputs(module, batch):
    x, y = batch
    return module.net(x).squeeze(-1), y


SPLIT = OutputLoss(regressor_outputs, F.mse_loss)


def main() -> None:
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    monitors = [
        HessianEigenvalueMonitor(k=2, tol=1e-5, every_n_steps=1, curvature="ggn", loss_fn=SPLIT),
        HessianTraceMonitor(num_hvps=8, every_n_steps=1, curvature="ggn", loss_fn=SPLIT),
    ]
    capture = Capture(out)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        callbacks=[*monitors, capture],
        logger=CSVLogger(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Regressor(), loader)
    rank = trainer.global_rank
    values = {type(m).__name__: m.last_metrics for m in monitors}
    (out / f"rank{rank}.json").write_text(json.dumps(values))
    torch.save(
        {"probe": monitors[0]._fixed_batches, "weights": capture.weights}, out / f"rank{rank}.pt"
    )


if __name__ == "__main__":
    main()
