"""What lands in the TensorBoard event files: tags, exact probe steps, closed-form values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from models import (
    LIGHTNING_NOISE,
    LeastSquares,
    TanhRegressor,
    loader,
    make_trainer,
    read_events,
    regression_data,
    steps,
    tb_logger,
    tb_scalars,
)

from lightning_curvature import (
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

pytestmark = LIGHTNING_NOISE


@pytest.fixture(scope="module")
def tanh_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """10 steps, 4 batches per epoch, three cadences, log_every_n_steps=4 (does not divide 3)."""
    torch.manual_seed(0)
    logger = tb_logger(tmp_path_factory.mktemp("events"))
    monitors = [
        HessianEigenvalueMonitor(
            k=2, smallest=True, per_layer=["net.0.*"], every_n_steps=3, on_train_end=True
        ),
        HessianTraceMonitor(num_hvps=4, per_layer=["net.0.*"], every_n_steps=3),
        SpectralDensityMonitor(num_steps=8, every_n_epochs=1),
    ]
    trainer = make_trainer(monitors, logger=logger, max_steps=10, log_every_n_steps=4)
    trainer.fit(TanhRegressor(), loader(regression_data(n=32), batch_size=8, shuffle=True))
    events = read_events(logger)
    return {"events": events, "scalars": tb_scalars(events), "monitors": monitors}


def test_every_tag_of_the_design_is_written_at_exactly_the_probe_steps(
    tanh_run: dict[str, Any],
) -> None:
    scalars = tanh_run["scalars"]
    eigen_tags = [
        "curvature/eigenvalue_1",
        "curvature/eigenvalue_2",
        "curvature/eigenvalue_min",
        "curvature/eigenvalue_1/net.0",
        "curvature/stability_threshold",
        "curvature/sharpness_ratio",
        "probe_cost/eigenvalue_hvps",
        "probe_cost/eigenvalue_seconds",
    ]
    trace_tags = [
        "curvature/trace",
        "curvature/trace_std_error",
        "curvature/trace_lower",
        "curvature/trace_upper",
        "curvature/trace/net.0",
        "probe_cost/trace_hvps",
        "probe_cost/trace_seconds",
    ]
    density_tags = [
        "curvature/density_max",
        "curvature/density_min",
        "probe_cost/density_hvps",
        "probe_cost/density_seconds",
    ]
    for tag in eigen_tags:  # every_n_steps=3 over 10 steps, plus the final weights
        assert steps(scalars[tag]) == [0, 3, 6, 9, 10], tag
    for tag in trace_tags:  # every_n_steps=3
        assert steps(scalars[tag]) == [0, 3, 6, 9], tag
    for tag in density_tags:  # every_n_epochs=1, 4 steps per epoch: at each epoch's end, as
        assert steps(scalars[tag]) == [4, 8, 10], tag  # Lightning's (the last one cut short)
    # Nothing else: the user's train_loss goes through self.log at its own cadence.
    assert set(scalars) == {*eigen_tags, *trace_tags, *density_tags, "train_loss", "epoch"}
    assert steps(scalars["train_loss"]) == [3, 7]  # log_every_n_steps=4: untouched


def test_the_event_file_holds_the_values_the_monitors_computed(tanh_run: dict[str, Any]) -> None:
    scalars = tanh_run["scalars"]
    eigen, trace, density = tanh_run["monitors"]
    for monitor in (eigen, trace, density):
        for tag, value in monitor.last_metrics.items():
            assert scalars[tag][-1][1] == pytest.approx(value, rel=1e-6), tag
    assert eigen.last_metrics["curvature/stability_threshold"] == pytest.approx(3.0 / 0.05)
    top = eigen.last_metrics["curvature/eigenvalue_1"]
    assert eigen.last_metrics["curvature/sharpness_ratio"] == pytest.approx(top / (3.0 / 0.05))
    assert eigen.last_metrics["curvature/eigenvalue_2"] <= top
    assert (
        eigen.last_metrics["curvature/eigenvalue_min"]
        <= eigen.last_metrics["curvature/eigenvalue_2"]
    )
    assert trace.last_metrics["curvature/trace_std_error"] > 0
    for bound, sign in (("lower", -1), ("upper", 1)):  # the band of the margin chart
        assert trace.last_metrics[f"curvature/trace_{bound}"] == pytest.approx(
            trace.last_metrics["curvature/trace"]
            + sign * 2 * trace.last_metrics["curvature/trace_std_error"]
        )
    assert trace.last_metrics["probe_cost/trace_hvps"] == 4
    assert density.last_metrics["probe_cost/density_hvps"] == 8


def test_density_histogram_and_image_at_the_density_probe_steps(tanh_run: dict[str, Any]) -> None:
    events = tanh_run["events"]
    density = tanh_run["monitors"][2]
    assert events.Tags()["histograms"] == ["curvature/spectral_density"]
    # (and the eigenvalue monitor's picture of sharpness against its threshold)
    assert events.Tags()["images"] == [
        "curvature/sharpness_chart",
        "curvature/spectral_density_image",
    ]
    histograms = events.Histograms("curvature/spectral_density")
    assert [h.step for h in histograms] == [4, 8, 10]
    num_parameters = 5 * 8 + 8 + 8 + 1
    scalars = tanh_run["scalars"]
    for h, (_, low), (_, high) in zip(
        histograms, scalars["curvature/density_min"], scalars["curvature/density_max"], strict=True
    ):
        value = h.histogram_value
        # bucket counts are eigenvalue counts: they add up to the number of parameters
        assert value.num == pytest.approx(num_parameters, rel=1e-3)
        assert sum(value.bucket) == pytest.approx(value.num)
        assert len(value.bucket) == 200
        assert value.min < low < high < value.max  # the grid spans the extreme nodes
    assert density.last_density is not None
    images = events.Images("curvature/spectral_density_image")
    assert [i.step for i in images] == [4, 8, 10]
    assert (images[0].width, images[0].height) == (720, 340)


# -- closed form on linear least squares -----------------------------------------------------------
def least_squares_run(
    tmp_path: Path, optimizer: str, lr: float, max_steps: int = 4, **opt: Any
) -> tuple[dict[str, list[tuple[int, float]]], torch.Tensor, pl.Trainer]:
    dataset = regression_data(n=32, d=5)
    x = dataset.tensors[0].double()
    hessian = 2 * x.T @ x / len(x)
    eigenvalues = torch.linalg.eigvalsh(hessian).flip(0)  # largest first
    logger = tb_logger(tmp_path)
    # the final probe sees the optimizer state the test can read after fit
    eigen = HessianEigenvalueMonitor(
        k=2, tol=1e-4, smallest=True, every_n_steps=1, on_train_end=True
    )
    monitors = [
        eigen,
        HessianTraceMonitor(num_hvps=16, every_n_steps=2),
        SpectralDensityMonitor(num_steps=5, every_n_steps=2),
    ]
    trainer = make_trainer(monitors, logger=logger, max_steps=max_steps)
    model = LeastSquares(d=5, optimizer=optimizer, lr=lr, **opt)
    trainer.fit(model, loader(dataset, batch_size=32))  # full batch: the probe is all the data
    return tb_scalars(read_events(logger)), eigenvalues, trainer


@pytest.mark.parametrize(
    ("opt", "threshold"),
    [
        ({}, 2 / 0.01),
        ({"momentum": 0.9}, 3.8 / 0.01),
        ({"momentum": 0.9, "dampening": 0.5}, 3.8 / (0.01 * 0.5)),
        ({"momentum": 0.9, "nesterov": True}, 3.8 / (0.01 * 2.8)),
        # coupled L2 adds wd to every eigenvalue: η(λ₁ + wd) < 3 ⇔ λ₁ < 3/η − wd
        ({"momentum": 0.5, "weight_decay": 0.3}, 3.0 / 0.01 - 0.3),
    ],
)
def test_least_squares_eigenvalues_equal_the_closed_form_and_threshold_is_sgds(
    tmp_path: Path, opt: dict[str, float], threshold: float
) -> None:
    scalars, exact, _ = least_squares_run(tmp_path, "sgd", 0.01, **opt)
    for i in (1, 2):
        series = scalars[f"curvature/eigenvalue_{i}"]
        assert steps(series) == [0, 1, 2, 3, 4]
        # The Hessian of least squares does not depend on the weights: the same at every step.
        for _, value in series:
            assert value == pytest.approx(float(exact[i - 1]), rel=1e-4)
    for _, value in scalars["curvature/eigenvalue_min"]:
        assert value == pytest.approx(float(exact[-1]), rel=1e-4)
    for _, value in scalars["curvature/stability_threshold"]:
        assert value == pytest.approx(threshold, rel=1e-6)
    for (_, ratio), (_, top) in zip(
        scalars["curvature/sharpness_ratio"], scalars["curvature/eigenvalue_1"], strict=True
    ):
        assert ratio == pytest.approx(top / threshold, rel=1e-6)  # the ratio, one definition
    # Lanczos with 5 steps on a 5-dimensional Hessian: the extreme SLQ nodes are exact.
    assert steps(scalars["curvature/density_max"]) == [0, 2]
    for _, value in scalars["curvature/density_max"]:
        assert value == pytest.approx(float(exact[0]), rel=1e-4)
    for _, value in scalars["curvature/density_min"]:
        assert value == pytest.approx(float(exact[-1]), rel=1e-4)
    # Hutchinson is random, but within a few standard errors of the exact trace.
    for (_, trace), (_, error) in zip(
        scalars["curvature/trace"], scalars["curvature/trace_std_error"], strict=True
    ):
        assert 0 < error < 0.5 * float(exact.sum())
        assert abs(trace - float(exact.sum())) < 4 * error


def test_least_squares_under_adam_logs_38_over_lr_and_the_preconditioned_ratio(
    tmp_path: Path,
) -> None:
    scalars, exact, trainer = least_squares_run(tmp_path, "adam", 0.01)
    assert steps(scalars["curvature/eigenvalue_1"]) == [0, 1, 2, 3, 4]
    for _, value in scalars["curvature/eigenvalue_1"]:
        assert value == pytest.approx(float(exact[0]), rel=1e-4)
    for _, value in scalars["curvature/stability_threshold"]:
        assert value == pytest.approx(38 / 0.01, rel=1e-6)
    # No preconditioner before Adam's first step: no ratio at step 0.
    assert steps(scalars["curvature/preconditioned_eigenvalue_1"]) == [1, 2, 3, 4]
    assert steps(scalars["curvature/sharpness_ratio"]) == [1, 2, 3, 4]
    for (_, ratio), (_, precond) in zip(
        scalars["curvature/sharpness_ratio"],
        scalars["curvature/preconditioned_eigenvalue_1"],
        strict=True,
    ):
        assert ratio == pytest.approx(precond / (38 / 0.01), rel=1e-6)
    # The final probe: λ₁(P⁻¹H) with P = (1 − β1ᵗ)(√v̂ + ε) from Adam's state, dense.
    optimizer = trainer.optimizers[0]
    (weight,) = trainer.lightning_module.parameters()
    state = optimizer.state[weight]
    t, (beta1, beta2), eps = float(state["step"]), (0.9, 0.999), 1e-8
    assert t == 4
    v_hat = state["exp_avg_sq"].double().reshape(-1) / (1 - beta2**t)
    p = (1 - beta1**t) * (v_hat.sqrt() + eps)
    dataset = regression_data(n=32, d=5)
    x = dataset.tensors[0].double()
    dense = torch.linalg.eigvals(torch.diag(1 / p) @ (2 * x.T @ x / len(x)))
    expected = float(dense.real.max())
    final = scalars["curvature/preconditioned_eigenvalue_1"][-1][1]
    assert final == pytest.approx(expected, rel=1e-4)
    assert abs(expected - float(exact[0])) > 0.1 * expected  # not the plain sharpness
