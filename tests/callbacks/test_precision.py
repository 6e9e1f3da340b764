"""Under mixed or low precision training, probes compute in fp32 with autocast off.

Each run trains under the given precision and probes only the final weights (so the
monitors' generators are fresh, seeded with 0); the logged values must equal a 32-bit probe
of the same weights made directly with the model-level functions.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from models import (
    CPU,
    LIGHTNING_NOISE,
    TanhRegressor,
    csv_logger,
    loader,
    make_trainer,
    regression_data,
)

from lightning_curvature import (
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
    hessian_eigenvalues,
    hessian_trace,
    spectral_density,
)
from lightning_curvature.callbacks import training_step_loss
from lightning_curvature.callbacks.probe_data import draw_batches
from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.linalg.sampling import make_generator
from lightning_curvature.functional.model.batches import BatchList

pytestmark = [
    *LIGHTNING_NOISE,
    pytest.mark.filterwarnings("ignore:.*GradScaler is enabled, but CUDA is not available.*"),
]

PRECISIONS = {
    "bf16-mixed": {"precision": "bf16-mixed"},
    # On CPU, Trainer(precision="16-mixed") falls back to bf16; the plugin gives real fp16
    # autocast (with a CPU GradScaler).
    "16-mixed": {"plugins": [MixedPrecision("16-mixed", "cpu")]},
    "bf16-true": {"precision": "bf16-true"},
    "32-true": {"precision": "32-true"},
}


def _run(tmp_path: Path, precision: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    dataset = regression_data(n=64)
    train_loader = loader(dataset, batch_size=16, shuffle=True)
    monitors = [
        HessianEigenvalueMonitor(k=2, tol=1e-5, every_n_steps=None, on_train_end=True),
        HessianTraceMonitor(num_hvps=8, every_n_steps=None, on_train_end=True),
        SpectralDensityMonitor(num_steps=8, every_n_steps=None, on_train_end=True),
    ]
    options = {k: copy.deepcopy(v) for k, v in PRECISIONS[precision].items()}
    trainer = make_trainer(monitors, logger=csv_logger(tmp_path), max_steps=6, **options)
    model = TanhRegressor(lr=0.05)
    trainer.fit(model, train_loader)
    return {"model": model, "loader": train_loader, "monitors": monitors}


def _reference(model: torch.nn.Module, batches: list[Any], **overrides: Any) -> dict[str, float]:
    """A 32-bit probe of the same weights, with the calls the monitors make."""
    fp32 = copy.deepcopy(model).float()
    common: dict[str, Any] = {"batch_norm": "eval", **overrides}
    loss_fn = common.pop("loss_fn", training_step_loss)
    eig = hessian_eigenvalues(
        fp32, loss_fn, BatchList(batches), 2, 1e-5, generator=make_generator(CPU, 0), **common
    )
    trace = hessian_trace(
        fp32, loss_fn, BatchList(batches), 8, generator=make_generator(CPU, 0), **common
    )
    esd = spectral_density(
        fp32, loss_fn, BatchList(batches), 8, generator=make_generator(CPU, 0), **common
    )
    return {
        "curvature/eigenvalue_1": float(eig.eigenvalues[0]),
        "curvature/eigenvalue_2": float(eig.eigenvalues[1]),
        "curvature/trace": float(trace.estimate),
        "curvature/trace_std_error": float(trace.std_error),
        "curvature/density_max": float(esd.nodes.max()),
        "curvature/density_min": float(esd.nodes.min()),
    }


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_probes_under_any_precision_equal_a_32_bit_probe_of_the_same_weights(
    tmp_path: Path, precision: str
) -> None:
    run = _run(tmp_path, precision)
    model = run["model"]
    if precision == "bf16-true":
        assert model.net[0].weight.dtype == torch.bfloat16
    # The fixed probe: the same draw as the monitors' (seeded, independent of training).
    probe = draw_batches(run["loader"], 1, CPU, seed=0)
    expected = _reference(model, probe)
    logged: dict[str, float] = {}
    for monitor in run["monitors"]:
        assert monitor.schedule.last_step == 6  # the only probe: the final weights
        logged.update(monitor.last_metrics)
    for tag, value in expected.items():
        assert math.isfinite(logged[tag]), tag
        # Asked: 1e-4. Got: the same fp32 operations, so equal to rounding (checked at 1e-6).
        assert logged[tag] == pytest.approx(value, rel=1e-6), tag
    assert logged["curvature/stability_threshold"] == pytest.approx(3.0 / 0.05)


def autocast_loss(dtype: torch.dtype):  # type: ignore[no-untyped-def]
    def loss_fn(module: torch.nn.Module, batch: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype):
            return training_step_loss(module, batch).float()  # type: ignore[arg-type]

    return loss_fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_probe_with_autocast_on_would_be_caught(tmp_path: Path, dtype: torch.dtype) -> None:
    """The comparison above can fail: low-precision autocast moves the values far more."""
    run = _run(tmp_path, "bf16-mixed")
    probe = draw_batches(run["loader"], 1, CPU, seed=0)
    fp32 = _reference(run["model"], probe)
    # The rounding Lanczos measures along the way sees the low-precision products too.
    with pytest.warns(CurvatureWarning, match="finer than its products resolve"):
        low = _reference(run["model"], probe, loss_fn=autocast_loss(dtype))
    gap = max(abs(low[tag] - fp32[tag]) / abs(fp32[tag]) for tag in fp32)
    assert gap > 1e-5
