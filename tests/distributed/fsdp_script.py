"""Run by test_fsdp.py: two processes (gloo, CPU) under ModelParallelStrategy with FSDP2.

Usage: python fsdp_script.py OUT_DIR MODE, MODE in {"monitors", "bounded", "sam", "kink"}.

``monitors``: trains a smooth MLP sharded with ``fully_shard`` twice, with the three
Hessian monitors (probing at steps 0 and 2) and without; each rank writes rank<r>.json (the
monitors' last values, the step they probed last, seconds) and rank<r>.pt (its probe batch,
the full weights at every step start, the final full weights of both trainings).
``bounded``: the same with the top 2 eigenvalues and every basis held to a few rows, as
above ``FULL_BASIS_ENTRIES`` (set to 1 here): thick restarts, two-row SLQ.
``sam``: trains with ``SAM``; each rank writes its training batches and the full weights.
``kink``: a top-2 mixture of experts whose router has two experts tied (every token near
the routing kink), with the three monitors (finite differences, the only backend over
shards); each rank writes what its monitors logged and the CurvatureWarnings it saw.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

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
from lightning_curvature.functional.linalg import basis
from lightning_curvature.functional.linalg.basis import ThickRestart
from lightning_curvature.functional.linalg.lanczos import LanczosProcess

LR = 0.1
RHO = 0.05
MAX_STEPS = 3


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 1))


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 5, generator=g), torch.randn(64, generator=g))


def loss_of(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (net(x).squeeze(-1) - y).pow(2).mean()


class TiedExperts(nn.Module):
    """Top-2 routing over 4 tanh experts, the router's rows of experts 1 and 2 1e-4 apart:
    wherever they are a token's second and third choices, the routing is at its kink."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(5, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(5, 5) for _ in range(4))
        self.head = nn.Linear(5, 1)
        with torch.no_grad():
            self.router.weight[2] = self.router.weight[1] + 1e-4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.router(x).softmax(-1).topk(2, dim=-1)
        outputs = torch.stack([torch.tanh(expert(x)) for expert in self.experts], dim=1)
        picked = outputs.gather(1, chosen.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))
        return self.head((weights.unsqueeze(-1) * picked).sum(1))


class Sharded(pl.LightningModule):
    def __init__(self, make: Callable[[], nn.Module] = make_net, lr: float = LR) -> None:
        super().__init__()
        self.net = make()
        self.lr = lr

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.modules():
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return loss_of(self.net, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered (a collective: all ranks call it)."""
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in module.named_parameters()
    }


class Capture(pl.Callback):
    """The full weights at each step start and each rank's training batches."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights[trainer.global_step] = full_weights(pl_module.net)
        self.batches.append(tuple(t.clone() for t in batch))


def fit(
    callbacks: list[pl.Callback],
    out: Path,
    make: Callable[[], nn.Module] = make_net,
    lr: float = LR,
) -> tuple[pl.Trainer, Sharded]:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=MAX_STEPS,
        callbacks=callbacks,
        logger=CSVLogger(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = Sharded(make, lr)
    trainer.fit(module, DataLoader(data(), batch_size=8))
    return trainer, module


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    capture = Capture()
    if mode in ("monitors", "bounded"):
        restarts: list[int] = []
        if mode == "bounded":
            basis.FULL_BASIS_ENTRIES = 1
            restart = LanczosProcess._thick_restart

            def counted(run: LanczosProcess, thick: ThickRestart) -> None:
                restarts.append(run.num_steps)
                restart(run, thick)

            LanczosProcess._thick_restart = counted  # type: ignore[method-assign]
        monitors = [
            HessianEigenvalueMonitor(k=1 if mode == "monitors" else 2, every_n_steps=2),
            HessianTraceMonitor(num_hvps=8, every_n_steps=2),
            SpectralDensityMonitor(num_steps=6, every_n_steps=2),
        ]
        started = time.perf_counter()
        trainer, module = fit([capture, *monitors], out)
        seconds = time.perf_counter() - started
        with_monitors = full_weights(module.net)
        started = time.perf_counter()
        _, plain = fit([], out)
        plain_seconds = time.perf_counter() - started
        without = full_weights(plain.net)
        rank = trainer.global_rank
        report = {
            "values": {type(m).__name__: m.last_metrics for m in monitors},
            "last_step": {type(m).__name__: m.schedule.last_step for m in monitors},
            "seconds": seconds,
            "plain_seconds": plain_seconds,
            "restarts": restarts,
        }
        (out / f"rank{rank}.json").write_text(json.dumps(report))
        torch.save(
            {
                "probe": list(monitors[0].fixed_probe or []),
                "weights": capture.weights,
                "final": with_monitors,
                "final_without_monitors": without,
            },
            out / f"rank{rank}.pt",
        )
    elif mode == "kink":
        monitors = [
            HessianEigenvalueMonitor(every_n_steps=1, stability=False),
            HessianTraceMonitor(num_hvps=8, every_n_steps=1),
            SpectralDensityMonitor(num_steps=6, every_n_steps=1),
        ]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CurvatureWarning)
            trainer, module = fit(monitors, out, TiedExperts, lr=0.0)  # the tie stays
        report = {
            "values": {type(m).__name__: m.last_metrics for m in monitors},
            "warnings": [str(w.message) for w in caught if w.category is CurvatureWarning],
            "steps": trainer.global_step,
        }
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
    else:
        sam = SAM(rho=RHO)
        trainer, module = fit([capture, sam], out)
        torch.save(
            {
                "batches": capture.batches,
                "initial": capture.weights[0],
                "final": full_weights(module.net),
                "sam_steps": sam.num_sam_steps,
                "metrics": sam.last_metrics,
            },
            out / f"rank{trainer.global_rank}.pt",
        )


if __name__ == "__main__":
    run_rank(main)
