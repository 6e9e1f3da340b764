"""Edge of stability: full-batch gradient descent sharpens the loss up to 2/lr, then hovers.

Cohen, Kaur, Li, Kolter & Talwalkar (ICLR 2021) observed that under full-batch gradient
descent the top Hessian eigenvalue first rises ("progressive sharpening") until it reaches
the stability threshold 2/lr, and then stays there while the loss keeps falling,
non-monotonically. This script reproduces it on scikit-learn's bundled digits (no download)
with a small tanh network and the MSE loss, logging to TensorBoard:

    python examples/edge_of_stability.py
    tensorboard --logdir lightning_logs

Open the "Custom Scalars" tab: eigenvalue_1 climbs to the stability_threshold line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import mlp, read_scalars, standardized_digits

from lightning_curvature import (
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)


def digits_dataset(num_examples: int) -> TensorDataset:
    """Standardised digits images with one-hot targets (the MSE setting of Cohen et al.)."""
    x, labels = standardized_digits(num_examples)
    return TensorDataset(x, nn.functional.one_hot(labels, 10).float())


class DigitsRegressor(pl.LightningModule):
    """A tanh MLP trained by plain (full-batch) gradient descent on the MSE loss."""

    def __init__(self, lr: float, width: int = 64) -> None:
        super().__init__()
        self.lr = lr
        self.net = mlp(width, nn.Tanh)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = 0.5 * (self.net(x) - y).pow(2).sum(dim=1).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--every-n-steps", type=int, default=25)
    parser.add_argument("--num-examples", type=int, default=1000)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args()

    pl.seed_everything(0)
    dataset = digits_dataset(args.num_examples)
    full_batch = DataLoader(dataset, batch_size=len(dataset))  # gradient descent, not SGD
    callbacks = [
        HessianEigenvalueMonitor(every_n_steps=args.every_n_steps),
        HessianTraceMonitor(num_hvps=16, every_n_steps=20 * args.every_n_steps),
        SpectralDensityMonitor(num_steps=40, every_n_steps=40 * args.every_n_steps),
    ]
    logger = TensorBoardLogger(args.log_dir, name="edge_of_stability")
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=args.every_n_steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsRegressor(args.lr), full_batch)
    summarize(logger.log_dir, 2 / args.lr)


def summarize(log_dir: str, threshold: float) -> None:
    """Read the sharpness ratio back from the TensorBoard event file and print the verdict."""
    history = read_scalars(log_dir, "curvature/sharpness_ratio")
    ratios = torch.tensor([ratio for _, ratio in history])
    print(f"probes: {len(history)}  stability threshold 2/lr = {threshold:.2f}")
    print(" step  sharpness_ratio")
    for step, ratio in history[:: max(1, len(history) // 15)]:
        print(f"{step:5d}  {ratio:.3f}")
    reached = next((i for i, ratio in enumerate(ratios.tolist()) if ratio >= 0.9), None)
    if reached is None:
        print(
            f"CONCLUSION: the edge was not reached (ratio {ratios[0]:.3f} -> {ratios.max():.3f})."
        )
        return
    after = ratios[reached:]
    print(
        f"CONCLUSION: sharpness ratio started at {ratios[0]:.3f}, reached the edge at step "
        f"{history[reached][0]} and then stayed within [{after.min():.3f}, {after.max():.3f}] "
        f"(median {after.median():.3f}) over {len(after)} probes."
    )
    print(f"TensorBoard logs in {log_dir}: tensorboard --logdir {log_dir}")


if __name__ == "__main__":
    main()
