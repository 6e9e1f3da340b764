"""What the five monitors at their defaults cost on a run as users write one, and what they show.

Trains ``examples/digits_cnn.py`` (a 38k-parameter CNN on the digits, AdamW with warmup and
cosine decay, bf16-mixed, accumulation 2, validation, ModelCheckpoint, EarlyStopping; 506
optimizer steps) in these configurations, interleaved (in rotating order) and repeated:

* ``none``: no monitors (the unit);
* ``defaults``: the five monitors (eigenvalues, trace, density, coherence, batch sharpness),
  every one at its defaults (``every_n_steps="auto"``: a plan within 5 % of the run);
* ``every_n_steps=T/10``: the five with a fixed cadence of a tenth of the run, 10 points
  each: what readable charts of everything cost on this run;
* ``sharpness, every_n_steps=T/10``: the eigenvalue and batch-sharpness monitors alone at
  that cadence: what the headline chart costs.

Prints, per configuration, the overhead of ``trainer.fit`` in CPU time (the process's, which
the other work on a shared machine disturbs less) and wall time (medians, and minima), the
time inside the probes as a share of the fit, and the points of each chart read back from
the TensorBoard event files (``lightning_curvature.read_run``), and the messages the monitors
gave at ``WARNING`` (a run too short for the budget). An untimed short run first takes the
one-time costs (imports, the first Trainer).

    python benchmarks/bench_defaults_overhead.py --repeats 3  # ~5 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from common import Timings, load_average, machine, quiet, summary
from digits_cnn import STEPS_PER_EPOCH, DigitsCNN, digits_loaders, make_trainer, monitors

from lightning_curvature import (
    BatchSharpnessMonitor,
    CurvatureMonitor,
    HessianEigenvalueMonitor,
    read_run,
)

#: Each chart a reader looks at first, and the tag whose points it has.
CHARTS = {
    "λ₁ (raw H)": "curvature/eigenvalue_1",
    "threshold": "curvature/stability_threshold",
    "sharpness ratio": "curvature/sharpness_ratio",
    "batch sharpness": "curvature/batch_sharpness",
    "trace": "curvature/trace",
    "coherence": "gradient/coherence",
    "noise scale": "gradient/noise_scale",
    "density": "curvature/density_max",
}
MODES = ("none", "defaults", "every_n_steps=T/10", "sharpness, every_n_steps=T/10")


def callbacks(mode: str, run_steps: int) -> list[CurvatureMonitor]:
    """The monitors of one configuration."""
    tenth = {"every_n_steps": max(1, run_steps // 10)}
    if mode == "none":
        return []
    if mode == "defaults":
        return monitors()
    if mode == "every_n_steps=T/10":
        return monitors(**tenth)
    return [HessianEigenvalueMonitor(**tenth), BatchSharpnessMonitor(**tenth)]


class Said(logging.Handler):
    """Keeps the messages of the ``lightning_curvature`` logger at ``WARNING`` and above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Run:
    """One fit: its times, the probes' seconds, the points of each chart, what was said."""

    seconds: float
    cpu_seconds: float
    steps: int
    probe_seconds: float
    points: dict[str, int] = field(default_factory=dict)
    said: int = 0


def train(mode: str, epochs: int) -> Run:
    """One fit of ``mode``, logged to a temporary directory that is read back."""
    pl.seed_everything(0, verbose=False)
    train_data, val_data = digits_loaders()
    chosen = callbacks(mode, epochs * STEPS_PER_EPOCH)
    said = Said()
    logging.getLogger("lightning_curvature").addHandler(said)
    try:
        with tempfile.TemporaryDirectory() as log_dir:
            trainer = make_trainer(epochs, log_dir, list(chosen))
            model = DigitsCNN(total_steps=epochs * STEPS_PER_EPOCH)
            started, cpu_started = time.perf_counter(), time.process_time()
            trainer.fit(model, train_data, val_data)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            assert trainer.log_dir is not None
            scalars = read_run(trainer.log_dir).scalars
    finally:
        logging.getLogger("lightning_curvature").removeHandler(said)
    points = {chart: len(scalars.get(tag, ())) for chart, tag in CHARTS.items()}
    probes = sum(m.report.history.seconds for m in chosen)
    return Run(seconds, cpu, trainer.global_step, probes, points, len(said.messages))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=22, help=f"{STEPS_PER_EPOCH} steps each")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    logging.getLogger("lightning_curvature").setLevel(logging.WARNING)  # no line per probe
    started, load = time.perf_counter(), load_average()
    print(f"Machine: {machine('lightning')}", flush=True)
    train("defaults", 1)  # untimed warm-up
    wall, cpu = Timings(), Timings()
    runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]:
            run = train(mode, args.epochs)
            wall.add(mode, run.seconds)
            cpu.add(mode, run.cpu_seconds)
            runs[mode].append(run)
            print(
                f"[repeat {repeat}] {mode}: {run.steps} steps, {run.seconds:.2f} s wall, "
                f"{run.cpu_seconds:.2f} s CPU, probes {run.probe_seconds:.2f} s, "
                f"points {run.points}, said {run.said}",
                flush=True,
            )
    steps = runs["none"][0].steps
    print(
        f"\n### The digits CNN, {steps} optimizer steps ({torch.get_num_threads()} thread(s), "
        f"{args.repeats} interleaved runs per configuration)\n"
    )
    print(
        "| monitors | CPU time: median (s) | CPU overhead (median / median none) | wall: "
        "median (s) | wall overhead (median / median none) | wall overhead (min / min none) "
        "| probe time / fit wall (median) | points per chart: "
        + ", ".join(CHARTS)
        + " | warnings said |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    cpu_none, wall_none = (statistics.median(t.seconds["none"]) for t in (cpu, wall))
    for mode in MODES:
        cpu_median, wall_median = (statistics.median(t.seconds[mode]) for t in (cpu, wall))
        share = statistics.median(r.probe_seconds / r.seconds for r in runs[mode])
        points = "/".join(
            str(statistics.median(r.points[chart] for r in runs[mode])) for chart in CHARTS
        )
        print(
            f"| {mode} | {cpu_median:.2f} | {100 * (cpu_median / cpu_none - 1):+.1f}% | "
            f"{wall_median:.2f} | {100 * (wall_median / wall_none - 1):+.1f}% | "
            f"{100 * (wall.best(mode) / wall.best('none') - 1):+.1f}% | {100 * share:.1f}% | "
            f"{points} | {max(r.said for r in runs[mode])} |"
        )
    print(f"\n{summary(started, load)}")


if __name__ == "__main__":
    main()
