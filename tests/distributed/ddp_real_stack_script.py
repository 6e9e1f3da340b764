"""Run by test_ddp_real_stack.py: two-process DDP (gloo, CPU) on ``real_stack.RealStack``.

Usage: python ddp_real_stack_script.py OUT_DIR MODE, MODE in

* ``"without"``: plain training;
* ``"with"``: the same with every monitor probing every other step, and a coherence monitor
  whose probe gives each rank one sample (the ranks pool theirs before deciding);
* ``"sam_unused"``: ``SAM(perturbation="per_replica")`` on a module whose ranks leave
  different parameters unused.

Each rank writes rank<r>.pt (its final state) and rank<r>.json (CurvatureWarnings seen).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from launch import run_rank
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parents[1] / "callbacks"))
from real_stack import RealStack, final_state, real_stack_loader

from lightning_curvature import (
    SAM,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)
from lightning_curvature.errors import CurvatureWarning


class TwoBranches(pl.LightningModule):
    """Rank 0 trains branch ``a``, rank 1 branch ``b``: each leaves the other unused."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        head = self.a if self.trainer.global_rank == 0 else self.b
        return (head(torch.tanh(self.shared(x))).squeeze(-1) - y).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def monitors() -> list[pl.Callback]:
    return [
        HessianEigenvalueMonitor(k=2, tol=1e-2, every_n_steps=2),
        HessianTraceMonitor(num_hvps=4, every_n_steps=2),
        SpectralDensityMonitor(num_steps=6, num_points=10, every_n_steps=2),
        GradientCoherenceMonitor(mode="micro_batch", micro_batch_size=None, every_n_steps=2),
    ]


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    pl.seed_everything(7, verbose=False)
    if mode == "sam_unused":
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, 3, generator=g), torch.randn(32, generator=g))
        model: pl.LightningModule = TwoBranches()
        loader, callbacks = (
            DataLoader(data, batch_size=4),
            [SAM(rho=0.1, perturbation="per_replica")],
        )
        strategy = DDPStrategy(process_group_backend="gloo", find_unused_parameters=True)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        steps, accumulate = 3, 1
    else:
        model, loader = RealStack(skip_every=None), real_stack_loader()
        callbacks = monitors() if mode == "with" else []
        strategy, initial, steps, accumulate = DDPStrategy(process_group_backend="gloo"), {}, 8, 2
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=CSVLogger(out, name=mode),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CurvatureWarning)
        trainer.fit(model, loader)
    rank = trainer.global_rank
    seen = [str(w.message) for w in caught if issubclass(w.category, CurvatureWarning)]
    last = {type(c).__name__: getattr(c, "last_metrics", {}) for c in callbacks}
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps({"warnings": seen, "last": last}))
    if isinstance(model, RealStack):
        state = final_state(model, trainer)
    else:
        state = {"initial": initial, "final": dict(model.state_dict())}
    torch.save(state, out / f"{mode}_rank{rank}.pt")


if __name__ == "__main__":
    run_rank(main)
