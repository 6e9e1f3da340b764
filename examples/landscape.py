"""The loss landscape along the top eigenvector, live, before and after the edge of stability.

Full-batch gradient descent on the digits (the run of ``edge_of_stability.py``: a tanh MLP,
the MSE loss, lr 0.2) sharpens until the top Hessian eigenvalue λ₁ reaches 2/lr and then
hovers there (Cohen et al., ICLR 2021). This script watches the loss *along* the directions
that matter while that happens:

* ``LossLandscapeMonitor`` slices the loss along the top eigenvector v₁ and along the last
  update, in lengths of the optimizer's step, beside the quadratic model every eigenvalue
  rests on, and marks where the next step lands along v₁ and where the quadratic model is
  back at the current loss (2/λ₁); a picture per probe (TensorBoard's Images tab, and two of
  them written as PNG: before and after the edge);
* ``CriticalSharpnessMonitor`` logs 2/η_c, the step size at which the next update would raise
  the loss (Kalra et al. 2026), found by forward passes alone, on λ₁'s chart against 2/lr.

    python examples/landscape.py
    python -m tensorboard.main --logdir lightning_logs/landscape

The CONCLUSION is computed from the run's own logs, whatever they show.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import read_scalars, tensorboard_hint
from edge_of_stability import DigitsRegressor, digits_dataset

from lightning_curvature import (
    CriticalSharpnessMonitor,
    HessianEigenvalueMonitor,
    LossLandscapeMonitor,
)

EDGE = 0.9  # λ₁ within 10% of 2/lr: at the edge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--num-examples", type=int, default=1000)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    dataset = digits_dataset(args.num_examples)
    logger = TensorBoardLogger(args.log_dir, name="landscape")
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        callbacks=[
            HessianEigenvalueMonitor(every_n_steps=50),
            LossLandscapeMonitor(every_n_steps=100),
            CriticalSharpnessMonitor(every_n_steps=25),
        ],
        logger=logger,
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsRegressor(args.lr), DataLoader(dataset, batch_size=len(dataset)))
    summarize(str(logger.log_dir), args.lr)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(log_dir: str, lr: float) -> None:
    """Read the run back from its event file, save two pictures, print the verdict."""
    top = dict(read_scalars(log_dir, "landscape/curvature_1"))
    secant = dict(read_scalars(log_dir, "landscape/secant_curvature_1"))
    change = dict(read_scalars(log_dir, "landscape/step_loss_change_1"))
    model = dict(read_scalars(log_dir, "landscape/quadratic_step_loss_change_1"))
    critical = dict(read_scalars(log_dir, "curvature/critical_sharpness"))
    eigen = dict(read_scalars(log_dir, "curvature/eigenvalue_1"))
    threshold = 2 / lr
    edge = next((s for s in sorted(eigen) if eigen[s] >= EDGE * threshold), None)
    print(f"stability threshold 2/lr = {threshold:.2f}; edge reached at step {edge}")
    print(" step  lambda_1  secant/lambda_1  loss change at the step along v1 (quadratic)")
    for step in sorted(top):
        moved = f"{change[step]:+.2e} ({model[step]:+.2e})" if step in change else "unresolved"
        ratio = secant[step] / top[step] if step in secant else float("nan")
        print(f"{step:5d}  {top[step]:8.3f}  {ratio:15.4f}  {moved}")
    before = [s for s in sorted(top) if edge is None or s < edge]
    after = [s for s in sorted(top) if edge is not None and s >= edge]
    loudest = max((s for s in after if s in change), key=lambda s: abs(change[s]), default=None)
    pictures = save_pictures(log_dir, before[len(before) // 2] if before else None, loudest)
    ratios = [secant[s] / top[s] for s in sorted(secant)]
    if edge is None or not after:
        print(f"CONCLUSION: the edge was not reached (lambda_1 at most {max(eigen.values()):.2f}).")
        return
    moved = [s for s in after if s in change]
    rose, fell = sum(change[s] > 0 for s in moved), sum(change[s] < 0 for s in moved)
    agree = sum((change[s] > 0) == (model[s] > 0) for s in moved)
    gap = _median([abs(change[s] - model[s]) / abs(model[s]) for s in moved])
    early = _median([v for s, v in critical.items() if s < edge])
    late = _median([v for s, v in critical.items() if s >= edge])
    late_top = _median([v for s, v in eigen.items() if s >= edge])
    print(
        f"CONCLUSION: along v1 the loss was a parabola at the scale of the optimizer's step in "
        f"every probe (secant curvature at one step length {min(ratios):.4f} to "
        f"{max(ratios):.4f} of lambda_1). Before the edge the step barely moved along v1 (its "
        f"loss change unresolved in {sum(s not in change for s in before)} of {len(before)} "
        f"probes); from the edge on (lambda_1 >= {EDGE}·2/lr from step {edge}, {len(after)} "
        f"probes) the step along v1 raised the loss in {rose} probes and lowered it in {fell} "
        f"(unresolved in {len(after) - len(moved)}), with the sign the quadratic model "
        f"predicted in {agree} of {len(moved)} (median relative difference {gap:.1%}). "
        f"Critical sharpness: median {early:.3f} before the edge, {late:.3f} after it "
        f"({late / threshold:.3f} of 2/lr; lambda_1 {late_top / threshold:.3f})."
    )
    print(f"pictures: {', '.join(pictures)}")
    print(f"TensorBoard logs in {log_dir}: {tensorboard_hint(log_dir)}")


def save_pictures(log_dir: str, before: int | None, after: int | None) -> list[str]:
    """Write the slice pictures of two probes as PNG files next to the event file."""
    events = EventAccumulator(log_dir, size_guidance={"images": 0})
    events.Reload()
    written = []
    for label, step in (("before", before), ("after", after)):
        for image in events.Images("landscape/slices"):
            if image.step == step:
                path = Path(log_dir) / f"slices_{label}_edge_step{step}.png"
                path.write_bytes(image.encoded_image_string)
                written.append(str(path))
    return written


if __name__ == "__main__":
    torch.set_num_threads(1)  # a 64-wide MLP: threads only contend
    main()
