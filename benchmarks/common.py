"""Models, data, exact Hessians and timing helpers shared by the curvature benchmarks.

Everything is deterministic given a seed: the CNN's images are noisy copies of ten fixed
random class templates; the MLP uses scikit-learn's bundled digits (no download).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.metadata
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


# -- models ------------------------------------------------------------------------------
def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU and 2x2 max-pooling."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def make_cnn(seed: int = 0) -> nn.Module:
    """A 95k-parameter CNN with BatchNorm for 3x32x32 inputs and 10 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        conv_block(3, 32),
        conv_block(32, 64),
        conv_block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def make_mlp(seed: int = 0, hidden: int = 28) -> nn.Module:
    """A 2.1k-parameter tanh MLP for the 64-pixel digits and 10 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable(model: nn.Module) -> list[torch.Tensor]:
    """The trainable parameters, in ``named_parameters`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on ``(inputs, labels)``."""
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


# -- data --------------------------------------------------------------------------------
def synthetic_images(num: int, seed: int = 0) -> Batch:
    """``num`` noisy 3x32x32 images of 10 random class templates (a learnable task)."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (num,), generator=generator)
    images = 0.3 * templates[labels] + torch.randn(num, 3, 32, 32, generator=generator)
    return images, labels


def digits() -> Batch:
    """scikit-learn's 1797 8x8 digits, standardised per pixel, in a seeded random order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32)
    inputs = (inputs - inputs.mean(0)) / inputs.std(0).clamp_min(1e-6)
    order = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(0))
    return inputs[order], torch.tensor(data.target, dtype=torch.long)[order]


def head(data: Batch, size: int) -> Batch:
    """The first ``size`` examples of ``data``."""
    return data[0][:size], data[1][:size]


def minibatches(data: Batch, size: int, seed: int) -> Iterator[Batch]:
    """An endless seeded stream of random minibatches of ``data``."""
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = data
    while True:
        index = torch.randperm(inputs.shape[0], generator=generator)[:size]
        yield inputs[index], labels[index]


# -- training ----------------------------------------------------------------------------
def train_sgd(model: nn.Module, batches: Iterator[Batch], steps: int, lr: float) -> None:
    """``steps`` SGD steps (momentum 0.9) in train mode; leaves the model in eval mode."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, next(batches)).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()


def clear_grads(model: nn.Module) -> None:
    """Drop every ``.grad`` (PyHessian leaves gradients that still hold its graph)."""
    for p in model.parameters():
        p.grad = None
    gc.collect()


# -- exact Hessians ----------------------------------------------------------------------
def dense_hessian(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The exact ``(P, P)`` Hessian of the mean loss by ``torch.func.hessian``, in float64."""
    model64 = copy.deepcopy(model).to(torch.float64)
    named = [(n, p.detach()) for n, p in model64.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    inputs, labels = batch[0].to(torch.float64), batch[1]

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, sizes)
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(model64, params, (inputs,)), labels)

    flat = torch.cat([p.reshape(-1) for _, p in named])
    return torch.func.hessian(flat_loss)(flat).detach()


# -- machine -----------------------------------------------------------------------------
def machine(*packages: str) -> str:
    """CPU model, cores, torch (and its threads), Python, and the versions of ``packages``."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = "".join(f", {name} {importlib.metadata.version(name)}" for name in packages)
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads){versions}, Python {platform.python_version()}"
    )


def load_average() -> str:
    """The 1, 5 and 15-minute load averages (how busy the shared machine was)."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def summary(started: float, load: str) -> str:
    """Minutes since ``started`` (``perf_counter``) and the load averages then and now."""
    minutes = (time.perf_counter() - started) / 60
    return (
        f"{minutes:.1f} min; load average (1, 5, 15 min) {load} at start, {load_average()} at end"
    )


# -- timing ------------------------------------------------------------------------------
@dataclass
class Timings:
    """Wall times (seconds) per label, gathered over interleaved repeats."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, label: str, seconds: float) -> None:
        """Record one measurement."""
        self.seconds.setdefault(label, []).append(seconds)

    def best(self, label: str) -> float:
        """Minimum over repeats (the least disturbed run)."""
        return min(self.seconds[label])

    def spread(self, label: str) -> float:
        """``max / min`` over repeats: 1.0 on a quiet machine."""
        values = self.seconds[label]
        return max(values) / min(values)


def timed(function: Callable[[], object]) -> tuple[float, object]:
    """Run ``function`` once after a garbage collection; return its wall time and result."""
    gc.collect()
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def per_call_seconds(function: Callable[[], object], calls: int) -> float:
    """Mean wall time of ``calls`` consecutive calls of ``function`` (after one warm-up)."""
    function()
    gc.collect()
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls


def relative_error(estimate: float, truth: float) -> float:
    """``|estimate - truth| / |truth|``."""
    return abs(estimate - truth) / abs(truth)


def fmt_range(values: Sequence[float], spec: str = ".0f") -> str:
    """``median [min–max]`` of a few values, or the value alone if they are all equal."""
    low, mid, high = min(values), statistics.median(values), max(values)
    if format(low, spec) == format(high, spec):
        return format(mid, spec)
    return f"{format(mid, spec)} [{format(low, spec)}–{format(high, spec)}]"


def quiet() -> None:
    """Silence Lightning's banners and the warnings of small one-batch-epoch CPU runs."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
    warnings.filterwarnings("ignore", message=".*does not have many workers")
