"""Wall-time overhead of the monitors on the edge-of-stability example's training.

Trains the example's network (full-batch gradient descent on 1000 digits, one batch per
epoch) in several configurations, interleaved (in rotating order) and repeated:

* ``none``: no monitors (the unit);
* ``default``: ``HessianEigenvalueMonitor`` + ``HessianTraceMonitor`` at their default
  cadence (every 500 and every 1000 steps, step 0 included);
* ``all four, default``: the same plus ``GradientCoherenceMonitor`` (every 500 steps,
  ``source="probe"``) and ``SpectralDensityMonitor`` (every 2000), all at their defaults;
* ``max_overhead=0.05``: eigenvalue + trace monitors, both with ``max_overhead=0.05`` and
  ``every_n_steps=1`` (the adaptive cadence, every step at the shortest); the monitors of a
  Trainer share that budget, so each keeps to 2.5%;
* ``eigenvalue only, max_overhead=0.05`` and ``trace only, max_overhead=0.05``: one monitor
  alone, with the whole 5% to itself;
* ``eigenvalue only, step 0 only``: one monitor that probes once (``every_n_steps=10**9``),
  the cost of its presence: set-up, its hooks on every step, one probe.

Prints the minimum wall time of ``trainer.fit`` for each, its overhead relative to the
minimum plain run, the overhead of the medians (of wall time, and of the process's CPU time,
which other work on a shared machine disturbs less), the number of probes per run and
monitor and the time inside the probes (timed around each monitor's ``record_measurement``:
measurement, rescheduling and logging) over the rest of the run, which is what
``max_overhead`` budgets; the rest of the overhead is outside the probes (set-up, hooks, the
steps right after a probe). An untimed 20-step run first takes the one-time costs (imports,
the first ``Trainer``).

    python benchmarks/bench_monitor_overhead.py --steps 2000 --repeats 5  # ~8 min, 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from common import Timings, load_average, machine, quiet, summary
from edge_of_stability import DigitsRegressor, digits_dataset

from lightning_curvature import (
    CurvatureMonitor,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

BUDGET = 0.05
MODES = (
    "none",
    "default",
    "all four, default",
    f"max_overhead={BUDGET}",
    f"eigenvalue only, max_overhead={BUDGET}",
    f"trace only, max_overhead={BUDGET}",
    "eigenvalue only, step 0 only",
)


def monitors(mode: str) -> list[CurvatureMonitor]:
    """The callbacks of one configuration."""
    if mode == "none":
        return []
    if mode == "default":
        return [HessianEigenvalueMonitor(), HessianTraceMonitor()]
    if mode == "all four, default":
        return [
            HessianEigenvalueMonitor(),
            HessianTraceMonitor(),
            GradientCoherenceMonitor(),
            SpectralDensityMonitor(),
        ]
    if mode == "eigenvalue only, step 0 only":
        return [HessianEigenvalueMonitor(every_n_steps=10**9)]
    adaptive = {"every_n_steps": 1, "max_overhead": BUDGET}
    chosen: list[CurvatureMonitor] = []
    if not mode.startswith("trace only"):
        chosen.append(HessianEigenvalueMonitor(**adaptive))
    if not mode.startswith("eigenvalue only"):
        chosen.append(HessianTraceMonitor(**adaptive))
    return chosen


@dataclass
class Run:
    """One training run: its wall and CPU time and, per monitor, each probe's step and seconds."""

    seconds: float
    cpu_seconds: float
    probes: list[list[tuple[int, float]]]

    @property
    def counts(self) -> str:
        """Probes per monitor, e.g. ``"20+20"``."""
        return "+".join(str(len(p)) for p in self.probes) or "0"

    @property
    def probe_seconds(self) -> float:
        """Time inside the monitors' probes (measurement and logging), all monitors."""
        return sum(seconds for probes in self.probes for _, seconds in probes)


def timing_probes(callbacks: list[CurvatureMonitor]) -> list[list[tuple[int, float]]]:
    """Time every ``record_measurement`` (one probe: measure, reschedule, log) of each monitor."""
    probes: list[list[tuple[int, float]]] = []
    for callback in callbacks:
        seen: list[tuple[int, float]] = []
        original = callback.record_measurement

        def timed_probe(
            trainer: pl.Trainer, *args: Any, _original: Any = original, _seen: Any = seen
        ) -> None:
            started = time.perf_counter()
            _original(trainer, *args)
            _seen.append((trainer.global_step, time.perf_counter() - started))

        callback.record_measurement = timed_probe  # type: ignore[method-assign]
        probes.append(seen)
    return probes


def train(mode: str, steps: int, first: tuple[pl.Callback, ...] = ()) -> Run:
    """One training run of ``mode`` (``first``: callbacks placed before the monitors)."""
    pl.seed_everything(0, verbose=False)
    dataset = digits_dataset(1000)
    callbacks = monitors(mode)
    probes = timing_probes(callbacks)
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = pl.Trainer(
            max_steps=steps,
            callbacks=[*first, *callbacks],
            logger=TensorBoardLogger(log_dir),
            log_every_n_steps=25,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.fit(DigitsRegressor(0.2), DataLoader(dataset, batch_size=len(dataset)))
        return Run(time.perf_counter() - started, time.process_time() - cpu_started, probes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per mode")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default; with 2 on a shared 2-core machine single runs "
        "took up to 5x longer)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    started, load = time.perf_counter(), load_average()
    print(f"Machine: {machine('lightning')}", flush=True)
    train(f"max_overhead={BUDGET}", 20)  # untimed warm-up: imports, first Trainer, caches
    times, cpu_times, shares = Timings(), Timings(), Timings()
    counts: dict[str, set[str]] = {mode: set() for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]:
            run = train(mode, args.steps)
            times.add(mode, run.seconds)
            cpu_times.add(mode, run.cpu_seconds)
            shares.add(mode, run.probe_seconds / (run.seconds - run.probe_seconds))
            counts[mode].add(run.counts)
            print(
                f"[repeat {repeat}] {mode}: {run.seconds:.2f} s, probes {run.counts} "
                f"taking {run.probe_seconds:.2f} s",
                flush=True,
            )
    base = times.best("none")
    base_median = statistics.median(times.seconds["none"])
    print(
        f"\n### Monitor overhead ({args.steps} steps, {torch.get_num_threads()} threads, "
        f"{args.repeats} interleaved runs per mode)\n"
    )
    cpu_base = statistics.median(cpu_times.seconds["none"])
    print(
        "| monitors | min wall time (s) | overhead (min / min none) | overhead (median / "
        "median none) | CPU-time overhead (median / median none) | spread (max/min) | probes "
        "per run (per monitor) | probe time / the rest of the run (median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        best, median = times.best(mode), statistics.median(times.seconds[mode])
        cpu = statistics.median(cpu_times.seconds[mode])
        print(
            f"| {mode} | {best:.2f} | {100 * (best / base - 1):+.1f}% | "
            f"{100 * (median / base_median - 1):+.1f}% | {100 * (cpu / cpu_base - 1):+.1f}% | "
            f"{times.spread(mode):.2f} | {', '.join(sorted(counts[mode]))} | "
            f"{100 * statistics.median(shares.seconds[mode]):.1f}% |"
        )
    print(f"\n{summary(started, load)}")


if __name__ == "__main__":
    main()
