"""SGD against SAM on scikit-learn's digits: SAM ends in a flatter minimum.

Sharpness-aware minimisation (Foret et al., ICLR 2021) steps with the gradient at
``w + ρ g/‖g‖``, the (first-order) worst point of a small ball around the weights, and so
prefers minima whose loss stays low in a whole neighbourhood. This script trains the same
small MLP on the bundled digits (no download) twice from the same initialisation and data
order, once with plain SGD and once with the ``SAM`` callback added, and then measures the
sharpness of both final networks: the top Hessian eigenvalue of the training loss on a fixed
probe batch (``hessian_eigenvalues``), next to their test accuracy. The loss is cross-entropy
with label smoothing 0.1, so both runs end at the same training loss (the smoothing floor)
instead of driving it, and with it the Hessian, towards zero: their sharpness is then
comparable. The sharpness monitor logs the same quantity along the way, to TensorBoard:

    python examples/sam.py
    python -m tensorboard.main --logdir lightning_logs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import mlp, tensorboard_hint

from lightning_curvature.callbacks.eigenvalues import HessianEigenvalueMonitor
from lightning_curvature.callbacks.sam import SAM
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues

LABEL_SMOOTHING = 0.1


def digits(num_test: int = 497) -> tuple[TensorDataset, TensorDataset]:
    """Standardised 8x8 digit images and labels, split into train and test at random."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train_x, test_x = x[num_test:], x[:num_test]
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    return (
        TensorDataset((train_x - mean) / std, y[num_test:]),
        TensorDataset((test_x - mean) / std, y[:num_test]),
    )


class DigitsMLP(pl.LightningModule):
    """A small ReLU MLP with the cross-entropy loss, trained by SGD with momentum."""

    def __init__(self, lr: float, width: int = 128) -> None:
        super().__init__()
        self.lr = lr
        self.net = mlp(width)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y, label_smoothing=LABEL_SMOOTHING)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model.net(x), y, label_smoothing=LABEL_SMOOTHING)  # type: ignore[operator]


def train(
    args: argparse.Namespace, with_sam: bool, train_set: TensorDataset, seed: int
) -> DigitsMLP:
    pl.seed_everything(seed, verbose=False)  # same initialisation and batch order for both
    model = DigitsMLP(args.lr)
    callbacks: list[pl.Callback] = [
        HessianEigenvalueMonitor(every_n_steps=args.monitor_every, probe_batches=1)
    ]
    if with_sam:
        callbacks.append(SAM(rho=args.rho, log_every_n_steps=args.monitor_every))
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=callbacks,
        logger=TensorBoardLogger(args.log_dir, name=f"{'sam' if with_sam else 'sgd'}_seed{seed}"),
        # (at most an epoch's batches: Lightning warns of a longer interval)
        log_every_n_steps=min(args.monitor_every, len(loader)),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return model


def evaluate(
    model: DigitsMLP, train_set: TensorDataset, test_set: TensorDataset
) -> tuple[float, float, float]:
    """Top Hessian eigenvalue on a fixed probe batch, test accuracy, training loss."""
    model.eval()
    probe = tuple(t[:1024] for t in train_set.tensors)  # the same probe batch for every run
    top = hessian_eigenvalues(model, loss_fn, probe, k=1, tol=1e-4)
    with torch.no_grad():
        x, y = test_set.tensors
        accuracy = float((model.net(x).argmax(1) == y).float().mean())
        train_loss = float(loss_fn(model, train_set.tensors))  # type: ignore[arg-type]
    return float(top.eigenvalues[0]), accuracy, train_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--monitor-every", type=int, default=100)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args()

    torch.set_num_threads(1)  # a tiny MLP: more threads only wait on each other
    train_set, test_set = digits()
    results: dict[str, list[tuple[float, float, float]]] = {"SGD": [], "SAM": []}
    started = time.perf_counter()
    print("seed  method  top eigenvalue  test accuracy  train loss")
    for seed in range(args.seeds):
        for name in ("SGD", "SAM"):
            model = train(args, name == "SAM", train_set, seed)
            sharpness, accuracy, loss = evaluate(model, train_set, test_set)
            results[name].append((sharpness, accuracy, loss))
            print(f"{seed:4d}  {name:6s}  {sharpness:14.3f}  {accuracy:13.2%}  {loss:10.4f}")
    mean = {
        name: [sum(col) / len(col) for col in zip(*rows, strict=True)]
        for name, rows in results.items()
    }
    wins = sum(sam[0] < sgd[0] for sam, sgd in zip(results["SAM"], results["SGD"], strict=True))
    (sgd_sharp, sgd_acc, sgd_loss), (sam_sharp, sam_acc, sam_loss) = mean["SGD"], mean["SAM"]
    verdict = "lower" if sam_sharp < sgd_sharp else "NOT lower"
    print(
        f"CONCLUSION: SAM (rho={args.rho}) ended at {verdict} sharpness than SGD "
        f"(lower in {wins}/{args.seeds} seeds): mean top Hessian eigenvalue {sam_sharp:.3f} vs "
        f"{sgd_sharp:.3f} ({sam_sharp / sgd_sharp:.2f}x), mean test accuracy {sam_acc:.2%} vs "
        f"{sgd_acc:.2%}, mean training loss {sam_loss:.4f} vs {sgd_loss:.4f}."
    )
    print(f"({time.perf_counter() - started:.0f} s) TensorBoard: {tensorboard_hint(args.log_dir)}")


if __name__ == "__main__":
    main()
