"""Overhead of GradientCoherenceMonitor's free sources on the training step (issue 4).

Trains the ~95k-parameter CNN of ``common.py`` (BatchNorm, SGD with momentum) on synthetic
3x32x32 images with ``accumulate_grad_batches=4`` and micro-batches of 32, in a Lightning
Trainer, and times the same number of optimizer steps:

* ``none``: no monitor;
* ``accumulation, every step``: ``GradientCoherenceMonitor(source="accumulation",
  every_n_steps=1)``, the worst case: every micro-batch's gradient is read and summed;
* ``accumulation, every 10``: the same at ``every_n_steps=10``;
* ``ddp, every step`` (with ``--ddp``): two gloo processes on one thread each,
  ``source="ddp"`` against no monitor, same steps.

Each run times its optimizer steps after the first (which warms up), from the start of step 1
to the end of training. Runs are interleaved and repeated; it prints the minimum wall time of
each, the overhead relative to the matching run without the monitor (min / min, and median /
median), the spread over repeats, and the time the monitor itself measured (its
``probe_cost/coherence_seconds``, ``gradient/seconds`` when these figures were taken, read
back from the logger; hooks and statistics). Target: at most 5%.

    python benchmarks/bench_coherence_free.py --steps 40 --repeats 3 --ddp  # ~3 min, 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import lightning.pytorch as pl
import torch
from common import Timings, load_average, machine, make_cnn, quiet, summary, synthetic_images
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import GradientCoherenceMonitor

ACCUMULATE, MICRO_BATCH = 4, 32


class CNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_cnn(0)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def monitors(config: str) -> list[GradientCoherenceMonitor]:
    """No monitor (``"none"``) or one of ``"<source>:<every_n_steps>"``."""
    if config == "none":
        return []
    source, _, every = config.partition(":")
    return [GradientCoherenceMonitor(source=source, every_n_steps=int(every))]  # type: ignore[arg-type]


def train(config: str, steps: int, devices: int = 1) -> tuple[float, float]:
    """Wall time of ``steps`` optimizer steps (after one warm-up step outside the timing).

    Also returns the seconds the monitor measured for itself (``probe_seconds``: its hooks
    and statistics, over all steps, the warm-up step included; 0 without a monitor).
    """
    pl.seed_everything(0, verbose=False)
    x, y = synthetic_images(ACCUMULATE * MICRO_BATCH * (steps + 1) * devices)
    loader = DataLoader(TensorDataset(x, y), batch_size=MICRO_BATCH)
    timer, chosen = StepTimer(), monitors(config)
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            max_steps=steps + 1,
            accumulate_grad_batches=ACCUMULATE,
            callbacks=[timer, *chosen],
            logger=CSVLogger(logs),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(CNN(), loader)
    return timer.elapsed, sum(monitor.probe_seconds for monitor in chosen)


class StepTimer(pl.Callback):
    """Time from the start of step 1 to the end of training (step 0 warms up)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.elapsed = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == 1 and not self.started:
            self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.elapsed = time.perf_counter() - self.started


def ddp_child(config: str, steps: int) -> None:
    """One DDP run (Lightning starts the second process); rank 0 prints its times."""
    torch.set_num_threads(1)
    elapsed, monitor_seconds = train(config, steps, devices=2)
    if int(torch.distributed.get_rank()) == 0:
        print(f"ELAPSED {elapsed} {monitor_seconds}")
    torch.distributed.destroy_process_group()  # Lightning leaves it up; gloo may abort at exit


def ddp_time(config: str, steps: int) -> tuple[float, float]:
    """Wall time and monitor seconds (rank 0) of one DDP run in fresh processes."""
    done = subprocess.run(
        [sys.executable, __file__, "--ddp-child", config, "--steps", str(steps)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"DDP run {config!r} failed:\n{done.stdout}\n{done.stderr}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("ELAPSED"))
    elapsed, monitor_seconds = line.split()[1:]
    return float(elapsed), float(monitor_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per config")
    parser.add_argument("--ddp", action="store_true", help="also two gloo processes")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the single-process runs"
    )
    parser.add_argument("--ddp-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet()
    if args.ddp_child:
        ddp_child(args.ddp_child, args.steps)
        return
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), load_average()
    print(f"Machine: {machine('lightning')}", flush=True)
    print(
        f"CNN of 95k parameters, {args.steps} optimizer steps of {ACCUMULATE} micro-batches "
        f"of {MICRO_BATCH}; single process: {torch.get_num_threads()} thread(s); DDP: 2 "
        f"processes of 1 thread; {args.repeats} interleaved repeats\n",
        flush=True,
    )
    configs = {
        "none": "none",
        "accumulation, every step": "accumulation:1",
        "accumulation, every 10": "accumulation:10",
    }
    if args.ddp:
        configs["ddp (2 processes), none"] = "none"
        configs["ddp (2 processes), every step"] = "ddp:1"
    times, own = Timings(), Timings()
    for repeat in range(args.repeats):
        for label, config in configs.items():
            ddp = label.startswith("ddp")
            elapsed, seconds = (ddp_time if ddp else train)(config, args.steps)
            times.add(label, elapsed)
            own.add(label, seconds)
            print(
                f"[repeat {repeat}] {label}: {elapsed:.2f} s, monitor {seconds:.3f} s",
                flush=True,
            )
    print(
        "\n| run | min wall time (s) | overhead (min / min) | overhead (median / median) | "
        "spread (max/min) | monitor's own seconds per step (median) |"
    )
    print("|---|---|---|---|---|---|")
    for label in configs:
        base = "ddp (2 processes), none" if label.startswith("ddp") else "none"
        best, median = times.best(label), statistics.median(times.seconds[label])
        base_median = statistics.median(times.seconds[base])
        per_step = 1e3 * statistics.median(own.seconds[label]) / (args.steps + 1)
        print(
            f"| {label} | {best:.2f} | {100 * (best / times.best(base) - 1):+.1f}% | "
            f"{100 * (median / base_median - 1):+.1f}% | {times.spread(label):.2f} | "
            f"{per_step:.2f} ms |"
        )
    print(f"\n{summary(started, load)}")


if __name__ == "__main__":
    main()
