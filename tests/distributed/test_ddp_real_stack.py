"""DDP on CPU (2 processes, gloo) on the real-stack module, and SAM per replica with unused
parameters that differ between the ranks."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import run_script

sys.path.insert(0, str(Path(__file__).parents[1] / "callbacks"))
from models import assert_identical

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("ddp_real_stack_script.py")


def _run(out: Path, mode: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    run_script(SCRIPT, out, mode)
    return [
        (
            json.loads((out / f"{mode}_rank{r}.json").read_text()),
            torch.load(out / f"{mode}_rank{r}.pt", weights_only=True),
        )
        for r in (0, 1)
    ]


def _logged(out: Path, mode: str) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    with open(out / mode / "version_0" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key != "step" and value:
                    found.setdefault(key, []).append((int(row["step"]), float(value)))
    return found


def test_every_monitor_under_ddp_leaves_every_rank_bit_identical(tmp_path: Path) -> None:
    without = _run(tmp_path, "without")
    with_monitors = _run(tmp_path, "with")
    for (_, plain), (report, monitored) in zip(without, with_monitors, strict=True):
        assert_identical(monitored, plain)
        # only the warmup's lr 0 at step 0 (on rank zero, which warns)
        assert all("learning rate is 0 at step 0" in m for m in report["warnings"])
    assert any(report["warnings"] for report, _ in with_monitors)
    logged = _logged(tmp_path, "with")
    for tag in ("curvature/eigenvalue_1", "curvature/trace", "curvature/density_max"):
        assert [step for step, _ in logged[tag]] == [0, 2, 4, 6], tag
        assert all(math.isfinite(value) for _, value in logged[tag]), tag
    # One sample per rank (micro_batch_size=None): alone each rank has too few, pooled they
    # have the 2 the statistics need, at every probe.
    assert [value for _, value in logged["gradient/num_samples"]] == [2.0] * 4
    assert all(math.isfinite(value) for _, value in logged["gradient/coherence"])
    last = [report["last"]["GradientCoherenceMonitor"] for report, _ in with_monitors]
    assert last[0]["gradient/coherence"] == last[1]["gradient/coherence"]


def test_sam_per_replica_with_different_unused_parameters_on_each_rank(tmp_path: Path) -> None:
    """Rank 0 reaches head ``a`` only, rank 1 head ``b`` only (same shapes): each head's SAM
    gradient is averaged with the other rank's zeros, not with the other head's gradient."""
    ranks = _run(tmp_path, "sam_unused")
    finals = [state["final"] for _, state in ranks]
    initial = ranks[0][1]["initial"]
    for name, value in finals[0].items():
        assert torch.equal(value, finals[1][name]), name  # the ranks did not drift apart
        assert not torch.equal(value, initial[name]), name  # every head was trained
    assert all(not report["warnings"] for report, _ in ranks)
    assert ranks[0][0]["last"]["SAM"]["sam/perturbation_norm"] == pytest.approx(0.1)
