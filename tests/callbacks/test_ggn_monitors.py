"""The eigenvalue, trace and density monitors with ``curvature="ggn"``: ``ggn_`` tags, the
values of the model-level functions on the fixed probe, training untouched, clear refusals."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import (
    LIGHTNING_NOISE,
    TanhRegressor,
    csv_logger,
    loader,
    make_trainer,
    read_csv,
    regression_data,
    steps,
)
from torch import nn

from lightning_curvature import (
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    OutputLoss,
    SpectralDensityMonitor,
    hessian_eigenvalues,
    hessian_trace,
    spectral_density,
)
from lightning_curvature.functional.linalg.sampling import make_generator

pytestmark = LIGHTNING_NOISE
MONITORS = [HessianEigenvalueMonitor, HessianTraceMonitor, SpectralDensityMonitor]


def regressor_outputs(module: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    x, y = batch
    return module.net(x).squeeze(-1), y


SPLIT = OutputLoss(regressor_outputs, F.mse_loss)  # TanhRegressor's training loss, split


def _monitors() -> list[Any]:
    return [
        HessianEigenvalueMonitor(
            k=2, tol=1e-4, every_n_steps=2, curvature="ggn", loss_fn=SPLIT, warm_start=False
        ),
        HessianTraceMonitor(num_hvps=6, every_n_steps=2, curvature="ggn", loss_fn=SPLIT),
        SpectralDensityMonitor(num_steps=8, every_n_steps=2, curvature="ggn", loss_fn=SPLIT),
        HessianEigenvalueMonitor(k=1, tol=1e-4, every_n_steps=2, warm_start=False),  # Hessian
    ]


def test_ggn_monitors_log_ggn_tags_with_the_functions_values(tmp_path: Path) -> None:
    model = TanhRegressor()
    initial = copy.deepcopy(model)
    monitors = _monitors()
    logger = csv_logger(tmp_path)
    trainer = make_trainer(monitors, logger=logger, max_steps=3)
    trainer.fit(model, loader(regression_data(), 8))
    logged = read_csv(logger)
    for tag in (
        "curvature/ggn_eigenvalue_1",
        "curvature/ggn_eigenvalue_2",
        "curvature/ggn_stability_threshold",
        "curvature/ggn_sharpness_ratio",
        "curvature/ggn_trace",
        "curvature/ggn_trace_std_error",
        "curvature/ggn_density_max",
        "curvature/ggn_density_min",
        "probe_cost/ggn_eigenvalue_hvps",
        "probe_cost/ggn_trace_hvps",
        "probe_cost/ggn_density_hvps",
        "curvature/eigenvalue_1",  # the Hessian monitor beside them
    ):
        assert steps(logged[tag]) == [0, 2], tag
    assert "curvature/trace" not in logged
    probe = monitors[0].fixed_probe
    assert probe is not None
    cpu = torch.device("cpu")
    first = {tag: series[0][1] for tag, series in logged.items()}  # step 0: the initial weights
    eig = hessian_eigenvalues(
        initial, SPLIT, probe, k=2, tol=1e-4, batch_norm="train", curvature="ggn",
        generator=make_generator(cpu),
    )  # fmt: skip
    for i in range(2):
        assert first[f"curvature/ggn_eigenvalue_{i + 1}"] == pytest.approx(
            float(eig.eigenvalues[i]), rel=1e-5
        )
    trace = hessian_trace(initial, SPLIT, probe, 6, curvature="ggn", generator=make_generator(cpu))
    assert first["curvature/ggn_trace"] == pytest.approx(float(trace.estimate), rel=1e-5)
    esd = spectral_density(initial, SPLIT, probe, 8, curvature="ggn", generator=make_generator(cpu))
    assert first["curvature/ggn_density_max"] == pytest.approx(float(esd.nodes.max()), rel=1e-5)
    assert first["curvature/ggn_density_min"] >= -1e-5 * first["curvature/ggn_density_max"]
    # A tanh regressor away from its fit: Hessian and GGN differ, and both are what is logged.
    hessian = hessian_eigenvalues(initial, SPLIT, probe, tol=1e-4, batch_norm="train")
    assert first["curvature/eigenvalue_1"] == pytest.approx(float(hessian.eigenvalues[0]), rel=1e-5)
    assert first["curvature/eigenvalue_1"] != pytest.approx(
        first["curvature/ggn_eigenvalue_1"], rel=1e-3
    )


def test_ggn_monitors_leave_training_exactly_as_without_them(tmp_path: Path) -> None:
    runs = []
    for callbacks in ([], _monitors()):
        torch.manual_seed(0)
        model = TanhRegressor()
        logger = csv_logger(tmp_path, f"run{len(runs)}")
        trainer = make_trainer(callbacks, logger=logger, max_steps=5)
        trainer.fit(model, loader(regression_data(), 8, shuffle=True))
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
        runs[-1]["rng"] = torch.get_rng_state()
    for key, value in runs[0].items():
        assert torch.equal(runs[1][key], value), key


def test_the_charts_say_ggn(tmp_path: Path) -> None:
    monitors = _monitors()[:3]
    model = TanhRegressor()
    trainer = make_trainer(monitors, logger=csv_logger(tmp_path), max_steps=1)
    trainer.fit(model, loader(regression_data(), 8))
    titles = [
        title
        for monitor in monitors
        for charts in monitor.charts(trainer, model).values()
        for title in charts
    ]
    assert "top 2 GGN eigenvalues (raw G)" in titles
    assert "sharpness λ₁(G) vs. stability threshold (2+2β)/η" in titles
    assert "sharpness ratio λ₁(G) / threshold" in titles
    assert "GGN trace ± 2 standard errors" in titles
    assert "GGN spectrum edges λ_min, λ_max (SLQ)" in titles
    assert all("Hessian" not in t for t in titles if "products" not in t), titles


@pytest.mark.parametrize("monitor", MONITORS, ids=lambda m: m.__name__)
def test_ggn_without_a_split_loss_is_refused_at_construction(monitor: type) -> None:
    with pytest.raises(MisconfigurationException, match=r"curvature='ggn' needs") as raised:
        monitor(curvature="ggn")
    assert "OutputLoss(output_fn, loss)" in str(raised.value)
    assert "training_step, does not split it" in str(raised.value)
    with pytest.raises(MisconfigurationException, match=r"got loss_fn=<function"):
        monitor(curvature="ggn", loss_fn=lambda m, b: m(b).sum())


@pytest.mark.parametrize("monitor", MONITORS, ids=lambda m: m.__name__)
def test_unknown_curvature_and_finite_differences_are_refused(monitor: type) -> None:
    with pytest.raises(MisconfigurationException, match=r"`curvature` must be one of \("):
        monitor(curvature="fisher")
    with pytest.raises(MisconfigurationException, match=r"takes `backend` in \('auto'"):
        monitor(curvature="ggn", loss_fn=SPLIT, backend="finite_difference")


def test_a_named_ggn_monitor_and_its_state_key() -> None:
    ggn = HessianTraceMonitor(curvature="ggn", loss_fn=SPLIT, name="heldout")
    assert ggn.tag("curvature/trace") == "curvature/heldout/ggn_trace"
    hessian = HessianTraceMonitor(loss_fn=SPLIT, name="heldout")
    assert hessian.tag("curvature/trace") == "curvature/heldout/trace"
    assert ggn.state_key != hessian.state_key  # both can sit in one Trainer
    assert "curvature" not in hessian.state_key  # Hessian keys as before (old checkpoints load)
    assert "OutputLoss(regressor_outputs, mse_loss)" in ggn.state_key  # stable across runs
