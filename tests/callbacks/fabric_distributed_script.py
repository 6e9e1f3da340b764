"""Run by test_distributed.py: a two-process Fabric loop (CPU, gloo) with the monitors.

Usage: python fabric_distributed_script.py OUT_DIR MODE, MODE in {"ddp", "fsdp2"}.

``ddp``: ``Fabric(strategy="ddp")``; ``fsdp2``: ``ModelParallelStrategy`` whose
``parallelize_fn`` shards every linear layer and the net with ``fully_shard``. Each mode
trains a smooth MLP for ``MAX_STEPS`` steps twice, with the eigenvalue, trace and density
monitors (probing at steps 0 and 2) and without them. Each rank writes rank<r>.json (the
monitors' last values and the step they probed last) and rank<r>.pt (its probe batch, the
full weights at every step start, the final full weights of both runs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import (
    FabricMonitors,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)
from tests.distributed.launch import run_rank

LR = 0.1
MAX_STEPS = 3


def make_net() -> nn.Sequential:
    torch.manual_seed(0)  # the same weights on every rank
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 1))


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 5, generator=g), torch.randn(64, generator=g))


def loss_fn(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (net(x).squeeze(-1) - y).pow(2).mean()


def shard(net: nn.Module, mesh: Any) -> nn.Module:
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["data_parallel"])
    fully_shard(net, mesh=mesh["data_parallel"])
    return net


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered (a collective: all ranks call it)."""
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in module.named_parameters()
    }


def fit(fabric: Fabric, monitors: list[Any]) -> tuple[nn.Module, dict[int, Any]]:
    """``MAX_STEPS`` steps of SGD; the full weights at every step start."""
    net = make_net()
    if isinstance(fabric.strategy, ModelParallelStrategy):
        model = fabric.setup_module(net)  # sharded by parallelize_fn
        optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=LR))
    else:
        model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=LR))
    loader = fabric.setup_dataloaders(DataLoader(data(), batch_size=8, shuffle=True))
    curvature = (
        FabricMonitors(fabric, model, optimizer, monitors, loss_fn=loss_fn, probe_data=loader)
        if monitors
        else None
    )
    weights: dict[int, Any] = {}
    for step, batch in zip(range(MAX_STEPS), loader, strict=False):
        weights[step] = full_weights(model.module)
        if curvature is not None:
            curvature.on_train_batch_start(step, batch)
        fabric.backward(loss_fn(model, batch))
        optimizer.step()
        optimizer.zero_grad()
    return model.module, weights


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    strategy: Any = "ddp"
    if mode == "fsdp2":
        strategy = ModelParallelStrategy(shard, data_parallel_size=2, tensor_parallel_size=1)
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy, loggers=CSVLogger(out))
    fabric.launch()
    fabric.seed_everything(0)
    monitors = [
        # (finite differences under FSDP2 resolve eigenvalues to about 4e-4, not 1e-5)
        HessianEigenvalueMonitor(k=2, tol=1e-5 if mode == "ddp" else 1e-3, every_n_steps=2),
        HessianTraceMonitor(num_hvps=8, every_n_steps=2),
        SpectralDensityMonitor(num_steps=6, every_n_steps=2),
    ]
    model, weights = fit(fabric, monitors)
    with_monitors = full_weights(model)
    fabric.seed_everything(0)
    plain, _ = fit(fabric, [])
    without = full_weights(plain)
    rank = fabric.global_rank
    report = {
        "values": {type(m).__name__: m.last_metrics for m in monitors},
        "last_step": {type(m).__name__: m.schedule.last_step for m in monitors},
        "world_size": fabric.world_size,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    torch.save(
        {
            "probe": list(monitors[0].fixed_probe or []),
            "weights": weights,
            "final": with_monitors,
            "final_without_monitors": without,
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    run_rank(main)
