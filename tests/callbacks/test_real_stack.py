"""Harmless on a module written as users write them (``real_stack.RealStack``).

Every monitor probes every other step of a run with a torchmetrics metric in
``training_step``, DropPath, functional and SDPA dropout, ``spectral_norm``, BatchNorm, AdamW
warming up from lr 0, ``training_step(self, batch)`` returning ``None`` on some batches and a
counter on the module, under gradient accumulation; the run ends bit for bit where it ends
without them, and every monitor logged finite values (read back from the CSV file).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from models import LIGHTNING_NOISE, assert_identical, csv_logger, make_trainer, read_csv
from real_stack import RealStack, final_state, real_stack_loader

from lightning_curvature import (
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)
from lightning_curvature.errors import CurvatureWarning

pytestmark = [
    *LIGHTNING_NOISE,
    pytest.mark.filterwarnings("ignore:.*`training_step` returned `None`.*"),
]

STEPS = 8
# The warnings this run must give, each once per monitor it concerns: the probes of a step
# whose training batch is skipped are skipped too (the probe's training_step returns None as
# well), and the warmup's lr 0 at step 0 has no stability threshold. One per-module block has
# a Hessian that is zero to rounding at step 0 (λ₁ = 4e-14): no relative error can be
# certified for it, and the monitor says so rather than flag it converged.
EXPECTED = ("returned None", "learning rate is 0", "finer than its products resolve")


def monitors() -> list[pl.Callback]:
    return [
        HessianEigenvalueMonitor(k=2, tol=1e-2, every_n_steps=2, per_layer=True),
        HessianTraceMonitor(num_hvps=4, every_n_steps=2, per_layer=True),
        SpectralDensityMonitor(num_steps=6, num_points=10, every_n_steps=2),
        # (torchmetrics' update inside training_step cannot be vmapped: micro-batches)
        GradientCoherenceMonitor(mode="micro_batch", micro_batch_size=2, every_n_steps=2),
    ]


def train(tmp_path: Path, callbacks: list[pl.Callback]) -> tuple[dict[str, Any], Any]:
    pl.seed_everything(7, verbose=False)
    model = RealStack()
    logger = csv_logger(tmp_path)
    trainer = make_trainer(
        callbacks, logger=logger, max_steps=STEPS, accumulate_grad_batches=2, log_every_n_steps=1
    )
    trainer.fit(model, real_stack_loader())
    assert trainer.global_step == STEPS
    return final_state(model, trainer), read_csv(logger)


def test_all_monitors_on_a_real_stack_leave_training_bit_identical(tmp_path: Path) -> None:
    without, _ = train(tmp_path / "without", [])
    with pytest.warns(CurvatureWarning) as caught:
        run, logged = train(tmp_path / "with", monitors())
    messages = [str(w.message) for w in caught if issubclass(w.category, CurvatureWarning)]
    assert all(any(e in m for e in EXPECTED) for m in messages), messages
    assert any("learning rate is 0 at step 0" in m for m in messages)
    assert_identical(run, without)

    # Every monitor logged finite values at the probed steps it could measure.
    for tag in (
        "curvature/eigenvalue_1",
        "curvature/eigenvalue_2",
        "curvature/eigenvalue_1/attention.qkv",
        "curvature/trace",
        "curvature/trace/head",
        "curvature/density_max",
        "gradient/coherence",
        "gradient/noise_scale",
    ):
        assert logged.get(tag), f"{tag} was never logged"
        assert all(math.isfinite(value) for _, value in logged[tag]), tag
        assert {step for step, _ in logged[tag]} <= {0, 2, 4, 6}
    # The threshold from step 2 on (lr > 0), never at step 0 (lr 0).
    assert 0 not in {step for step, _ in logged["curvature/stability_threshold"]}
    assert logged["gradient/num_samples"][0][1] == 4  # the fixed probe batch of 8, pairs


def test_the_comparison_catches_a_probe_that_keeps_the_modules_counter(tmp_path: Path) -> None:
    """The harness can fail: one extra ``training_step`` call per step left on the module
    shifts which batches return None."""

    class Calls(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            with torch.no_grad():
                pl_module.training_step(batch)

    without, _ = train(tmp_path / "without", [])
    leaky, _ = train(tmp_path / "leaky", [Calls()])
    assert leaky["calls"] != without["calls"]
