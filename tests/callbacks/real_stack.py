"""A LightningModule written as users write them, with everything a probe could disturb.

Shared by the single-process trajectory test and the two-process DDP script: a torchmetrics
metric updated and logged in ``training_step``, a DropPath, functional dropout, SDPA with
``dropout_p`` when training, a ``spectral_norm`` parametrization, BatchNorm, AdamW with a
warmup from lr 0 (``LambdaLR``), ``training_step(self, batch)`` without ``batch_idx``, ``None``
returned on some batches (every fifth call; Lightning refuses it under DDP, so the DDP
script turns it off) and a counter set on the module by ``training_step``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.data import DataLoader, TensorDataset

CLASSES = 3


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: drops whole examples' residual branches."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p).to(x)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Self-attention through SDPA, attention dropout only when training (as HF GPT-2)."""

    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = spectral_norm(nn.Linear(d, d))
        self.drop_path = DropPath(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(x).chunk(3, dim=-1)
        )
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2 if self.training else 0.0)
        return x + self.drop_path(self.proj(a.transpose(1, 2).reshape(b, t, d)))


class RealStack(pl.LightningModule):
    def __init__(self, d: int = 8, skip_every: int | None = 5) -> None:
        super().__init__()
        self.skip_every = skip_every
        self.embed = nn.Linear(4, d)
        self.attention = Attention(d)
        self.norm = nn.BatchNorm1d(d)
        self.head = nn.Linear(d, CLASSES)
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=CLASSES)
        self.calls = 0

    def training_step(self, batch: Any) -> torch.Tensor | None:
        self.calls += 1
        if self.skip_every and self.calls % self.skip_every == 0:
            return None  # skip this batch, Lightning's way (not supported under DDP)
        x, y = batch
        h = self.norm(self.attention(self.embed(x)).mean(dim=1))
        logits = self.head(F.dropout(F.gelu(h), p=0.25, training=self.training))
        loss = F.cross_entropy(logits, y)
        self.accuracy(logits, y)
        self.log("train_acc", self.accuracy)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 4))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def real_stack_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, 4, generator=g)
    y = (x.mean(dim=1)[:, :CLASSES] + 0.3 * torch.randn(n, CLASSES, generator=g)).argmax(1)
    return TensorDataset(x, y)


def real_stack_loader(batch_size: int = 8) -> DataLoader:
    return DataLoader(real_stack_data(), batch_size=batch_size, shuffle=True)


def final_state(model: RealStack, trainer: pl.Trainer) -> dict[str, Any]:
    """Everything training leaves behind that a probe could have changed."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "metric": {k: v.clone() for k, v in model.accuracy.metric_state.items()},
        "metric_updates": model.accuracy.update_count,
        "calls": model.calls,
        "torch_rng": torch.get_rng_state(),
    }
