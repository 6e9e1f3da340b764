"""Edge of stability: full-batch gradient descent sharpens the loss up to 2/lr, then hovers.

Cohen, Kaur, Li, Kolter & Talwalkar (ICLR 2021) observed that under full-batch gradient
descent the top Hessian eigenvalue first rises ("progressive sharpening") until it reaches
the stability threshold 2/lr, and then stays there while the loss keeps falling,
non-monotonically. This script reproduces it on scikit-learn's bundled digits (no download)
with a small tanh network and the MSE loss, logging to TensorBoard:

    python examples/edge_of_stability.py
    python -m tensorboard.main --logdir lightning_logs

Open the "Custom Scalars" tab: eigenvalue_1 climbs to the stability_threshold line.

With ``--optimizer adamw`` the same run uses full-batch AdamW, whose edge is the one of the
*preconditioned* sharpness λ₁(P⁻¹H) against (2 + 2β₁)/((1 − β₁) lr) = 38/lr (Cohen et al.,
"Adaptive gradient methods at the edge of stability", 2022): the raw λ₁ stays far below
38/lr, and the Custom Scalars tab charts the preconditioned one against it.
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
from digits import mlp, read_scalars, standardized_digits, tensorboard_hint

from lightning_curvature import (
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)


def digits_dataset(num_examples: int) -> TensorDataset:
    """Standardised digits images with one-hot targets (the MSE setting of Cohen et al.)."""
    x, labels = standardized_digits(num_examples)
    return TensorDataset(x, nn.functional.one_hot(labels, 10).float())


class DigitsRegressor(pl.LightningModule):
    """A tanh MLP trained by full-batch gradient descent (or AdamW) on the MSE loss."""

    def __init__(self, lr: float, width: int = 64, optimizer: str = "sgd") -> None:
        super().__init__()
        self.lr, self.optimizer = lr, optimizer
        self.net = mlp(width, nn.Tanh)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = 0.5 * (self.net(x) - y).pow(2).sum(dim=1).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


DEFAULT_LR = {"sgd": 0.2, "adamw": 4e-3}
DEFAULT_STEPS = {"sgd": 3000, "adamw": 800}  # AdamW at 4e-3 reaches its edge within ~150


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default="sgd")
    parser.add_argument("--lr", type=float, help="default: 0.2 (sgd), 4e-3 (adamw)")
    parser.add_argument("--max-steps", type=int, help="default: 3000 (sgd), 800 (adamw)")
    parser.add_argument("--every-n-steps", type=int, default=25)
    parser.add_argument("--num-examples", type=int, default=1000)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args()
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    max_steps = args.max_steps or DEFAULT_STEPS[args.optimizer]
    every = args.every_n_steps

    pl.seed_everything(0)
    dataset = digits_dataset(args.num_examples)
    full_batch = DataLoader(dataset, batch_size=len(dataset))  # gradient descent, not SGD
    callbacks = [
        HessianEigenvalueMonitor(every_n_steps=every),
        # about 10 traces, 4 densities and 15 coherences per run, whatever its length
        HessianTraceMonitor(num_hvps=16, every_n_steps=max(every, max_steps // 10)),
        SpectralDensityMonitor(num_steps=40, every_n_steps=max(every, max_steps // 4)),
        # per-example gradients of 128 of the examples (all 1000 would cost 8x as much)
        GradientCoherenceMonitor(
            every_n_steps=max(every, max_steps // 15),
            probe_dataloader=DataLoader(dataset, batch_size=128, shuffle=True),
        ),
    ]
    name = "edge_of_stability" + ("" if args.optimizer == "sgd" else f"_{args.optimizer}")
    logger = TensorBoardLogger(args.log_dir, name=name)
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,  # one batch an epoch (Lightning warns of any longer interval)
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsRegressor(lr, optimizer=args.optimizer), full_batch)
    threshold = f"2/lr = {2 / lr:.2f}" if args.optimizer == "sgd" else f"38/lr = {38 / lr:.0f}"
    summarize(logger.log_dir, threshold)


def summarize(log_dir: str, threshold: str) -> None:
    """Read the sharpness ratio back from the TensorBoard event file and print the verdict."""
    history = read_scalars(log_dir, "curvature/sharpness_ratio")
    ratios = torch.tensor([ratio for _, ratio in history])
    print(f"probes: {len(history)}  stability threshold {threshold}")
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
    print(f"TensorBoard logs in {log_dir}: {tensorboard_hint(log_dir)}")


if __name__ == "__main__":
    main()
