"""The TensorBoard page as a researcher reads it: layout, names, the threshold's quantity.

The custom-scalars layout is read back from the event file and every chart's regexes are
matched (as TensorBoard does, by search) against the tags actually written: each chart must
show exactly the tags it means, for every optimizer family.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import (
    LIGHTNING_NOISE,
    BNDropoutClassifier,
    classification_data,
    csv_logger,
    hessian_loss,
    loader,
    make_optimizer,
    make_trainer,
    read_csv,
    read_events,
    regression_data,
    steps,
    tb_logger,
    tb_scalars,
)
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from tensorboard.util import tensor_util
from torch import nn
from torch.nn import functional as F

import lightning_curvature.callbacks.monitor as base
from lightning_curvature import (
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
    hessian_eigenvalues,
)
from lightning_curvature.callbacks import CurvatureMonitor, Measurement, training_step_loss
from lightning_curvature.callbacks.reporting.rendering import density_image

pytestmark = LIGHTNING_NOISE

OPTIMIZERS = {
    "sgd": ("sgd", {}),
    "momentum": ("sgd", {"momentum": 0.9, "weight_decay": 1e-3}),
    "adam": ("adam", {}),
    "adamw": ("adamw", {"weight_decay": 0.01}),
}


class Net(pl.LightningModule):
    def __init__(self, optimizer: str, **opt: Any) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
        self.optimizer, self.opt = optimizer, opt

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = 0.01 if self.optimizer.startswith("adam") else 0.05
        return make_optimizer(self.parameters(), self.optimizer, lr, **self.opt)


def read_layout(events: Any) -> dict[str, dict[str, Any]]:
    """Category -> chart title -> ('multiline', [regex]) or ('margin', (value, lower, upper))."""
    (config,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)  # one layout per run
    proto = layout_pb2.Layout.FromString(tensor_util.make_ndarray(config.tensor_proto).item())
    out: dict[str, dict[str, Any]] = {}
    for category in proto.category:
        for chart in category.chart:
            if chart.HasField("margin"):
                (series,) = chart.margin.series
                content = ("margin", (series.value, series.lower, series.upper))
            else:
                content = ("multiline", list(chart.multiline.tag))
            out.setdefault(category.title, {})[chart.title] = content
    return out


def matched(regexes: list[str], tags: set[str]) -> set[str]:
    return {tag for tag in tags if any(re.search(r, tag) for r in regexes)}


def full_run(tmp_path: Path, family: str) -> tuple[Any, dict[str, list[tuple[int, float]]]]:
    optimizer, opt = OPTIMIZERS[family]
    logger = tb_logger(tmp_path)
    monitors = [
        HessianEigenvalueMonitor(k=2, smallest=True, per_layer=["net.0.*"], every_n_steps=2),
        HessianTraceMonitor(num_hvps=4, per_layer=True, every_n_steps=2),
        SpectralDensityMonitor(num_steps=6, every_n_steps=2),
        GradientCoherenceMonitor(per_layer=True, every_n_steps=2),
    ]
    trainer = make_trainer(monitors, logger=logger, max_steps=5)
    trainer.fit(Net(optimizer, **opt), loader(regression_data(n=32), batch_size=8))
    events = read_events(logger)
    return events, tb_scalars(events)


@pytest.mark.parametrize("family", list(OPTIMIZERS))
def test_every_chart_shows_exactly_its_tags_and_the_threshold_chart_its_quantity(
    tmp_path: Path, family: str
) -> None:
    events, scalars = full_run(tmp_path, family)
    tags = set(scalars)
    layout = read_layout(events)
    adam = family.startswith("adam")
    compared = "curvature/preconditioned_eigenvalue_1" if adam else "curvature/eigenvalue_1"
    threshold_title = (
        "preconditioned sharpness λ₁(P⁻¹H) vs. threshold (2+2β₁)/((1−β₁)η)"
        if adam
        else {"sgd": "sharpness λ₁ vs. stability threshold 2/η",
              "momentum": "sharpness λ₁ vs. stability threshold (2+2β)/η − wd"}[family]
    )  # fmt: skip
    ratio_title = (
        "sharpness ratio λ₁(P⁻¹H) / threshold" if adam else "sharpness ratio λ₁ / threshold"
    )
    expected_multiline = {
        "curvature": {
            threshold_title: {compared, "curvature/stability_threshold"},
            ratio_title: {"curvature/sharpness_ratio"},
            "top 2 Hessian eigenvalues and the smallest (raw H)": {
                "curvature/eigenvalue_1",
                "curvature/eigenvalue_2",
                "curvature/eigenvalue_min",
            },
            "top eigenvalue per block": {"curvature/eigenvalue_1/net.0"},
            "Hessian trace per block": {"curvature/trace/net.0", "curvature/trace/net.2"},
            "standard error of the trace": {"curvature/trace_std_error"},
            "spectrum edges λ_min, λ_max (SLQ)": {
                "curvature/density_max",
                "curvature/density_min",
            },
        },
        "gradient": {
            "gradient coherence (m-coherence)": {"gradient/coherence"},
            "mean pairwise cosine of the gradients": {"gradient/mean_cosine"},
            "noise scale B_simple = tr Σ / ‖G‖² (examples)": {"gradient/noise_scale"},
            "noise scale parts ‖G‖² and tr Σ": {"gradient/grad_norm_sq", "gradient/trace_sigma"},
            "gradient SNR (mean over coordinates)": {"gradient/snr"},
            "gradient coherence per block": {
                "gradient/coherence/net.0",
                "gradient/coherence/net.2",
            },
        },
        "cost of the probes": {
            "seconds per probe": {
                "probe_cost/eigenvalue_seconds",
                "probe_cost/trace_seconds",
                "probe_cost/density_seconds",
                "probe_cost/coherence_seconds",
            },
            "gradient samples m, examples per sample b": {
                "gradient/num_samples",
                "gradient/sample_size",
            },
            "Hessian-vector products per probe": {
                "probe_cost/eigenvalue_hvps",
                "probe_cost/trace_hvps",
                "probe_cost/density_hvps",
            },
        },
    }
    # The science first, the cost last; every expected chart and no other.
    assert list(layout) == ["curvature", "gradient", "cost of the probes"]
    margin_title = "Hessian trace ± 2 standard errors"
    for category, charts in expected_multiline.items():
        titles = set(charts) | ({margin_title} if category == "curvature" else set())
        assert set(layout[category]) == titles, category
        for title, intended in charts.items():
            kind, regexes = layout[category][title]
            assert kind == "multiline"
            assert all(r.startswith("^") and r.endswith("$") for r in regexes), regexes
            assert intended <= tags, intended - tags  # the tags are really written
            assert matched(regexes, tags) == intended, title
    kind, band = layout["curvature"][margin_title]
    assert kind == "margin"
    assert band == ("curvature/trace", "curvature/trace_lower", "curvature/trace_upper")
    assert set(band) <= tags
    # Every scalar the monitors wrote is on some chart (the user's own loss excepted).
    shown = set(band)
    for charts in layout.values():
        for kind, regexes in charts.values():
            if kind == "multiline":
                shown |= matched(regexes, tags)
    assert tags - shown == {"train_loss", "epoch"}
    # The chart's threshold is the threshold of the quantity next to it: the logged ratio is
    # that quantity over the threshold, step by step (Adam: λ₁(P⁻¹H), from its first step).
    ratio = dict(scalars["curvature/sharpness_ratio"])
    threshold = dict(scalars["curvature/stability_threshold"])
    value = dict(scalars[compared])
    assert list(ratio) == ([2, 4] if adam else [0, 2, 4])
    for step in ratio:
        assert ratio[step] == pytest.approx(value[step] / threshold[step], rel=1e-6)
    lr = 0.01 if adam else 0.05
    expected_threshold = {
        "sgd": 2 / lr,
        "momentum": 3.8 / lr - 1e-3,
        "adam": 38 / lr,
        "adamw": 38 / lr,
    }[family]
    assert threshold[0] == pytest.approx(expected_threshold, rel=1e-6)
    if adam:  # and not the raw sharpness, three orders of magnitude below 38/lr
        assert "curvature/eigenvalue_1" not in matched(
            layout["curvature"][threshold_title][1], tags
        )


def test_named_monitors_write_apart_and_a_held_out_probe_measures_the_held_out_data(
    tmp_path: Path,
) -> None:
    train, held_out = regression_data(n=32, seed=0), regression_data(n=16, seed=1)
    logger = tb_logger(tmp_path)
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=2, on_train_end=True),
        HessianEigenvalueMonitor(
            every_n_steps=2,
            on_train_end=True,
            name="heldout",
            probe_dataloader=loader(held_out, batch_size=16),
        ),
        GradientCoherenceMonitor(every_n_steps=2),
        GradientCoherenceMonitor(source="accumulation", every_n_steps=3, name="free"),
    ]
    trainer = make_trainer(monitors, logger=logger, max_steps=4, accumulate_grad_batches=2)
    trainer.fit(Net("sgd"), loader(train, batch_size=8))
    events = read_events(logger)
    scalars = tb_scalars(events)
    # Each series has one writer: the steps of its own monitor only, no zigzag.
    assert steps(scalars["curvature/eigenvalue_1"]) == [0, 2, 4]
    assert steps(scalars["curvature/heldout/eigenvalue_1"]) == [0, 2, 4]
    assert steps(scalars["probe_cost/heldout/eigenvalue_hvps"]) == [0, 2, 4]
    assert steps(scalars["gradient/coherence"]) == [0, 2]  # no probe at the end
    assert steps(scalars["gradient/free/coherence"]) == [0, 3]
    assert steps(scalars["probe_cost/free/coherence_seconds"]) == [0, 3]
    # The held-out monitor measured the held-out data: its final value is the sharpness of
    # the final weights on those 16 examples, not on the training probe.
    model = trainer.lightning_module
    on_held_out = hessian_eigenvalues(model, hessian_loss, held_out.tensors, tol=1e-5)
    on_train = hessian_eigenvalues(model, hessian_loss, monitors[0].fixed_probe, tol=1e-5)
    final = scalars["curvature/heldout/eigenvalue_1"][-1][1]
    assert final == pytest.approx(float(on_held_out.eigenvalues[0]), rel=1e-3)
    assert abs(final - float(on_train.eigenvalues[0])) > 1e-2 * final
    assert scalars["curvature/eigenvalue_1"][-1][1] == pytest.approx(
        float(on_train.eigenvalues[0]), rel=1e-3
    )
    # Their charts keep apart too: a category of their own, anchored to their own tags.
    layout = read_layout(events)
    assert {"curvature (heldout)", "gradient (free)"} <= set(layout)
    held_out_charts = layout["curvature (heldout)"]
    for _, regexes in held_out_charts.values():
        assert all(t.startswith("curvature/heldout/") for t in matched(regexes, set(scalars)))
    threshold_chart = held_out_charts["sharpness λ₁ vs. stability threshold 2/η"][1]
    assert matched(threshold_chart, set(scalars)) == {
        "curvature/heldout/eigenvalue_1",
        "curvature/heldout/stability_threshold",
    }
    assert monitors[0].state_key != monitors[1].state_key


@pytest.mark.parametrize("name", ["", "held/out", "two words", 3])
def test_a_name_that_is_not_one_tag_component_is_refused(name: Any) -> None:
    with pytest.raises(MisconfigurationException, match="`name` must be"):
        HessianTraceMonitor(name=name)


# -- max_overhead: no floor but the user's --------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class CheapMonitor(CurvatureMonitor):
    """A probe of 0.01 s on a fake clock (default_every_n_steps is the base's 100)."""

    def __init__(self, clock: Clock, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock = clock

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]):  # type: ignore[no-untyped-def]
        self.clock.now += 0.01
        return Measurement({"probe/value": 1.0})


class StepTime(pl.Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.clock.now += 0.125


@pytest.mark.parametrize(
    ("every_n_steps", "expected"),
    [
        # 0.01 s probes against 0.125 s steps at 25%: ceil(0.01 / (0.25 · 0.125)) = 1, so the
        # budget allows a probe at every step; before, the default 100 steps were the floor.
        ("auto", list(range(12))),
        (None, list(range(12))),
        (4, [0, 4, 8]),  # a floor the user gave is kept
    ],
)
def test_max_overhead_probes_as_often_as_the_budget_allows_unless_every_n_steps_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every_n_steps: Any, expected: list[int]
) -> None:
    clock = Clock()
    monkeypatch.setattr(base, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monitor = CheapMonitor(clock, every_n_steps=every_n_steps, max_overhead=0.25)
    logger = csv_logger(tmp_path)
    trainer = make_trainer([monitor, StepTime(clock)], logger=logger, max_steps=12)
    trainer.fit(Net("sgd"), loader(regression_data(n=96), batch_size=8))
    assert steps(read_csv(logger)["probe/value"]) == expected


def test_auto_cadence_is_the_monitors_default_only_without_another_trigger() -> None:
    assert HessianEigenvalueMonitor().schedule.every_n_steps == 500
    assert HessianTraceMonitor().schedule.every_n_steps == 1000
    assert SpectralDensityMonitor().schedule.every_n_steps == 2000
    assert GradientCoherenceMonitor().schedule.every_n_steps == 500
    assert HessianEigenvalueMonitor(max_overhead=0.05).schedule.every_n_steps is None
    assert HessianEigenvalueMonitor(every_n_epochs=1).schedule.every_n_steps is None
    assert HessianEigenvalueMonitor(on_train_end=True).schedule.every_n_steps == 500
    assert (
        HessianEigenvalueMonitor(every_n_steps=30, max_overhead=0.05).schedule.every_n_steps == 30
    )


# -- BatchNorm, fast_dev_run, the density picture ---------------------------------------------
def test_sharpness_is_probed_with_batch_statistics_by_default_and_the_chart_says_so(
    tmp_path: Path,
) -> None:
    logger = tb_logger(tmp_path)
    monitor = HessianEigenvalueMonitor(every_n_steps=None, on_train_end=True, tol=1e-5)
    trainer = make_trainer([monitor], logger=logger, max_steps=3)
    model = BNDropoutClassifier()
    trainer.fit(model, loader(classification_data(n=48), batch_size=16))
    events = read_events(logger)
    (logged,) = tb_scalars(events)["curvature/eigenvalue_1"]  # the final weights
    probe = monitor.fixed_probe

    def top(mode: str) -> float:
        result = hessian_eigenvalues(model, training_step_loss, probe, tol=1e-5, batch_norm=mode)
        return float(result.eigenvalues[0])

    assert logged[1] == pytest.approx(top("train"), rel=1e-4)
    assert abs(top("train") - top("eval")) > 0.05 * top("train")  # the choice matters here
    titles = set(read_layout(events)["curvature"])
    assert "sharpness λ₁ vs. stability threshold (2+2β)/η [BatchNorm: batch statistics]" in titles


def test_fast_dev_run_warns_once_that_nothing_is_logged() -> None:
    monitors = [HessianTraceMonitor(num_hvps=4, every_n_steps=1), HessianEigenvalueMonitor()]
    trainer = pl.Trainer(
        fast_dev_run=2, callbacks=monitors, enable_progress_bar=False, enable_model_summary=False
    )
    with pytest.warns(UserWarning, match="fast_dev_run") as caught:
        trainer.fit(Net("sgd"), loader(regression_data(n=32), batch_size=8))
    assert sum("fast_dev_run" in str(w.message) for w in caught) == 1
    assert monitors[0].last_metrics  # it still probed


def test_density_image_marks_lambda_max_and_threshold_and_shows_the_outlier() -> None:
    grid = torch.linspace(-1.0, 12.0, 400)
    bulk = torch.exp(-0.5 * (grid / 0.1) ** 2)
    outlier = 1e-5 * torch.exp(-0.5 * ((grid - 10) / 0.1) ** 2)  # 5 decades below the bulk
    image = density_image(
        grid, bulk + outlier, nodes=torch.tensor([0.0, 10.0]),
        markers={"lambda_max": 10.0, "threshold": 11.0},
    )  # fmt: skip
    pixels = (image * 255).round().to(torch.int64)

    def columns_of(color: tuple[int, int, int]) -> set[int]:
        mask = torch.ones(pixels.shape[1:], dtype=torch.bool)
        for channel, value in enumerate(color):
            mask &= pixels[channel] == value
        return set(mask.nonzero()[:, 1].tolist())

    left, plot_w = 78, 720 - 78 - 18
    at = {x: round(left + (x + 1.0) / 13.0 * plot_w) for x in (0.0, 10.0, 11.0)}
    assert any(abs(c - at[10.0]) <= 1 for c in columns_of((200, 30, 30)))  # λ_max, red
    assert any(abs(c - at[11.0]) <= 1 for c in columns_of((230, 120, 0)))  # threshold
    filled = columns_of((170, 198, 238))  # the area under the log-density
    assert any(abs(c - at[10.0]) <= 1 for c in filled)  # the outlier is drawn
