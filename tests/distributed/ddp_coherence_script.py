"""Run by test_ddp_coherence.py: two-process DDP (gloo, CPU), accumulation 2, 3 steps.

Usage: python ddp_coherence_script.py OUT_DIR MODE, MODE in {"monitors", "plain", "sam"}.
"monitors" trains with GradientCoherenceMonitor for each source, measuring at steps 0 and 2;
"plain" trains without them; "sam" with the source="ddp" monitor and SAM, whose second pass
replaces .grad after the backward. Each rank writes rank<r>.json (every monitor's values at step 2)
and rank<r>.pt: its fixed probe batch, the weights before step 2, the micro-batches of step 2
and the final weights.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from launch import run_rank
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import SAM, GradientCoherenceMonitor

MEASURED = 2


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.5)


class Capture(pl.Callback):
    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] | None = None
        self.micro_batches: list[list[torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == MEASURED:
            if self.weights is None:
                self.weights = copy.deepcopy(pl_module.state_dict())
            self.micro_batches.append([t.clone() for t in batch])


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, :3] + 0.5 * torch.randn(96, 3, generator=g)).argmax(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True)
    ddp = GradientCoherenceMonitor(source="ddp", every_n_steps=MEASURED, per_layer=True)
    monitors = {
        "monitors": [
            GradientCoherenceMonitor(every_n_steps=MEASURED, per_layer=True),
            GradientCoherenceMonitor(source="accumulation", every_n_steps=MEASURED, per_layer=True),
            ddp,
        ],
        "plain": [],
        "sam": [ddp],
    }[mode]
    others = [SAM(rho=0.5)] if mode == "sam" else []
    capture = Capture()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=MEASURED + 1,
        accumulate_grad_batches=2,
        callbacks=[capture, *monitors, *others],
        logger=CSVLogger(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = Classifier()
    trainer.fit(model, loader)
    rank = trainer.global_rank
    values = {m.source: m.last_metrics for m in monitors}
    steps = {m.source: m.schedule.last_step for m in monitors}
    (out / f"rank{rank}.json").write_text(json.dumps({"values": values, "last_step": steps}))
    torch.save(
        {
            "probe": list(monitors[0].fixed_probe or []) if mode == "monitors" else None,
            "weights": capture.weights,
            "micro_batches": capture.micro_batches,
            "final": model.state_dict(),
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    run_rank(main)
