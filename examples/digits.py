"""What the examples share: the bundled digits, a small MLP, a classifier, reading back.

The digits (1797 8x8 images, 10 classes) ship inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import shlex
import sys

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn


def standardized_digits(num_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_examples`` images (all by default), each pixel standardised, and labels."""
    data = load_digits()
    x = torch.tensor(data.data[:num_examples], dtype=torch.float32)
    return (x - x.mean(0)) / (x.std(0) + 1e-6), torch.tensor(data.target[:num_examples])


def mlp(width: int, activation: type[nn.Module] = nn.ReLU, hidden_layers: int = 2) -> nn.Sequential:
    """``64 -> width (-> width)* -> 10`` with ``activation`` after every hidden layer."""
    layers: list[nn.Module] = []
    size = 64
    for _ in range(hidden_layers):
        layers += [nn.Linear(size, width), activation()]
        size = width
    return nn.Sequential(*layers, nn.Linear(size, 10))


class DigitsClassifier(pl.LightningModule):
    """``net`` trained on the cross-entropy loss with SGD (and momentum)."""

    def __init__(self, net: nn.Module, lr: float = 0.05, momentum: float = 0.0) -> None:
        super().__init__()
        self.net, self.lr, self.momentum = net, lr, momentum

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def tensorboard_hint(log_dir: str) -> str:
    """The command that serves ``log_dir``, runnable as printed (no ``tensorboard`` on PATH)."""
    return f"{shlex.quote(sys.executable)} -m tensorboard.main --logdir {shlex.quote(str(log_dir))}"


def read_scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one scalar, read back from the TensorBoard event files."""
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]
