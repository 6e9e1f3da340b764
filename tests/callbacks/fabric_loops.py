"""A Fabric training loop shaped like litgpt's, tiny models and data, for the Fabric tests."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lightning_curvature import FabricMonitors


class BNDropoutNet(nn.Module):
    """Linear, BatchNorm, ReLU, Dropout, Linear: everything a probe could disturb."""

    def __init__(self, d: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TanhNet(nn.Module):
    """A small smooth model whose Hessian changes as it trains."""

    def __init__(self, d: int = 5, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def cross_entropy(module: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y)


def mse(module: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(module(x), y)


def classification_data(n: int = 96, d: int = 6, classes: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes] + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


def regression_data(n: int = 32, d: int = 5) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d)
    y = x @ torch.randn(d, generator=g) + 0.1 * torch.randn(n, generator=g)
    return TensorDataset(x, y)


def make_fabric(log_dir: Path, logger: str = "csv") -> Fabric:
    loggers: list[Logger] = [
        TensorBoardLogger(log_dir, name="fabric") if logger == "tensorboard" else CSVLogger(log_dir)
    ]
    return Fabric(accelerator="cpu", devices=1, loggers=loggers)


def fit(
    fabric: Fabric,
    model: nn.Module,
    optimizer: Any,
    loader: Iterable[Any],
    loss_fn: Any,
    max_steps: int,
    *,
    curvature: FabricMonitors | None = None,
    accumulate: int = 1,
    state: dict[str, Any] | None = None,
    end: bool = True,
) -> dict[str, Any]:
    """litgpt's loop in small: micro-batches, no backward sync while accumulating, a step count.

    ``state["step_count"]`` and ``state["iter_num"]`` go on from where they are (a resume);
    the loop stops after ``max_steps`` optimizer steps in all, where training ends if ``end``
    (else it is only interrupted, to be resumed).
    """
    state = {"step_count": 0, "iter_num": 0} if state is None else state
    for epoch in itertools.count():
        for batch in loader:
            if state["step_count"] >= max_steps:
                if curvature is not None and end:
                    curvature.on_train_end(state["step_count"])
                return state
            state["iter_num"] += 1
            is_accumulating = state["iter_num"] % accumulate != 0
            if curvature is not None:
                curvature.on_train_batch_start(state["step_count"], batch, epoch=epoch)
            with fabric.no_backward_sync(model, enabled=is_accumulating):
                fabric.backward(loss_fn(model, batch) / accumulate)
            if not is_accumulating:
                if curvature is not None:
                    curvature.on_before_optimizer_step()
                optimizer.step()
                optimizer.zero_grad()
                state["step_count"] += 1
    raise AssertionError("unreachable")
