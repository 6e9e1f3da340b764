"""Gradient coherence: real labels make examples agree, shuffled labels do not.

Chatterjee & Zielinski ("Making coherence out of nothing at all", 2020; "On the
generalization mystery in deep learning", 2022) explain generalisation by *coherence*: with
real labels the per-example gradients point in similar directions (a step on one example
helps many others), with random labels they are nearly orthogonal and every example is fitted
on its own. This script trains the same network with SGD on scikit-learn's bundled digits
(no download), once with the real labels and once with the labels shuffled, and logs the
m-coherence of the per-example gradients of a fixed probe batch of 256 training examples
(1 = orthogonal, 256 = identical), the mean cosine and the noise scale, to TensorBoard:

    python examples/coherence.py
    python -m tensorboard.main --logdir lightning_logs  # coherence/real, coherence/shuffled

It ends by reading the event files back and printing the coherence of both runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsClassifier, mlp, read_scalars, standardized_digits, tensorboard_hint

from lightning_curvature import GradientCoherenceMonitor


def digits(num_examples: int, shuffle_labels: bool) -> TensorDataset:
    """Standardised digits images and their labels (a fixed random permutation of them)."""
    x, y = standardized_digits(num_examples)
    if shuffle_labels:
        y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    return TensorDataset(x, y)


def train(name: str, shuffle_labels: bool, args: argparse.Namespace) -> str:
    """Train one run; return its TensorBoard log directory."""
    pl.seed_everything(0)
    dataset = digits(args.num_examples, shuffle_labels)
    probe = DataLoader(dataset, batch_size=args.probe_size)  # the first examples, every probe
    monitor = GradientCoherenceMonitor(
        every_n_steps=args.every_n_steps, probe_dataloader=probe, per_layer=True
    )
    logger = TensorBoardLogger(args.log_dir, name="coherence", version=name)
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        callbacks=[monitor],
        logger=logger,
        log_every_n_steps=args.every_n_steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    trainer.fit(DigitsClassifier(mlp(128), args.lr), loader)
    return logger.log_dir


def summarize(runs: dict[str, str], probe_size: int) -> None:
    """Print both coherence curves and the verdict, from the event files."""
    curves = {name: read_scalars(log_dir, "gradient/coherence") for name, log_dir in runs.items()}
    cosines = {
        name: read_scalars(log_dir, "gradient/mean_cosine") for name, log_dir in runs.items()
    }
    print(
        f"m-coherence of {probe_size} per-example gradients (1 = orthogonal, {probe_size} = equal)"
    )
    print(" step      real  shuffled   ratio")
    real, shuffled = curves["real"], curves["shuffled"]
    for (step, a), (_, b) in list(zip(real, shuffled, strict=True))[:: max(1, len(real) // 12)]:
        print(f"{step:5d}  {a:8.2f}  {b:8.2f}  {a / b:6.2f}")
    ratios = [a / b for (_, a), (_, b) in zip(real, shuffled, strict=True)]
    mean_real = statistics.fmean(a for _, a in real)
    mean_shuffled = statistics.fmean(b for _, b in shuffled)
    cosine_real = statistics.fmean(c for _, c in cosines["real"])
    cosine_shuffled = statistics.fmean(c for _, c in cosines["shuffled"])
    print(
        f"CONCLUSION: over {len(real)} probes (steps {real[0][0]}-{real[-1][0]}) the mean "
        f"coherence is {mean_real:.2f} with real labels and {mean_shuffled:.2f} with shuffled "
        f"labels: {mean_real / mean_shuffled:.2f}x (per probe {min(ratios):.2f}x to "
        f"{max(ratios):.2f}x); mean cosine {cosine_real:.4f} vs {cosine_shuffled:.4f}."
    )
    print(f"TensorBoard logs: {tensorboard_hint(str(Path(runs['real']).parent))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--every-n-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--num-examples", type=int, default=1000)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args()
    runs = {
        "real": train("real", shuffle_labels=False, args=args),
        "shuffled": train("shuffled", shuffle_labels=True, args=args),
    }
    summarize(runs, args.probe_size)


if __name__ == "__main__":
    main()
