"""A run resumed from a checkpoint probes at the same steps with the same values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from models import (
    LIGHTNING_NOISE,
    TanhRegressor,
    csv_logger,
    loader,
    make_trainer,
    read_csv,
    regression_data,
)

from lightning_curvature import (
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

pytestmark = [*LIGHTNING_NOISE, pytest.mark.filterwarnings("ignore:.*The dirpath has changed.*")]

STEPS = 10


def monitors() -> list[pl.Callback]:
    return [
        HessianEigenvalueMonitor(
            k=2, tol=1e-4, every_n_steps=1, per_layer=["net.2.*"], checkpoint_warm_start=True
        ),
        HessianTraceMonitor(num_hvps=6, every_n_steps=2),  # random probes: generator state
        SpectralDensityMonitor(num_steps=6, every_n_steps=3, on_train_end=True),
    ]


def fit(tmp_path: Path, name: str, ckpt_path: Path | None = None) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    logger = csv_logger(tmp_path, name)
    callbacks = monitors()
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / name / "checkpoints", every_n_train_steps=5, save_top_k=-1
    )
    trainer = make_trainer(
        [*callbacks, checkpoints], logger=logger, max_steps=STEPS, enable_checkpointing=True
    )
    # 5 batches per epoch, in order: the resumed run sees the same data.
    trainer.fit(TanhRegressor(), loader(regression_data(n=40), batch_size=8), ckpt_path=ckpt_path)
    assert trainer.global_step == STEPS
    values = {
        tag: series
        for tag, series in read_csv(logger).items()
        if tag.startswith("curvature/") and not tag.endswith("seconds")
    }
    return {"values": values, "monitors": callbacks, "dir": tmp_path / name / "checkpoints"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return fit(tmp_path_factory.mktemp("resume"), "full")


def _checkpoint_at(run: dict[str, Any], step: int) -> Path:
    (path,) = run["dir"].glob(f"*step={step}.ckpt")
    return path


def test_checkpoint_loads_with_weights_only_and_holds_the_monitor_state(
    uninterrupted: dict[str, Any],
) -> None:
    checkpoint = torch.load(_checkpoint_at(uninterrupted, 5), weights_only=True)
    eigen, trace, density = uninterrupted["monitors"]
    states = checkpoint["callbacks"]
    eigen_state = states[eigen.state_key]
    assert eigen_state["schedule"] == {"next_step": 0, "last_step": 4}
    assert eigen_state["generator"].dtype == torch.uint8
    assert set(eigen_state["warm_start"]) == {"full", "layer:net.2"}
    num_parameters = sum(p.numel() for p in TanhRegressor().parameters())
    assert eigen_state["warm_start"]["full"].shape == (3, num_parameters)  # k = 2, and one
    assert eigen_state["warm_start"]["layer:net.2"].shape == (2, 8 + 1)
    assert states[trace.state_key]["schedule"]["last_step"] == 4
    assert states[density.state_key]["schedule"]["last_step"] == 3
    # Three monitors, three distinct keys.
    assert len({m.state_key for m in uninterrupted["monitors"]}) == 3


def test_resumed_run_probes_at_the_same_steps_with_the_same_values(
    tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    resumed = fit(tmp_path, "resumed", ckpt_path=_checkpoint_at(uninterrupted, 5))
    full = uninterrupted["values"]
    assert set(resumed["values"]) == set(full)
    for tag, series in resumed["values"].items():
        after = [(step, value) for step, value in full[tag] if step >= 5]
        assert [s for s, _ in series] == [s for s, _ in after], tag
        assert [s for s, _ in series] != []
        for (_, value), (_, expected) in zip(series, after, strict=True):
            assert value == pytest.approx(expected, rel=1e-6, abs=1e-9), tag
    assert [s for s, _ in resumed["values"]["curvature/density_max"]] == [6, 9, 10]


def test_without_the_monitor_state_the_resumed_values_would_differ(
    tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    """Control: the comparison above depends on the restored generator and warm start."""
    checkpoint = torch.load(_checkpoint_at(uninterrupted, 5), weights_only=True)
    for monitor in uninterrupted["monitors"]:
        del checkpoint["callbacks"][monitor.state_key]
    stripped = tmp_path / "stripped.ckpt"
    torch.save(checkpoint, stripped)
    resumed = fit(tmp_path, "stripped", ckpt_path=stripped)
    full = uninterrupted["values"]["curvature/trace"]
    after = [value for step, value in full if step >= 5]
    values = [value for _, value in resumed["values"]["curvature/trace"]]
    assert len(values) == len(after)
    assert values != pytest.approx(after, rel=1e-6)


def test_monitors_of_one_class_that_measure_different_things_checkpoint_side_by_side(
    tmp_path: Path,
) -> None:
    """Lightning refuses two stateful callbacks with one state_key: the key must tell apart
    monitors that differ in anything they measure, not only in their cadence."""
    held_out = loader(regression_data(n=16, seed=3), batch_size=16)
    eigen = [
        HessianEigenvalueMonitor(k=1, every_n_steps=1, checkpoint_warm_start=True),
        HessianEigenvalueMonitor(k=2, every_n_steps=1, checkpoint_warm_start=True),
        HessianEigenvalueMonitor(k=1, every_n_steps=1, batch_norm="eval"),
        HessianEigenvalueMonitor(k=1, every_n_steps=1, probe_dataloader=held_out),
    ]
    others = [
        HessianTraceMonitor(num_hvps=4, every_n_steps=1),
        HessianTraceMonitor(num_hvps=8, every_n_steps=1),
        SpectralDensityMonitor(num_steps=4, every_n_steps=1),
        SpectralDensityMonitor(num_steps=6, every_n_steps=1),
        GradientCoherenceMonitor(every_n_steps=1),
        GradientCoherenceMonitor(every_n_steps=1, mode="micro_batch", micro_batch_size=2),
    ]
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(
        [*eigen, *others, checkpoints],
        logger=csv_logger(tmp_path),
        max_steps=2,
        enable_checkpointing=True,
    )
    trainer.fit(TanhRegressor(), loader(regression_data(n=32), batch_size=8))
    (path,) = tmp_path.glob("*step=2.ckpt")
    states = torch.load(path, weights_only=True)["callbacks"]
    assert len({m.state_key for m in [*eigen, *others]}) == 10
    assert states[eigen[0].state_key]["warm_start"]["full"].shape[0] == 2  # k + 1
    assert states[eigen[1].state_key]["warm_start"]["full"].shape[0] == 3
    # the held-out monitor measured another batch than the training-probe one
    assert eigen[3].last_metrics["curvature/eigenvalue_1"] != pytest.approx(
        eigen[0].last_metrics["curvature/eigenvalue_1"], rel=1e-3
    )
