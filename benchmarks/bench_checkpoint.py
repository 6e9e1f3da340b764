"""What the monitors add to a checkpoint, and what a resumed run's first probe costs.

On a 1.0 M-parameter tanh MLP regressor (128 → 1024 → 848 → 1, P = 1,002,145, mean squared
error; plain SGD, so the checkpoint is the weights and Lightning's bookkeeping: the strictest
ratio), batches of 64:

1. **Bytes added** by each monitor (and ``SAM``) at its defaults: the size of
   ``trainer.save_checkpoint`` after 2 steps with the monitor (it probes at step 0, so its
   warm state exists) minus the size without it, and that over the size without it. Also
   the eigenvalue monitor with ``checkpoint_warm_start=True`` (the old default) for ``k = 1``
   and ``k = 5``.
2. **The first probe after a resume**: an eigenvalue monitor (``k = 1``, ``tol=1e-3``, every
   step) trained to step 12, checkpointed at step 9 (an epoch's end) and resumed from it,
   against the uninterrupted run: HVPs and seconds of the probe at step 9 and the relative
   difference of λ₁, with the warm starts out of the checkpoint (default) and in it.

    python benchmarks/bench_checkpoint.py   # ~3 min, 1 thread
"""

from __future__ import annotations

import argparse
import csv
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import load_average, machine, quiet, summary
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import (
    SAM,
    BatchSharpnessMonitor,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

WIDTHS = (128, 1024, 848, 1)
RESUME_AT, STEPS = 9, 12  # the checkpoint is taken at an epoch's end


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(WIDTHS)):
            layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(WIDTHS) - 2 else [])
        self.net = nn.Sequential(*layers)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(576, WIDTHS[0], generator=g)  # 9 batches: an epoch ends at RESUME_AT
    y = torch.tanh(x[:, :8].sum(1)) + 0.1 * torch.randn(576, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=64)


def trainer(root: Path, callbacks: list[pl.Callback], steps: int, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "max_steps": steps,
        "logger": CSVLogger(root, name="log"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
    }
    return pl.Trainer(callbacks=callbacks, **{**options, **kwargs})


def checkpoint_bytes(root: Path, callbacks: list[pl.Callback], accumulate: int = 1) -> int:
    pl.seed_everything(0, verbose=False)
    fit = trainer(root, callbacks, 2, accumulate_grad_batches=accumulate)
    fit.fit(MLP(), data())
    path = root / "last.ckpt"
    fit.save_checkpoint(path)
    return path.stat().st_size


MONITORS: dict[str, tuple[Callable[[], pl.Callback], int]] = {
    "HessianEigenvalueMonitor()": (HessianEigenvalueMonitor, 1),
    "HessianTraceMonitor()": (HessianTraceMonitor, 1),
    "SpectralDensityMonitor()": (SpectralDensityMonitor, 1),
    "GradientCoherenceMonitor()": (GradientCoherenceMonitor, 1),
    'GradientCoherenceMonitor(source="accumulation")': (
        lambda: GradientCoherenceMonitor(source="accumulation"),
        2,
    ),
    "BatchSharpnessMonitor()": (BatchSharpnessMonitor, 1),
    "SAM()": (SAM, 1),
    "HessianEigenvalueMonitor(checkpoint_warm_start=True)": (
        lambda: HessianEigenvalueMonitor(checkpoint_warm_start=True),
        1,
    ),
    "HessianEigenvalueMonitor(k=5, checkpoint_warm_start=True)": (
        lambda: HessianEigenvalueMonitor(k=5, checkpoint_warm_start=True),
        1,
    ),
}


def bytes_table(root: Path) -> list[str]:
    base = {a: checkpoint_bytes(root / f"none{a}", [], a) for a in (1, 2)}
    rows = [
        "| monitor (defaults unless given) | checkpoint bytes | added "
        "| added / model's checkpoint |",
        "|---|---|---|---|",
        f"| none (accumulate 1 / 2) | {base[1]:,} / {base[2]:,} | – | – |",
    ]
    total = 0
    for i, (label, (build, accumulate)) in enumerate(MONITORS.items()):
        size = checkpoint_bytes(root / f"m{i}", [build()], accumulate)
        added = size - base[accumulate]
        if "checkpoint_warm_start" not in label:
            total += added
        rows.append(f"| `{label}` | {size:,} | {added:+,} | {added / base[accumulate]:.2%} |")
    rows.append(f"| all of the above at their defaults, summed | – | {total:+,} | "
                f"{total / base[1]:.2%} |")  # fmt: skip
    return rows


def probes(log_dir: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    with open(log_dir / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key != "step" and value:
                    rows.setdefault(int(row["step"]), {})[key] = float(value)
    return rows


def resume_run(root: Path, stored: bool, resume_from: Path | None) -> dict[int, dict[str, float]]:
    pl.seed_everything(0, verbose=False)
    monitor = HessianEigenvalueMonitor(every_n_steps=1, checkpoint_warm_start=stored)
    saver = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=RESUME_AT, save_top_k=-1)
    fit = trainer(root, [monitor, saver], STEPS, enable_checkpointing=True)
    fit.fit(MLP(), data(), ckpt_path=resume_from)
    assert fit.logger is not None
    assert fit.logger.log_dir is not None
    return probes(Path(fit.logger.log_dir))


def resume_table(root: Path) -> list[str]:
    rows = [
        f"| warm starts in the checkpoint | run | probe at step {RESUME_AT}: HVPs | seconds | λ₁ "
        "| λ₁ rel. difference to uninterrupted |",
        "|---|---|---|---|---|---|",
    ]
    for stored in (False, True):
        full = resume_run(root / f"full{stored}", stored, None)
        (path,) = (root / f"full{stored}" / "ckpt").glob(f"*step={RESUME_AT}.ckpt")
        resumed = resume_run(root / f"resumed{stored}", stored, path)
        for label, run in (("uninterrupted", full), ("resumed", resumed)):
            probe = run[RESUME_AT]
            top = probe["curvature/eigenvalue_1"]
            reference = full[RESUME_AT]["curvature/eigenvalue_1"]
            diff = abs(top - reference) / abs(reference)
            rows.append(
                f"| {'yes' if stored else 'no (default)'} | {label} | "
                f"{probe['probe_cost/eigenvalue_hvps']:.0f} | "
                f"{probe['probe_cost/eigenvalue_seconds']:.3f} | {top:.6f} | {diff:.1e} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet()
    started, load = time.perf_counter(), load_average()
    print(machine("lightning"))
    print(f"P = {sum(p.numel() for p in MLP().parameters()):,}\n")
    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(bytes_table(Path(tmp))), "\n")
        print("\n".join(resume_table(Path(tmp))), "\n")
    print(summary(started, load))


if __name__ == "__main__":
    main()
