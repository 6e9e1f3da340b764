"""Run by test_fsdp_faults.py: FSDP2 (2 processes, gloo) where rank 1 alone fails in probes.

Usage: python fsdp_faults_script.py OUT_DIR. An MLP sharded with ``fully_shard``
under ``ModelParallelStrategy`` trains twice from the same start with ``SAM``: with the
three sharded monitors probing at every step while rank 1 fails once at each step of
``FAULTS``, and without monitors (the SAM fault of step 5 in both). The eigenvalue monitor
probes 8 examples on rank 0 and 3 on rank 1 (the union batch's λ₁ is checked at step 0).
Each rank writes rank<r>.pt: the full weights at the end of both trainings, the step-0
weights and probe, the step-0 λ₁, the steps each monitor logged and (rank 0) its warnings.

What the agreement covers under FSDP2 and these faults use: a failure outside FSDP's own
collectives, met at the status checked before each sharded module's forward and before each
backward. Rank 1 only:

1. a ``RuntimeError`` at the top of its first eval-mode ``training_step`` of step 1 (before
   the forward's all-gathers);
2. a ``RuntimeError`` in its fifth gradient of step 2: the third finite-difference
   Hessian-vector product, mid-Lanczos;
3. a ``torch.OutOfMemoryError`` at the top of its second eval-mode ``training_step`` of step 3
   (the eigenvalue monitor's first product, after the forward that opened its probe);
4. a NaN loss in its first eval-mode ``training_step`` of step 4;
5. a ``RuntimeError`` at the top of SAM's second pass at step 5.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from launch import run_rank
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import (
    SAM,
    CurvatureWarning,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)
from lightning_curvature.functional.operator.sharded_gradients import ShardedGradients

MAX_STEPS = 7
RANK = int(os.environ.get("LOCAL_RANK", "0"))
PROBE_SIZES = (8, 3)  # the eigenvalue monitor's probe on rank 0 and rank 1
#: step: (what rank 1 raised, whose probe it ends)
FAULTS = {
    1: ("RuntimeError: rank 1 failed before its forward", "HessianEigenvalueMonitor"),
    2: ("RuntimeError: injected into gradient 5", "HessianEigenvalueMonitor"),
    3: ("OutOfMemoryError: CUDA out of memory (injected)", "HessianEigenvalueMonitor"),
    4: ("NonFiniteCurvatureError: the probe loss is not finite (nan)", "HessianEigenvalueMonitor"),
    5: ("RuntimeError: rank 1 failed in its second pass", "SAM"),
}


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 1))


def loss_of(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (net(x).squeeze(-1) - y).pow(2).mean()


def examples(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randn(n, generator=g))


class Sharded(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()
        self.calls: dict[tuple[int, bool], list[int]] = {}  # counted in place (isolation)

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        step = self.trainer.global_step
        count = self.calls.setdefault((step, self.training), [0])
        count[0] += 1
        loss = loss_of(self.net, batch) if RANK == 0 else self._faulty(step, count[0], batch)
        return loss

    def _faulty(self, step: int, count: int, batch: Any) -> torch.Tensor:
        if not self.training and (step, count) == (1, 1):
            raise RuntimeError("rank 1 failed before its forward")
        if not self.training and (step, count) == (3, 2):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        if self.training and (step, count) == (5, 2):  # SAM's second pass
            raise RuntimeError("rank 1 failed in its second pass")
        loss = loss_of(self.net, batch)
        return loss * math.nan if not self.training and (step, count) == (4, 1) else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FaultyGradients:
    """Rank 1's fifth sharded gradient of step 2 (the third product's first) raises."""

    def __init__(self) -> None:
        self.step, self.count = -1, 0
        original = ShardedGradients.gradient

        def gradient(sharded: ShardedGradients, vs: list[torch.Tensor], step: float) -> Any:
            self.count += 1
            if RANK == 1 and self.step == 2 and self.count == 5:
                raise RuntimeError("injected into gradient 5")
            return original(sharded, vs, step)

        ShardedGradients.gradient = gradient  # type: ignore[method-assign]


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered (a collective: all ranks call it)."""
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in module.named_parameters()
    }


class Capture(pl.Callback):
    """The step, for ``FaultyGradients``; the full step-0 weights (first in the list)."""

    def __init__(self, faulty: FaultyGradients) -> None:
        self.faulty = faulty
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.faulty.step, self.faulty.count = trainer.global_step, 0
        if trainer.global_step == 0:
            self.initial = full_weights(pl_module.net)


def fit(out: Path, callbacks: list[pl.Callback], name: str) -> tuple[pl.Trainer, Sharded]:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=MAX_STEPS,
        callbacks=callbacks,
        logger=CSVLogger(out, name=name),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = Sharded()
    trainer.fit(module, DataLoader(examples(128, 0), batch_size=8))
    return trainer, module


def main() -> None:
    out = Path(sys.argv[1])
    faulty = FaultyGradients()
    capture = Capture(faulty)
    probe = DataLoader(examples(PROBE_SIZES[RANK], 10 + RANK), batch_size=PROBE_SIZES[RANK])
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=1, probe_dataloader=probe),
        HessianTraceMonitor(num_hvps=4, every_n_steps=1),
        SpectralDensityMonitor(num_steps=4, num_points=10, every_n_steps=1),
    ]
    first_eigenvalue: list[float] = []

    class FirstProbe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:  # the step-0 probe has been logged
                first_eigenvalue.append(monitors[0].last_metrics["curvature/eigenvalue_1"])

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", CurvatureWarning)
        trainer, module = fit(out, [capture, *monitors, FirstProbe(), SAM(rho=0.05)], "faults")
    said = [str(r.message) for r in records if issubclass(r.category, CurvatureWarning)]
    with_monitors = full_weights(module.net)
    _, plain = fit(out, [Capture(faulty), SAM(rho=0.05)], "plain")
    torch.save(
        {
            "final": with_monitors,
            "final_without_monitors": full_weights(plain.net),
            "initial": capture.initial,
            "probe": list(monitors[0].fixed_probe or []),
            "eigenvalue_1": first_eigenvalue[0],
            "warnings": said,
            "last_probe": [m.schedule.last_step for m in monitors],
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    run_rank(main)
