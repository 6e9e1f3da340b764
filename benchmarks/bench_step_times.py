"""Where a monitor's overhead goes, step by step, within one run (issue 3 follow-up).

``bench_monitor_overhead.py`` compares whole runs, and on a shared machine whole runs drift
by a few percent from one to the next, as much as the margin between ``max_overhead=0.05``
and its 6% target. This script times every training step of the same runs (a callback
placed before the monitors stamps each ``on_train_batch_start``) and splits a run into:

* the probes (each monitor's ``record_measurement``, as ``max_overhead`` budgets them);
* the probe steps less their probes (an ordinary step if the probe leaves no other cost);
* the step right after each probe (its excess over the median step: after-effects);
* the other steps (their median against the plain run's: drift of the machine's speed).

    python benchmarks/bench_step_times.py            # about 2 minutes on 2 cores
    python benchmarks/bench_step_times.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_monitor_overhead import BUDGET, train
from common import load_average, machine, quiet, summary

MODES = ("none", f"eigenvalue only, max_overhead={BUDGET}", f"max_overhead={BUDGET}")


class StepClock(pl.Callback):
    """Stamps the start of every training batch (place it before the monitors)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())


def row(mode: str, steps: int) -> tuple[str, float]:
    """One run of ``mode``: its markdown cells and the median of its ordinary steps."""
    clock = StepClock()
    run = train(mode, steps, first=(clock,))
    durations = [b - a for a, b in zip(clock.starts, clock.starts[1:], strict=False)]
    probed = {step for probes in run.probes for step, _ in probes}
    ordinary = [d for i, d in enumerate(durations) if i not in probed and i - 1 not in probed]
    median = statistics.median(ordinary)
    in_probe_steps = sum(durations[i] for i in probed if i < len(durations))
    after = [durations[i + 1] - median for i in probed if i + 1 < len(durations)]
    training = run.seconds - run.probe_seconds
    cells = (
        f"| {mode} | {run.seconds:.2f} | {len(probed)} | "
        f"{100 * run.probe_seconds / training:.1f}% | "
        f"{1e3 * (in_probe_steps - run.probe_seconds) / max(len(probed), 1):.2f} | "
        f"{1e3 * statistics.fmean(after) if after else 0.0:+.2f} | {1e3 * median:.3f} |"
    )
    return cells, median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet()
    started, load = time.perf_counter(), load_average()
    print(f"Machine: {machine('lightning')}")
    train(MODES[0], 20)  # untimed warm-up
    print(
        "\n| monitors | wall (s) | probe steps | probe time / the rest | probe step less its "
        "probes (ms) | step after a probe, excess (ms) | median ordinary step (ms) | "
        "… against the plain run before it |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for _ in range(args.repeats):
        plain = float("nan")
        for mode in MODES:
            cells, median = row(mode, args.steps)
            plain = median if mode == "none" else plain
            print(f"{cells} {100 * (median / plain - 1):+.1f}% |", flush=True)
    print(f"\n{summary(started, load)}")


if __name__ == "__main__":
    main()
