"""DDP on CPU (2 processes, gloo): the slices and the critical sharpness are those of the
union batch, the same on every rank, and training is bit-for-bit training without them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from launch import run_script

from lightning_curvature import critical_sharpness, directional_curvature
from lightning_curvature.functional.model.batches import BatchList
from lightning_curvature.functional.optimizer_update import next_update

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("ddp_landscape_script.py")


def _without_timing(values: dict) -> dict:
    return {
        m: {k: v for k, v in tags.items() if not k.endswith("seconds")}
        for m, tags in values.items()
    }


def test_every_rank_logs_the_union_batch_and_training_is_unchanged(tmp_path: Path) -> None:
    run_script(SCRIPT, tmp_path / "with", "with")
    run_script(SCRIPT, tmp_path / "without", "without")
    ranks = [json.loads((tmp_path / "with" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert _without_timing(ranks[0]["values"]) == _without_timing(ranks[1]["values"])
    saved = [torch.load(tmp_path / "with" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in (0, 1):
        alone = torch.load(tmp_path / "without" / f"rank{r}.pt", weights_only=True)
        for key, value in alone["final"].items():
            assert torch.equal(saved[r]["final"][key], value), key  # bit-identical training

    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_monitor_script import Regressor

    def union(monitor: int) -> BatchList:
        (first,), (second,) = (s["probe"][monitor] for s in saved)
        assert not torch.equal(first[0], second[0])  # each rank probes its own batch
        return BatchList([tuple(torch.cat([a, b]) for a, b in zip(first, second, strict=True))])

    model, before = Regressor(), Regressor()
    model.load_state_dict(saved[0]["weights"][2])  # the weights the step-2 probes saw
    before.load_state_dict(saved[0]["weights"][1])
    loss_fn = lambda m, b: Regressor.training_step(m, b, 0)  # noqa: E731
    logged = ranks[0]["values"]

    pairs = zip(model.parameters(), before.parameters(), strict=True)
    update = torch.cat([(p - q).detach().reshape(-1) for p, q in pairs])
    along = directional_curvature(model, loss_fn, union(0), update, batch_norm="train")
    assert logged["LossLandscapeMonitor"]["landscape/curvature_update"] == pytest.approx(
        float(along.value), rel=1e-4
    )

    optimizer = model.configure_optimizers()
    optimizer.load_state_dict(saved[0]["optimizer"])
    parameters = list(model.parameters())

    def rule(gradient: torch.Tensor) -> torch.Tensor:
        found = next_update(optimizer, parameters, gradient)
        assert found is not None
        return found.update

    exact = critical_sharpness(model, loss_fn, union(1), rule, init=0.1, rtol=1e-5)
    assert logged["CriticalSharpnessMonitor"]["curvature/critical_sharpness"] == pytest.approx(
        float(exact.value), rel=2e-4
    )
