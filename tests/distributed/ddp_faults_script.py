"""Run by test_ddp_faults.py: two-process DDP (gloo, CPU) where rank 1 alone fails in probes.

Usage: python ddp_faults_script.py OUT_DIR. Trains twice from the same start with ``SAM``:
with every monitor probing at every step while rank 1 (only) fails once at each step of
``FAULTS``, and without monitors. Each rank writes rank<r>.pt: the final weights of both
trainings, the step each monitor probed last, SAM's counts and (rank 0) the warnings said.

The faults, rank 1 only:

1. a ``RuntimeError`` raised by its first eval-mode forward of step 1 (a probe's: the
   eigenvalue monitor's, which probes first);
2. a ``RuntimeError`` inside its third Hessian-vector product of step 2 (mid-Lanczos);
3. a ``torch.OutOfMemoryError`` raised by its second eval-mode forward of step 3 (the trace
   monitor's probe);
4. a ``ValueError`` raised by every forward of a single example at step 4: the coherence
   probe's per-example gradients (vmap, then the loop over examples) fail;
5. a ``RuntimeError`` in its ``SAM`` second pass at step 5, and a NaN loss there at step 6
   (both trainings take these two: the optimizer steps with the plain gradient).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from launch import run_rank
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import (
    SAM,
    BatchSharpnessMonitor,
    CurvatureWarning,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)
from lightning_curvature.functional.operator.autodiff_backends import AutodiffProducts

MAX_STEPS = 7
#: step: (what fails on rank 1, the monitor whose probe it ends)
FAULTS = {
    1: ("RuntimeError: rank 1's eval-mode forward failed", "HessianEigenvalueMonitor"),
    2: ("RuntimeError: injected into Hessian-vector product 3", "HessianEigenvalueMonitor"),
    3: ("OutOfMemoryError: CUDA out of memory (injected)", "HessianTraceMonitor"),
    4: ("ValueError: rank 1 cannot take one example", "GradientCoherenceMonitor"),
    5: ("RuntimeError: rank 1's second pass failed", "SAM"),
    6: ("NonFiniteCurvatureError: the loss at w + ε ([nan]) or its gradient is not finite", "SAM"),
}
RANK = int(os.environ.get("LOCAL_RANK", "0"))


class Faulty(pl.LightningModule):
    """A tanh regressor whose probe-only (eval-mode) forward fails on rank 1 as ``FAULTS`` say."""

    def __init__(self, faults: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
        self.faults = faults
        self.eval_forwards: dict[int, list[int]] = {}  # per step, counted in place (see below)
        self.sam_calls: dict[int, list[int]] = {}  # training-mode calls per step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        step = self.trainer.global_step
        if self.faults and RANK == 1 and not self.training:
            self._fail(step, x.shape[0])
        loss = (self.net(x).squeeze(-1) - y).pow(2).mean()
        if RANK == 1 and self.training:  # SAM's second pass is the step's second call
            calls = self.sam_calls.setdefault(step, [0])
            calls[0] += 1
            if (step, calls[0]) == (5, 2):
                raise RuntimeError("rank 1's second pass failed")
            if (step, calls[0]) == (6, 2):
                return loss * math.nan
        return loss

    def _fail(self, step: int, examples: int) -> None:
        # a list changed in place: the probes' isolation puts attributes back, not contents
        count = self.eval_forwards.setdefault(step, [0])
        count[0] += 1
        if step == 1 and count[0] == 1:
            raise RuntimeError("rank 1's eval-mode forward failed")
        if step == 3 and count[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        if step == 4 and examples == 1:
            raise ValueError("rank 1 cannot take one example")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.5)


class FaultyProducts:
    """Rank 1's third Hessian-vector product of step 2 raises (retained-graph backend)."""

    def __init__(self) -> None:
        self.step, self.products = -1, 0
        self.original = AutodiffProducts.retained_product

    def install(self) -> None:
        faulty = self

        def retained_product(products: AutodiffProducts, vs: list[torch.Tensor]) -> Any:
            faulty.products += 1
            if RANK == 1 and faulty.step == 2 and faulty.products == 3:
                raise RuntimeError("injected into Hessian-vector product 3")
            return faulty.original(products, vs)

        AutodiffProducts.retained_product = retained_product  # type: ignore[method-assign]


class StepClock(pl.Callback):
    """Tells ``FaultyProducts`` the step (first in the list: before any probe of the step)."""

    def __init__(self, products: FaultyProducts) -> None:
        self.products = products

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.products.step, self.products.products = trainer.global_step, 0


def monitors() -> list[pl.Callback]:
    return [
        HessianEigenvalueMonitor(k=2, tol=1e-3, every_n_steps=1),
        HessianTraceMonitor(num_hvps=6, every_n_steps=1),
        SpectralDensityMonitor(num_steps=6, num_points=10, every_n_steps=1),
        GradientCoherenceMonitor(every_n_steps=1),
        BatchSharpnessMonitor(num_batches=2, every_n_steps=1),
        GradientCoherenceMonitor(source="ddp", every_n_steps=1, name="ddp"),
    ]


def fit(out: Path, callbacks: list[pl.Callback], faults: bool) -> tuple[pl.Trainer, Faulty]:
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 5, generator=g), torch.randn(128, generator=g)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=MAX_STEPS,
        callbacks=callbacks,
        logger=CSVLogger(out, name="faults" if faults else "plain"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = Faulty(faults)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    return trainer, model


def main() -> None:
    out = Path(sys.argv[1])
    products = FaultyProducts()
    products.install()
    probing, sam = monitors(), SAM(rho=0.1)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", CurvatureWarning)
        trainer, model = fit(out, [StepClock(products), *probing, sam], faults=True)
    said = [str(r.message) for r in records if issubclass(r.category, CurvatureWarning)]
    _, plain = fit(out, [SAM(rho=0.1)], faults=False)
    torch.save(
        {
            "final": {k: v.clone() for k, v in model.state_dict().items()},
            "final_without_monitors": {k: v.clone() for k, v in plain.state_dict().items()},
            "warnings": said,
            "sam": (sam.num_sam_steps, sam.num_skipped_steps),
            "probed_steps": {
                type(m).__name__ + getattr(m, "source", ""): m.schedule.last_step for m in probing
            },
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    run_rank(main)
