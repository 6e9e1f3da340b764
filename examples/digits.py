"""What the examples share: scikit-learn's bundled digits, a small MLP, and reading back.

The digits (1797 8x8 images, 10 classes) ship inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

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


def read_scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one scalar, read back from the TensorBoard event files."""
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]
