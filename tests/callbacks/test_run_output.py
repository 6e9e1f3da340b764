"""What a user reads of a run: a line per probe, the table at the end, the files, the figure.

One run of five monitors (SGD with momentum on a small tanh regressor, a TensorBoard and a
CSV logger at once) is written by the monitors; every number the lines, the table, the
reader and the figure show is checked against the values the loggers hold.
"""

from __future__ import annotations

import io
import logging
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from models import (
    LIGHTNING_NOISE,
    TanhRegressor,
    csv_logger,
    loader,
    make_trainer,
    read_events,
    regression_data,
    tb_logger,
)
from PIL import Image

from lightning_curvature import (
    BatchSharpnessMonitor,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
    find_runs,
    read_run,
)
from lightning_curvature.callbacks.reporting.progress import LOGGER, format_value
from lightning_curvature.callbacks.reporting.summary import SeriesSummary

pytestmark = LIGHTNING_NOISE

STEPS = 12


class Lines(logging.Handler):
    """Every record of the ``lightning_curvature`` logger, as the user reads it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path = tmp_path_factory.mktemp("run")
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=3, on_train_end=True),
        HessianTraceMonitor(num_hvps=4, every_n_steps=4),
        SpectralDensityMonitor(num_steps=6, num_points=20, every_n_steps=6),
        GradientCoherenceMonitor(every_n_steps=2),
        BatchSharpnessMonitor(num_batches=2, every_n_steps=3),
    ]
    loggers = [tb_logger(tmp_path), csv_logger(tmp_path)]
    lines = Lines()
    LOGGER.addHandler(lines)
    try:
        trainer = make_trainer(monitors, logger=loggers, max_steps=STEPS)
        trainer.fit(TanhRegressor(), loader(regression_data(n=64), batch_size=8, shuffle=True))
    finally:
        LOGGER.removeHandler(lines)
    for logger in loggers:
        logger.save()
    loggers[0].experiment.flush()
    return {"monitors": monitors, "loggers": loggers, "lines": lines, "root": tmp_path}


# -- the reader ------------------------------------------------------------------------------------
def test_the_reader_returns_what_each_logger_holds(run: dict[str, Any]) -> None:
    tensorboard, csv = (read_run(logger.log_dir) for logger in run["loggers"])
    assert set(tensorboard.scalars) == set(csv.scalars)
    for monitor in run["monitors"]:
        for tag, logged in monitor.report.history.series.items():
            steps = [step for step, _ in logged]
            values = [value for _, value in logged]
            assert csv.scalars[tag].steps == tuple(steps), tag
            assert csv.scalars[tag].values == pytest.approx(values, rel=1e-12), tag
            assert tensorboard.scalars[tag].steps == tuple(steps), tag
            assert tensorboard.scalars[tag].values == pytest.approx(values, rel=1e-6), tag
    assert tensorboard.scalars["curvature/eigenvalue_1"].steps == (0, 3, 6, 9, STEPS)
    assert "train_loss" not in tensorboard.scalars
    assert "train_loss" in read_run(run["loggers"][1].log_dir, all_tags=True).scalars


def test_the_reader_returns_the_densities_as_they_were_measured(run: dict[str, Any]) -> None:
    snapshots = read_run(run["loggers"][0].log_dir).densities["curvature/spectral_density"]
    density = run["monitors"][2]
    assert [s.step for s in snapshots] == [0, 6]
    last = snapshots[-1]
    spacing = last.grid[1] - last.grid[0]
    assert sum(last.density) * spacing == pytest.approx(1.0, rel=1e-6)  # a density
    grid, expected = density.last_density.density(num_points=20)
    assert last.grid == pytest.approx(grid.tolist(), rel=1e-5, abs=1e-6)
    normalised = expected / (expected.sum() * spacing)
    assert last.density == pytest.approx(normalised.tolist(), rel=1e-4, abs=1e-9)
    num_parameters = 5 * 8 + 8 + 8 + 1  # counted on the grid: within its coarseness
    assert last.count == pytest.approx(float(expected.sum()) * spacing * num_parameters, rel=1e-5)


def test_find_runs_finds_every_run_below_a_folder(run: dict[str, Any]) -> None:
    runs = find_runs(run["root"])
    assert [r.label(run["root"]) for r in runs] == ["csv/version_0", "tb/version_0"]
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        read_run(run["root"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_runs(run["root"] / "missing")


# -- a line per probe, a table at the end --------------------------------------------------------
def test_each_probe_says_one_line_with_the_values_it_logged(run: dict[str, Any]) -> None:
    lines = run["lines"].at(logging.INFO)
    eigen = [line for line in lines if line.startswith("HessianEigenvalueMonitor step ")]
    history = run["monitors"][0].report.history.series
    assert len(eigen) == len(history["curvature/eigenvalue_1"]) == 5
    for line, (step, value) in zip(eigen, history["curvature/eigenvalue_1"], strict=True):
        assert line.startswith(f"HessianEigenvalueMonitor step {step}/{STEPS}: ")
        assert f"eigenvalue_1={format_value(value)}" in line
        assert re.search(r"\(\d+ HVPs, [\d.e-]+ s; its probes [\d.]+% of the fit so far\)$", line)
    coherence = [line for line in lines if line.startswith("GradientCoherenceMonitor step ")]
    assert len(coherence) == 6  # steps 0, 2, …, 10; no HVPs counted
    assert "HVPs" not in coherence[0]
    assert not run["lines"].at(logging.WARNING)  # fixed cadences: no budget to fall short of


def test_the_table_at_the_end_of_fit_shows_the_logged_numbers(run: dict[str, Any]) -> None:
    tables = [line for line in run["lines"].at(logging.INFO) if line.startswith("Curvature ")]
    assert len(tables) == 1  # one table, the first monitor's, for all of them
    table = tables[0].splitlines()
    scalars = read_run(run["loggers"][0].log_dir).scalars
    for monitor in run["monitors"]:
        history = monitor.report.history
        (head,) = [i for i, line in enumerate(table) if line.startswith(f"{history.owner}:")]
        probes, seconds = re.search(r": (\d+) probes, ([\d.e-]+) s, ", table[head]).groups()
        cost = scalars[f"probe_cost/{monitor.cost_name}_seconds"]
        assert int(probes) == history.probes == len(cost)
        assert float(seconds) == pytest.approx(sum(cost.values), rel=1e-2)
        summaries = history.summary()
        assert summaries  # every monitor logged something
        for offset, (tag, summary) in enumerate(summaries.items(), start=2):
            logged = scalars[tag]
            from_file = SeriesSummary.of(list(zip(logged.steps, logged.values, strict=True)))
            assert (summary.points, summary.first_step, summary.last_step) == (
                from_file.points, from_file.first_step, from_file.last_step
            )  # fmt: skip
            fields = ("first", "last", "min", "max")
            for field in fields:
                assert getattr(summary, field) == pytest.approx(getattr(from_file, field), rel=1e-6)
            row = table[head + offset].split()
            assert row[0] == tag
            expected = [format_value(getattr(summary, field)) for field in fields]
            assert row[1:] == [*expected, str(summary.points)]
    share = re.search(r"([\d.]+)% of the fit's ([\d.]+) s", table[1])
    assert share is not None
    assert 0 < float(share.group(1)) < 100


def test_adams_first_step_without_a_ratio_is_said_once(tmp_path: Path) -> None:
    lines = Lines()
    LOGGER.addHandler(lines)
    try:
        monitor = HessianEigenvalueMonitor(every_n_steps=2)
        make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=5).fit(
            TanhRegressor(optimizer="adam", lr=0.01), loader(regression_data(), 8)
        )
    finally:
        LOGGER.removeHandler(lines)
    notes = [line for line in lines.at(logging.INFO) if "no preconditioner" in line]
    assert notes == [
        "HessianEigenvalueMonitor: step 0: Adam has no preconditioner before its first step: "
        "λ₁(P⁻¹H), the ratio at the next probe."
    ]
    series = monitor.report.history.series
    assert [s for s, _ in series["curvature/stability_threshold"]] == [0, 2, 4]
    assert [s for s, _ in series["curvature/sharpness_ratio"]] == [2, 4]


def test_progress_lines_can_be_turned_off(tmp_path: Path) -> None:
    lines = Lines()
    LOGGER.addHandler(lines)
    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)
    try:
        monitor = HessianTraceMonitor(num_hvps=2, every_n_steps=1)
        make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=2).fit(
            TanhRegressor(), loader(regression_data(), 8)
        )
    finally:
        LOGGER.setLevel(level)
        LOGGER.removeHandler(lines)
    assert lines.records == []
    assert monitor.report.history.probes == 2  # measured and logged all the same


def test_a_run_too_short_for_the_budget_says_so_once_per_monitor(tmp_path: Path) -> None:
    lines = Lines()
    LOGGER.addHandler(lines)
    try:
        monitors = [HessianTraceMonitor(), SpectralDensityMonitor()]  # the defaults
        logger = tb_logger(tmp_path)
        make_trainer(monitors, logger=logger, max_steps=30).fit(
            TanhRegressor(), loader(regression_data(), 8)
        )
    finally:
        LOGGER.removeHandler(lines)
    warnings = lines.at(logging.WARNING)
    assert len(warnings) == 2
    notes = read_events(logger).Tensors("curvature/notes/text_summary")
    said = [note.tensor_proto.string_val[0].decode() for note in notes]
    assert said == warnings  # the dashboard says why its charts are empty
    assert warnings[0].startswith("HessianTraceMonitor: this run of 30 steps is too short")
    # 32 products (80 gradients) a probe, 2.5% of 30 steps: none fits, so none is made
    assert (
        "costs up to about 80 training steps (estimated from its products), so it gets 0"
        in (warnings[0])
    )
    assert "every_n_steps=3 (about +2667% time)" in warnings[0]
    assert all(m.report.history.probes == 0 for m in monitors)


# -- the headline as a picture in TensorBoard ------------------------------------------------------
def test_the_sharpness_picture_is_redrawn_at_every_eigenvalue_probe(run: dict[str, Any]) -> None:
    events = read_events(run["loggers"][0])
    images = events.Images("curvature/sharpness_chart")
    assert [image.step for image in images] == [0, 3, 6, 9, STEPS]
    with Image.open(io.BytesIO(images[-1].encoded_image_string)) as picture:
        assert picture.size == (720, 360)
        colors = {color for _, color in picture.convert("RGB").getcolors(maxcolors=1 << 16)}
    # λ₁ (blue), the batch sharpness of the monitor beside it (green), the threshold (orange)
    assert {(31, 90, 180), (20, 140, 60), (230, 120, 0)} <= colors


def test_the_pictures_lines_are_the_logged_values_with_gaps() -> None:
    from lightning_curvature.callbacks.reporting.summary import ProbeHistory
    from lightning_curvature.callbacks.sharpness_picture import sharpness_lines

    history = ProbeHistory("HessianEigenvalueMonitor")
    for step, ratio_logged in ((0, False), (5, True), (10, True)):  # Adam: nothing at step 0
        values = {"curvature/eigenvalue_1": 1.0 + step, "curvature/stability_threshold": 38e3}
        if ratio_logged:
            values["curvature/preconditioned_eigenvalue_1"] = 100.0 * step
        history.record(step, {**values, "probe_cost/eigenvalue_seconds": 0.1}, seconds=0.1)
    adam, threshold = sharpness_lines(history, str, "eigenvalue")
    assert adam.label == "lambda_1 of inv(P) H (Adam)"
    assert adam.points[1:] == [(5, 500.0), (10, 1000.0)]
    assert adam.points[0][0] == 0
    assert math.isnan(adam.points[0][1])  # a gap, not a line from nowhere
    assert threshold.dashed
    assert threshold.points == [(0, 38e3), (5, 38e3), (10, 38e3)]


# -- the figure ----------------------------------------------------------------------------------
def test_the_figure_draws_what_the_files_hold(run: dict[str, Any]) -> None:
    pytest.importorskip("matplotlib")
    from lightning_curvature.plot import plot_runs

    tensorboard, csv = (read_run(logger.log_dir) for logger in run["loggers"])
    figure = plot_runs([tensorboard, csv], ["tb", "csv"], title="a test run")
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == [
        "sharpness vs. stability threshold",
        "sharpness / stability threshold",
        "Hessian trace ± 2 standard errors",
        "gradient coherence (m-coherence)",
        "noise scale B_simple = tr Σ / ‖G‖² (examples)",
        "spectral density (first and last probe)",
    ]
    sharpness = figure.axes[0]
    assert sharpness.get_yscale() == "log"
    (first,) = [line for line in sharpness.get_lines() if line.get_marker() == "o"][:1]
    x, y = first.get_data()
    eigenvalue = tensorboard.scalars["curvature/eigenvalue_1"]
    assert list(x) == list(eigenvalue.steps)
    assert list(y) == pytest.approx(eigenvalue.values)
    legend = [text.get_text() for text in sharpness.get_legend().get_texts()]
    assert legend == ["λ₁ (Hessian)", "batch sharpness", "stability threshold"]
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["tb", "csv"]
    for ax in figure.axes[:5]:
        assert ax.get_xlabel() == "optimizer step"


def test_the_plot_command_writes_a_figure_of_several_runs(run: dict[str, Any]) -> None:
    pytest.importorskip("matplotlib")
    output = run["root"] / "figure.pdf"
    done = subprocess.run(
        [sys.executable, "-m", "lightning_curvature.plot", str(run["root"]), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote {output} (2 run(s))" in done.stdout
    assert output.read_bytes().startswith(b"%PDF")
    assert output.stat().st_size > 10_000


def test_the_plot_command_takes_labels_one_per_run(run: dict[str, Any]) -> None:
    pytest.importorskip("matplotlib")
    from lightning_curvature.plot import main

    output = run["root"] / "figure.png"
    assert main([str(run["root"]), "-o", str(output), "--labels", "csv", "tensorboard"]) == output
    assert output.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit, match="2"):
        main([str(run["root"]), "-o", str(output), "--labels", "one"])


def test_gaps_are_not_bridged() -> None:
    from lightning_curvature.plot import with_gaps
    from lightning_curvature.reader import Series

    # the noise scale left out at step 20 (its ‖G‖² estimate was not positive)
    x, y = with_gaps(Series((0, 10, 30), (5.0, 6.0, 7.0)), probed=[0, 10, 20, 30])
    assert x == [0, 10, 20, 30]
    assert math.isnan(y[2])
