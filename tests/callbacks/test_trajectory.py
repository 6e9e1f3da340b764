"""Harmless: training with every monitor at every step is bit-for-bit training without them.

The model has BatchNorm (running statistics a train-mode forward would move) and Dropout
(masks drawn from the global RNG), the loader shuffles (each epoch's permutation is drawn from
the global RNG), gradients are accumulated over two batches, and the optimizer keeps state
(momentum buffers, Adam moments). Any RNG draw, buffer write, ``.grad`` write or optimizer
touch by a probe would change the final state.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from models import (
    LIGHTNING_NOISE,
    BNDropoutClassifier,
    assert_identical,
    classification_data,
    csv_logger,
    make_trainer,
    read_csv,
)
from torch.utils.data import DataLoader

from lightning_curvature import (
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

pytestmark = LIGHTNING_NOISE

STEPS = 30


def all_monitors(**common: Any) -> list[pl.Callback]:
    return [
        HessianEigenvalueMonitor(
            k=2,
            tol=1e-3,
            stability=True,
            smallest=True,
            per_layer=["net.0.*", "net.4.*"],
            every_n_steps=1,
            on_train_end=True,
            **common,
        ),
        HessianTraceMonitor(num_hvps=4, per_layer=True, every_n_steps=1, **common),
        SpectralDensityMonitor(num_steps=6, num_points=20, every_n_steps=1, **common),
        # (micro-batches of 2 where BatchNorm in train mode couples the examples)
        GradientCoherenceMonitor(per_layer=True, micro_batch_size=2, every_n_steps=1, **common),
    ]


def free_monitors() -> list[pl.Callback]:
    """The monitors that read training's own backward passes (here: 2 micro-batches a step)."""
    return [GradientCoherenceMonitor(source="accumulation", per_layer=True, every_n_steps=1)]


class Modes(pl.Callback):
    """Records every submodule's train/eval flag at the start and end of each batch."""

    def __init__(self) -> None:
        self.seen: list[list[bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.seen.append([m.training for m in pl_module.modules()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.seen.append([m.training for m in pl_module.modules()])


def train(
    tmp_path: Path, optimizer: str, monitors: list[pl.Callback], **loader_options: Any
) -> dict[str, Any]:
    pl.seed_everything(1234, verbose=False)
    model = BNDropoutClassifier(optimizer)
    modes = Modes()
    logger = csv_logger(tmp_path)
    trainer = make_trainer(
        [*monitors, modes],
        logger=logger,
        max_steps=STEPS,
        accumulate_grad_batches=2,
    )
    data = DataLoader(classification_data(), batch_size=8, shuffle=True, **loader_options)
    trainer.fit(model, data)
    assert trainer.global_step == STEPS
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "modes": modes.seen,
        "train_loss": read_csv(logger)["train_loss"],
    }


def assert_same_run(with_monitors: dict[str, Any], without: dict[str, Any]) -> None:
    assert_identical(with_monitors["state"], without["state"], "state_dict")
    assert_identical(with_monitors["grads"], without["grads"], "grad")
    assert_identical(with_monitors["optimizer"], without["optimizer"], "optimizer")
    assert torch.equal(with_monitors["torch_rng"], without["torch_rng"])
    numpy_a, numpy_b = with_monitors["numpy_rng"], without["numpy_rng"]
    assert numpy_a[0] == numpy_b[0]
    assert np.array_equal(numpy_a[1], numpy_b[1])
    assert numpy_a[2:] == numpy_b[2:]
    assert with_monitors["python_rng"] == without["python_rng"]
    assert with_monitors["modes"] == without["modes"]
    # The user's own self.log values were not changed (nor duplicated) by the probes.
    assert with_monitors["train_loss"] == without["train_loss"]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return {
        name: train(tmp_path_factory.mktemp(f"base_{name}"), name, []) for name in ("sgd", "adam")
    }


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_all_monitors_every_step_leave_training_bit_identical(
    tmp_path: Path, optimizer: str, baselines: dict[str, dict[str, Any]]
) -> None:
    monitors = all_monitors() + free_monitors()
    run = train(tmp_path, optimizer, monitors)
    assert_same_run(run, baselines[optimizer])

    # ... and the monitors really measured at every step (so the comparison means something).
    eigen, trace, density, coherence, free = monitors
    assert eigen.schedule.last_step == STEPS  # the on_train_end probe
    assert trace.schedule.last_step == density.schedule.last_step == STEPS - 1
    names = set(eigen.last_metrics)
    assert {"curvature/eigenvalue_2", "curvature/eigenvalue_min"} <= names
    assert {"curvature/eigenvalue_1/net.0", "curvature/eigenvalue_1/net.4"} <= names
    assert {"curvature/stability_threshold", "curvature/sharpness_ratio"} <= names
    if optimizer == "adam":
        assert "curvature/preconditioned_eigenvalue_1" in names
    assert {"curvature/trace/net.0", "curvature/trace/net.1", "curvature/trace/net.4"} <= set(
        trace.last_metrics
    )
    assert density.last_density is not None
    assert coherence.schedule.last_step == free.schedule.last_step == STEPS - 1
    assert coherence.last_metrics["gradient/num_samples"] == 8  # per-example, BN in eval
    assert free.last_metrics["gradient/num_samples"] == 2  # the step's two micro-batches
    assert "gradient/coherence/net.1" in free.last_metrics


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        ("sgd", {"batch_norm": "train"}),
        ("adam", {"probe": "current"}),
        ("sgd", {"probe": "current", "batch_norm": "train"}),
    ],
)
def test_train_mode_batch_norm_and_current_batch_probes_are_harmless_too(
    tmp_path: Path, optimizer: str, options: dict[str, Any], baselines: dict[str, dict[str, Any]]
) -> None:
    run = train(tmp_path, optimizer, all_monitors(**options))
    assert_same_run(run, baselines[optimizer])


def test_the_comparison_catches_a_probe_that_draws_from_the_global_rng(
    tmp_path: Path, baselines: dict[str, dict[str, Any]]
) -> None:
    """The harness can fail: one stray ``torch.rand`` per step changes the dropout masks."""

    class Leaky(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            torch.rand(1)

    run = train(tmp_path, "sgd", [Leaky()])
    assert not torch.equal(run["state"]["net.0.weight"], baselines["sgd"]["state"]["net.0.weight"])


def test_a_loader_with_persistent_workers_keeps_its_order_and_seeds(
    tmp_path: Path, baselines: dict[str, dict[str, Any]]
) -> None:
    """Drawing the fixed probe must not reset a persistent worker iterator (which would skip
    the next epoch's draw of worker seeds from the global RNG)."""
    options = {"num_workers": 1, "persistent_workers": True}
    without = train(tmp_path / "without", "sgd", [], **options)
    monitors = [HessianTraceMonitor(num_hvps=2, every_n_steps=10)]
    assert_same_run(train(tmp_path / "with", "sgd", monitors, **options), without)
