"""Batch sharpness under mini-batch SGD: which curvature meets 2/lr, λ₁ or batch sharpness?

Andreyev & Beneventano (2024, "Edge of Stochastic Stability") argue that under mini-batch
SGD it is the *batch sharpness* ``E_B[g_Bᵀ H_B g_B / ‖g_B‖²]`` (each mini-batch's curvature
along its own gradient) that rises to the stability threshold 2/lr and hovers there, while
the top eigenvalue λ₁ of the full-batch Hessian settles below it. Gur-Ari, Roberts & Dyer
(2018) found the gradient to lie mostly in the span of the top Hessian eigenvectors (about as
many as classes). This script trains the tanh MLP of ``edge_of_stability.py`` on
scikit-learn's bundled digits (MSE loss, no download) with mini-batch SGD at three learning
rates and two batch sizes, and logs for each run

* ``curvature/batch_sharpness`` (``BatchSharpnessMonitor``, 16 mini-batches of the training
  batch size per probe) with its standard error,
* ``curvature/eigenvalue_1`` … ``_10`` of the full-batch Hessian and 2/lr
  (``HessianEigenvalueMonitor`` on the whole training set), on one Custom Scalars chart,
* ``curvature/gradient_top_share``: the share of the full-batch gradient in the top-10
  eigenspace, and ``curvature/training_gradient_top_share``: that of the mini-batch gradient
  the optimizer stepped with.

    python examples/batch_sharpness.py
    python -m tensorboard.main --logdir lightning_logs/batch_sharpness

The CONCLUSION reports the last third of each run's probes, whatever they show.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import read_scalars, tensorboard_hint
from edge_of_stability import DigitsRegressor, digits_dataset

from lightning_curvature import BatchSharpnessMonitor, HessianEigenvalueMonitor


def run(lr: float, batch_size: int, args: argparse.Namespace) -> str:
    """Train one configuration; return its TensorBoard log directory."""
    pl.seed_everything(0, verbose=False)
    dataset = digits_dataset(args.num_examples)
    callbacks = [
        HessianEigenvalueMonitor(
            k=10,
            gradient_share=True,
            every_n_steps=args.every_n_steps,
            probe_dataloader=DataLoader(dataset, batch_size=len(dataset)),  # full batch
        ),
        BatchSharpnessMonitor(num_batches=args.num_batches, every_n_steps=args.every_n_steps),
    ]
    logger = TensorBoardLogger(
        args.log_dir, name="batch_sharpness", version=f"lr{lr}_batch{batch_size}"
    )
    train = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=logger,
        # (at most an epoch's batches: Lightning warns of a longer interval)
        log_every_n_steps=min(args.every_n_steps, len(train)),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsRegressor(lr, width=args.width), train)
    return str(logger.log_dir)


def late(log_dir: str, tag: str) -> list[float]:
    """The values of the last third of the probes."""
    values = [value for _, value in read_scalars(log_dir, tag)]
    return values[len(values) - max(1, len(values) // 3) :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--every-n-steps", type=int, default=100)
    parser.add_argument("--num-batches", type=int, default=16)
    parser.add_argument("--num-examples", type=int, default=1000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny model: threads only contend

    print(
        "  lr  batch   2/lr  batch_sharpness/(2/lr)  λ₁/(2/lr)  share(full g)  "
        "share(mini-batch g)   (medians of the last third of the probes)"
    )
    rows = []
    for lr in args.lrs:
        for batch_size in args.batch_sizes:
            log_dir = run(lr, batch_size, args)
            threshold = 2 / lr
            batch = statistics.median(late(log_dir, "curvature/batch_sharpness")) / threshold
            top = statistics.median(late(log_dir, "curvature/eigenvalue_1")) / threshold
            share = statistics.median(late(log_dir, "curvature/gradient_top_share"))
            mini = statistics.median(late(log_dir, "curvature/training_gradient_top_share"))
            rows.append((lr, batch_size, batch, top, share, mini))
            print(
                f"{lr:4g}  {batch_size:5d}  {threshold:5.1f}  {batch:22.3f}  {top:9.3f}  "
                f"{share:13.3f}  {mini:19.3f}"
            )
    at_edge = [r for r in rows if 0.8 <= r[2] <= 1.2]
    above = sum(r[2] > r[3] for r in rows)
    print(
        f"CONCLUSION: over the last third of training, batch sharpness was within 0.8-1.2 "
        f"of 2/lr in {len(at_edge)} of {len(rows)} runs (median ratio "
        f"{statistics.median(r[2] for r in rows):.3f}, range {min(r[2] for r in rows):.3f}-"
        f"{max(r[2] for r in rows):.3f}); the full-batch λ₁ had median ratio "
        f"{statistics.median(r[3] for r in rows):.3f} (range {min(r[3] for r in rows):.3f}-"
        f"{max(r[3] for r in rows):.3f}) and was below batch sharpness in {above} of "
        f"{len(rows)} runs; the top-10 eigenspace held a median "
        f"{statistics.median(r[4] for r in rows):.3f} of the full-batch gradient's squared "
        f"norm and {statistics.median(r[5] for r in rows):.3f} of the mini-batch gradient's."
    )
    print(f"TensorBoard logs: {tensorboard_hint(str(Path(args.log_dir) / 'batch_sharpness'))}")


if __name__ == "__main__":
    main()
