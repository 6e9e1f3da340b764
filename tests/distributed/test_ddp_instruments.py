"""DDP on CPU (2 processes, gloo): batch sharpness, update sharpness, the gradient's share
and SAM's curvature are the same on every rank, and those of the union batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from launch import run_script

from lightning_curvature import batch_sharpness, directional_curvature
from lightning_curvature.functional.model.batches import BatchList

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("ddp_instruments_script.py")


def _without_timing(values: dict) -> dict:
    return {
        m: {k: v for k, v in tags.items() if not k.endswith("seconds")}
        for m, tags in values.items()
    }


def test_every_rank_logs_the_instruments_of_the_union_batches(tmp_path: Path) -> None:
    run_script(SCRIPT, tmp_path, "values")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert _without_timing(ranks[0]["values"]) == _without_timing(ranks[1]["values"])
    logged = ranks[0]["values"]
    assert "sam/curvature" in logged["SAM"]
    assert 0 <= logged["HessianEigenvalueMonitor"]["curvature/gradient_top_share"] <= 1

    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_monitor_script import Regressor

    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    def union(key: str, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.cat([s[key][i][j] for s in saved]) for j in (0, 1))

    model = Regressor()
    model.load_state_dict(saved[0]["weights"][2])  # the weights the step-2 probes saw
    loss_fn = lambda m, b: Regressor.training_step(m, b, 0)  # noqa: E731
    # each sample of batch sharpness is the union of the ranks' i-th batches
    exact = batch_sharpness(model, loss_fn, [union("sharpness_probe", i) for i in range(3)])
    values = logged["BatchSharpnessMonitor"]
    assert values["curvature/batch_sharpness"] == pytest.approx(float(exact.estimate), rel=1e-5)
    assert values["curvature/batch_sharpness_std_error"] == pytest.approx(
        float(exact.std_error), rel=1e-4
    )
    before = Regressor()
    before.load_state_dict(saved[0]["weights"][1])
    pairs = zip(model.parameters(), before.parameters(), strict=True)
    update = torch.cat([(p - q).detach().reshape(-1) for p, q in pairs])
    along = directional_curvature(model, loss_fn, BatchList([union("eigen_probe", 0)]), update)
    assert logged["HessianEigenvalueMonitor"]["curvature/update_sharpness"] == pytest.approx(
        float(along.value), rel=1e-5
    )
