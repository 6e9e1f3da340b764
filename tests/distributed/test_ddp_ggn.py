"""DDP on CPU (2 processes, gloo) with curvature="ggn": every rank logs the GGN of the union."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from launch import run_script

from lightning_curvature import hessian_eigenvalues, hessian_trace
from lightning_curvature.functional.linalg.sampling import make_generator

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("ddp_monitor_script.py")


def test_every_rank_logs_the_ggn_of_the_union_batch(tmp_path: Path) -> None:
    run_script(SCRIPT, tmp_path, "ggn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["values"] for r in (0, 1)]
    for values in ranks:
        for tags in values.values():
            for tag in [t for t in tags if t.endswith("seconds")]:
                del tags[tag]
    assert ranks[0] == ranks[1]  # bit-identical

    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_monitor_script import SPLIT, Regressor

    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(saved[0]["probe"][0][0], saved[1]["probe"][0][0])  # different shards
    union = tuple(torch.cat([s["probe"][0][i] for s in saved]) for i in (0, 1))
    model = Regressor()
    model.load_state_dict(saved[0]["weights"])
    cpu = torch.device("cpu")
    eig = hessian_eigenvalues(
        model, SPLIT, union, k=2, tol=1e-5, curvature="ggn", generator=make_generator(cpu)
    )
    logged = ranks[0]["HessianEigenvalueMonitor"]
    for i in range(2):
        assert logged[f"curvature/ggn_eigenvalue_{i + 1}"] == pytest.approx(
            float(eig.eigenvalues[i]), rel=1e-5
        )
    trace = hessian_trace(model, SPLIT, union, 8, curvature="ggn", generator=make_generator(cpu))
    assert ranks[0]["HessianTraceMonitor"]["curvature/ggn_trace"] == pytest.approx(
        float(trace.estimate), rel=1e-5
    )
