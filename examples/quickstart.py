"""Quickstart: every monitor on one small training run, then the same numbers without a Trainer.

A small MLP learns scikit-learn's bundled digits (no download) with SGD and momentum. Four
callbacks watch it: sharpness against its stability threshold, the Hessian trace per layer,
gradient coherence, and the eigenvalue density. At the end the script reads the values back
from the TensorBoard event file and recomputes the final sharpness with the model-level API
on the same probe batch, to show that the two agree:

    python examples/quickstart.py
    python -m tensorboard.main --logdir lightning_logs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsClassifier, mlp, standardized_digits, tensorboard_hint

from lightning_curvature import (
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
    hessian_eigenvalues,
)
from lightning_curvature.callbacks import training_step_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args()

    pl.seed_everything(0)
    loader = DataLoader(TensorDataset(*standardized_digits()), batch_size=64, shuffle=True)
    eigen = HessianEigenvalueMonitor(k=3, every_n_steps=50, on_train_end=True)
    callbacks = [
        eigen,
        HessianTraceMonitor(num_hvps=16, every_n_steps=100, per_layer=True),
        GradientCoherenceMonitor(every_n_steps=50),
        SpectralDensityMonitor(num_steps=30, every_n_steps=150),
    ]
    logger = TensorBoardLogger(args.log_dir, name="quickstart")
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=10,  # (29 batches an epoch: Lightning warns of its default 50)
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = DigitsClassifier(mlp(64, nn.Tanh, hidden_layers=1), lr=0.05, momentum=0.9)
    trainer.fit(model, loader)

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    print(f"{'tag':40s} {'steps':>16s} {'last value':>12s}")
    for tag in sorted(events.Tags()["scalars"]):
        series = events.Scalars(tag)
        if tag.startswith(("curvature/", "gradient/")):
            steps = f"{series[0].step}..{series[-1].step} ({len(series)})"
            print(f"{tag:40s} {steps:>16s} {series[-1].value:12.4g}")

    # The same measurement without a Trainer: the final weights, the monitor's probe batch.
    direct = hessian_eigenvalues(model, training_step_loss, eigen.fixed_probe, k=3, tol=1e-5)
    logged = events.Scalars("curvature/eigenvalue_1")[-1].value
    print(
        f"CONCLUSION: the final sharpness is {logged:.4f} in TensorBoard and "
        f"{float(direct.eigenvalues[0]):.4f} from hessian_eigenvalues on the same weights and "
        f"probe batch; its stability threshold (2 + 2·0.9)/lr is "
        f"{events.Scalars('curvature/stability_threshold')[-1].value:.1f}."
    )
    print(f"TensorBoard logs in {logger.log_dir}: {tensorboard_hint(logger.log_dir)}")


if __name__ == "__main__":
    main()
