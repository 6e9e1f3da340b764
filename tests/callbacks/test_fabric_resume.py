"""Saved and loaded mid-run through ``fabric.save``/``fabric.load``, a loop probes on as before.

The schedule's position, the eigenvalue monitor's warm starts (stored: it opts in with
``checkpoint_warm_start=True``) and every monitor's generator travel in the state Fabric
saves, so the first probe after loading (and every later one) equals the uninterrupted
run's, bit for bit; without that state it does not.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from fabric_loops import TanhNet, fit, make_fabric, mse, regression_data
from torch.utils.data import DataLoader

from lightning_curvature import (
    FabricMonitors,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

STEPS = 10
SAVED_AT = 5  # one epoch of 5 batches, in order: the resumed loop sees the same data


def monitors() -> list[Any]:
    return [
        # warm-started: steps 0, 2, 4, the warm starts in the checkpoint
        HessianEigenvalueMonitor(k=2, tol=1e-4, every_n_steps=2, checkpoint_warm_start=True),
        HessianTraceMonitor(num_hvps=6, every_n_steps=3),  # random probes: generator state
        SpectralDensityMonitor(num_steps=6, every_n_steps=3, on_train_end=True),
    ]


def run(log_dir: Path, stop: int, checkpoint: Path | None = None, restore: bool = True) -> Any:
    """Train to ``stop`` steps (from ``checkpoint`` if given); return the logged probes."""
    fabric = make_fabric(log_dir)
    fabric.seed_everything(0, verbose=False)
    net = TanhNet()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5))
    loader = fabric.setup_dataloaders(DataLoader(regression_data(n=40), batch_size=8))
    curvature = FabricMonitors(fabric, model, optimizer, monitors(), loss_fn=mse, probe_data=loader)
    state: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "curvature": curvature,
        "loop": {"step_count": 0, "iter_num": 0},
    }
    if checkpoint is not None:
        if not restore:
            del state["curvature"]  # the control: the monitors start anew
        fabric.load(checkpoint, state)
    loop = state["loop"]
    fit(
        fabric,
        model,
        optimizer,
        loader,
        mse,
        stop,
        curvature=curvature,
        state=loop,
        end=stop == STEPS,
    )
    if stop == SAVED_AT:
        fabric.save(log_dir / "mid.ckpt", state)
    fabric.logger.finalize("success")
    with open(fabric.logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {
        (int(row["step"]), tag): float(value)
        for row in rows
        for tag, value in row.items()
        if (tag.startswith("curvature/") or tag.endswith("_hvps")) and value
    }, net


def test_the_first_probe_after_fabric_load_is_the_uninterrupted_runs(tmp_path: Path) -> None:
    uninterrupted, final = run(tmp_path / "whole", STEPS)
    first_half, _ = run(tmp_path / "first", SAVED_AT)
    checkpoint = tmp_path / "first" / "mid.ckpt"
    resumed, resumed_final = run(tmp_path / "second", STEPS, checkpoint)

    assert {k: v for k, v in uninterrupted.items() if k[0] < SAVED_AT} == first_half
    assert {k: v for k, v in uninterrupted.items() if k[0] >= SAVED_AT} == resumed
    steps = sorted({step for step, _ in resumed})
    assert steps == [6, 8, 9, 10]  # the first probe after loading is step 6, the last 10
    assert resumed[(6, "curvature/eigenvalue_1")] == uninterrupted[(6, "curvature/eigenvalue_1")]
    for name, value in final.state_dict().items():
        assert torch.equal(value, resumed_final.state_dict()[name]), name

    # What was saved: plain tensors (weights_only loads it), the warm start among them.
    saved = torch.load(checkpoint, weights_only=True)["curvature"]
    (eigen,) = [state for key, state in saved.items() if key.startswith("HessianEigenvalue")]
    assert eigen["schedule"] == {"next_step": 0, "last_step": 4}
    assert eigen["warm_start"]["full"].shape == (3, 57)  # k + 1 Ritz vectors of 57 weights

    # The control: loaded without the monitors' state, the first probes differ.
    fresh, _ = run(tmp_path / "fresh", STEPS, checkpoint, restore=False)
    assert fresh[(6, "curvature/trace")] != uninterrupted[(6, "curvature/trace")]
    hvps = (6, "probe_cost/eigenvalue_hvps")
    assert fresh[hvps] > uninterrupted[hvps]  # a cold start takes more products


def test_a_checkpoint_state_no_monitor_claims_is_named_in_one_warning(tmp_path: Path) -> None:
    fabric = make_fabric(tmp_path)
    net = TanhNet()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    loader = DataLoader(regression_data(), batch_size=8)
    eigen = HessianEigenvalueMonitor(every_n_steps=2)
    curvature = FabricMonitors(fabric, model, optimizer, [eigen], loss_fn=mse, probe_data=loader)
    state = {eigen.state_key: {"schedule": {"next_step": 0, "last_step": 6}}, "Gone{}": {}}
    with pytest.warns(UserWarning, match=r"not restored: \['Gone\{\}'\]"):
        curvature.load_state_dict(state)
    assert eigen.schedule.last_step == 6
