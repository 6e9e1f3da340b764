"""Wall-time overhead of the monitors on the edge-of-stability example's training.

Trains the example's network (full-batch gradient descent on digits) three ways, interleaved
and repeated: without monitors, with `HessianEigenvalueMonitor` + `HessianTraceMonitor` at
their default cadence (every 100 steps), and with `max_overhead=0.05`. Prints the minimum
wall time of each and the overhead relative to the plain run.

    python benchmarks/bench_monitor_overhead.py --steps 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from edge_of_stability import DigitsRegressor, digits_dataset

from lightning_curvature import HessianEigenvalueMonitor, HessianTraceMonitor


def monitors(mode: str) -> list[pl.Callback]:
    """The callbacks of one configuration."""
    if mode == "none":
        return []
    if mode == "default":
        return [HessianEigenvalueMonitor(), HessianTraceMonitor()]
    return [
        HessianEigenvalueMonitor(every_n_steps=1, max_overhead=0.05),
        HessianTraceMonitor(every_n_steps=1, max_overhead=0.05),
    ]


def train_seconds(mode: str, steps: int) -> float:
    """Wall time of one training run."""
    pl.seed_everything(0, verbose=False)
    dataset = digits_dataset(1000)
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = pl.Trainer(
            max_steps=steps,
            callbacks=monitors(mode),
            logger=TensorBoardLogger(log_dir),
            log_every_n_steps=25,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        started = time.perf_counter()
        trainer.fit(DigitsRegressor(0.2), DataLoader(dataset, batch_size=len(dataset)))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    modes = ("none", "default", "max_overhead=0.05")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            times[mode].append(train_seconds(mode, args.steps))
    base = min(times["none"])
    print(f"| monitors ({args.steps} steps) | min wall time (s) | overhead |")
    print("|---|---|---|")
    for mode in modes:
        best = min(times[mode])
        print(f"| {mode} | {best:.2f} | {100 * (best / base - 1):+.1f}% |")


if __name__ == "__main__":
    main()
