"""Tiny LightningModules, data and log readers shared by the callback tests."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

# Lightning's own advice about tiny CPU runs; never a CurvatureWarning (that one stays an error).
LIGHTNING_NOISE = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*exists and is not empty.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]

CPU = torch.device("cpu")


def assert_identical(a: Any, b: Any, path: str = "") -> None:
    """Recursive exact equality of nested containers of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype, path
        assert a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs (max |diff| {(a - b).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict), path
        assert set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)), path
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# -- data ---------------------------------------------------------------------------------------
def classification_data(n: int = 96, d: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes] + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


def regression_data(n: int = 32, d: int = 5, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d)
    y = x @ torch.randn(d, generator=g) + 0.1 * torch.randn(n, generator=g)
    return TensorDataset(x, y)


def loader(dataset: TensorDataset, batch_size: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def make_optimizer(
    parameters: Iterable[nn.Parameter], name: str, lr: float, **kwargs: Any
) -> torch.optim.Optimizer:
    optimizers = {
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "rmsprop": torch.optim.RMSprop,
    }
    return optimizers[name](parameters, lr=lr, **kwargs)


# -- modules ------------------------------------------------------------------------------------
class BNDropoutClassifier(pl.LightningModule):
    """Linear, BatchNorm, ReLU, Dropout, Linear: everything a probe could disturb."""

    def __init__(self, optimizer: str = "sgd", d: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.net = nn.Sequential(
            nn.Linear(d, 12),
            nn.BatchNorm1d(12),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(12, classes),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class LeastSquares(pl.LightningModule):
    """``mean((x w - y)^2)`` with a bias-free Linear: the Hessian is ``2 XᵀX / n``."""

    def __init__(self, d: int = 5, optimizer: str = "sgd", lr: float = 0.01, **opt: Any) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 1, bias=False)
        self.optimizer_name, self.lr, self.opt = optimizer, lr, opt

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.linear(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.optimizer_name, self.lr, **self.opt)


class TanhRegressor(pl.LightningModule):
    """A small non-quadratic model (its Hessian changes as it trains)."""

    def __init__(
        self, d: int = 5, width: int = 8, optimizer: str = "sgd", lr: float = 0.05
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, 1))
        self.optimizer_name, self.lr = optimizer, lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        kwargs = {"momentum": 0.5} if self.optimizer_name == "sgd" else {}
        return make_optimizer(self.parameters(), self.optimizer_name, self.lr, **kwargs)


def hessian_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    """The loss of TanhRegressor / LeastSquares without going through ``training_step``."""
    x, y = batch
    net = module.net if hasattr(module, "net") else module.linear
    return F.mse_loss(net(x).squeeze(-1), y)


# -- trainers and logs --------------------------------------------------------------------------
def make_trainer(
    callbacks: list[pl.Callback] | None = None,
    logger: Logger | list[Logger] | bool = False,
    **kwargs: Any,
) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks or [], logger=logger, **options)


def csv_logger(tmp_path: Path, name: str = "csv") -> CSVLogger:
    return CSVLogger(tmp_path, name=name)


def tb_logger(tmp_path: Path, name: str = "tb") -> TensorBoardLogger:
    return TensorBoardLogger(tmp_path, name=name, default_hp_metric=False)


def read_csv(logger: CSVLogger) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] in file order, from a CSVLogger's metrics.csv."""
    logger.save()
    out: dict[str, list[tuple[int, float]]] = {}
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    out.setdefault(key, []).append((int(row["step"]), float(value)))
    return out


def read_events(logger: TensorBoardLogger) -> EventAccumulator:
    logger.experiment.flush()
    events = EventAccumulator(
        logger.log_dir,
        size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0},
    )
    events.Reload()
    return events


def tb_scalars(events: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def steps(series: list[tuple[int, float]]) -> list[int]:
    return [step for step, _ in series]
