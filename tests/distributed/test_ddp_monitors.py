"""DDP on CPU (2 processes, gloo): every rank gets the single-process values of the union."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from launch import run_script

from lightning_curvature import hessian_eigenvalues, hessian_trace, spectral_density
from lightning_curvature.functional.linalg.sampling import make_generator

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("ddp_monitor_script.py")


def _without_timing(values: dict) -> dict:
    return {
        m: {k: v for k, v in tags.items() if not k.endswith("seconds")}
        for m, tags in values.items()
    }


def _run(tmp_path: Path, mode: str) -> list[dict]:
    run_script(SCRIPT, tmp_path, mode)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_every_rank_logs_the_values_of_the_union_batch(tmp_path: Path) -> None:
    ranks = _run(tmp_path, "values")
    assert _without_timing(ranks[0]["values"]) == _without_timing(
        ranks[1]["values"]
    )  # bit-identical

    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_monitor_script import Regressor

    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(saved[0]["probe"][0][0], saved[1]["probe"][0][0])  # different shards
    union = tuple(torch.cat([s["probe"][0][i] for s in saved]) for i in (0, 1))
    model = Regressor()
    model.load_state_dict(saved[0]["weights"])
    loss_fn = lambda m, b: Regressor.training_step(m, b, 0)  # noqa: E731

    logged = ranks[0]["values"]
    eig = hessian_eigenvalues(
        model, loss_fn, union, k=2, tol=1e-5, generator=make_generator(torch.device("cpu"))
    )
    eig_logged = logged["HessianEigenvalueMonitor"]
    for i in range(2):
        assert eig_logged[f"curvature/eigenvalue_{i + 1}"] == pytest.approx(
            float(eig.eigenvalues[i]), rel=1e-5
        )
    assert eig_logged["curvature/stability_threshold"] == pytest.approx(3.0 / 0.1)

    trace = hessian_trace(model, loss_fn, union, 8, generator=make_generator(torch.device("cpu")))
    trace_logged = logged["HessianTraceMonitor"]
    assert trace_logged["curvature/trace"] == pytest.approx(float(trace.estimate), rel=1e-5)
    assert trace_logged["curvature/trace_std_error"] == pytest.approx(
        float(trace.std_error), rel=1e-4
    )

    esd = spectral_density(model, loss_fn, union, 10, generator=make_generator(torch.device("cpu")))
    assert logged["SpectralDensityMonitor"]["curvature/density_max"] == pytest.approx(
        float(esd.nodes.max()), rel=1e-5
    )


def test_nan_on_one_rank_skips_the_probe_on_all_ranks_without_hanging(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        ranks = _run(tmp_path, "nan_on_rank_1")
    for rank in ranks:
        # the step-0 probe was skipped everywhere, the step-1 probe ran everywhere
        assert all(step == 1 for step in rank["last_step"].values())
        assert rank["values"]["HessianEigenvalueMonitor"]["curvature/eigenvalue_1"] > 0
    assert _without_timing(ranks[0]["values"]) == _without_timing(ranks[1]["values"])
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    steps = [
        row.split(",")[header.index("step")]
        for row in metrics[1:]
        if row.split(",")[header.index("curvature/eigenvalue_1")]
    ]
    assert steps == ["1"]
