"""Two-process Fabric loops on CPU (gloo): DDP and FSDP2 (``ModelParallelStrategy``).

Both ranks finish with the same values, which are those of the union of the ranks' probe
batches computed on one process, and training with the monitors ends at the weights of
training without them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_curvature import hessian_eigenvalues, hessian_trace, spectral_density
from lightning_curvature.functional.linalg.sampling import make_generator
from tests.distributed.launch import run_script

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("fabric_distributed_script.py")
sys.path.insert(0, str(SCRIPT.parent))
from fabric_distributed_script import loss_fn, make_net  # noqa: E402


def _run(tmp_path: Path, mode: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    run_script(SCRIPT, tmp_path, mode, timeout=300)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return reports, saved


def _without_timing(values: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        m: {k: v for k, v in tags.items() if not k.endswith("seconds")}
        for m, tags in values.items()
    }


def _union(saved: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    assert not torch.equal(saved[0]["probe"][0][0], saved[1]["probe"][0][0])  # own shards
    return tuple(torch.cat([s["probe"][0][i] for s in saved]) for i in (0, 1))


def _net_at(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = make_net()
    net.load_state_dict(weights)
    return net


def _check_common(reports: list[dict[str, Any]], saved: list[dict[str, Any]]) -> None:
    assert [r["world_size"] for r in reports] == [2, 2]
    assert _without_timing(reports[0]["values"]) == _without_timing(reports[1]["values"])
    assert set(reports[0]["last_step"].values()) == {2}  # probed at steps 0 and 2 of 3
    for rank in saved:  # harmless: training without the monitors ends at the same weights
        for name, value in rank["final"].items():
            assert torch.equal(value, rank["final_without_monitors"][name]), name
        assert not torch.equal(rank["final"]["0.weight"], rank["weights"][0]["0.weight"])


def test_ddp_ranks_log_the_values_of_the_union_batch(tmp_path: Path) -> None:
    reports, saved = _run(tmp_path, "ddp")
    _check_common(reports, saved)
    union = _union(saved)
    logged = reports[0]["values"]
    at = {step: _net_at(saved[0]["weights"][step]) for step in (0, 2)}

    eig = hessian_eigenvalues(at[2], loss_fn, union, k=2, tol=1e-5, batch_norm="train")
    for i in range(2):
        assert logged["HessianEigenvalueMonitor"][f"curvature/eigenvalue_{i + 1}"] == (
            pytest.approx(float(eig.eigenvalues[i]), rel=1e-5)
        )
    assert logged["HessianEigenvalueMonitor"]["curvature/stability_threshold"] == 2 / 0.1

    # The trace and density draw from each monitor's generator: replay its two probes.
    generator = make_generator(torch.device("cpu"))
    for step in (0, 2):
        trace = hessian_trace(at[step], loss_fn, union, 8, generator=generator, batch_norm="eval")
    assert logged["HessianTraceMonitor"]["curvature/trace"] == pytest.approx(
        float(trace.estimate), rel=1e-5
    )
    assert logged["HessianTraceMonitor"]["curvature/trace_std_error"] == pytest.approx(
        float(trace.std_error), rel=1e-4
    )
    generator = make_generator(torch.device("cpu"))
    for step in (0, 2):
        esd = spectral_density(at[step], loss_fn, union, 6, generator=generator)
    assert logged["SpectralDensityMonitor"]["curvature/density_max"] == pytest.approx(
        float(esd.nodes.max()), rel=1e-5
    )


def test_fsdp2_ranks_log_the_hessian_of_the_unsharded_model_on_the_union(tmp_path: Path) -> None:
    reports, saved = _run(tmp_path, "fsdp2")
    _check_common(reports, saved)
    union = _union(saved)
    weights = saved[0]["weights"][2]
    for name, value in weights.items():  # every rank gathered the same full weights
        assert torch.equal(value, saved[1]["weights"][2][name])
    net = _net_at({n: w.double() for n, w in weights.items()}).double()
    names = [n for n, _ in net.named_parameters()]

    def loss(*params: torch.Tensor) -> torch.Tensor:
        state = dict(zip(names, params, strict=True))
        return loss_fn(
            lambda x: torch.func.functional_call(net, state, (x,)),  # type: ignore[arg-type]
            tuple(t.double() for t in union),  # type: ignore[arg-type]
        )

    params = tuple(p.detach() for p in net.parameters())
    blocks = torch.func.hessian(loss, argnums=tuple(range(len(params))))(*params)
    sizes = [p.numel() for p in params]
    rows = zip(blocks, sizes, strict=True)
    hessian = torch.cat([torch.cat([b.reshape(r, -1) for b in row], dim=1) for row, r in rows])
    eigenvalues = torch.linalg.eigvalsh(hessian)
    logged = reports[0]["values"]
    top = float(eigenvalues[-1])
    assert logged["HessianEigenvalueMonitor"]["curvature/eigenvalue_1"] == pytest.approx(
        top, rel=1e-3
    )
    assert logged["HessianEigenvalueMonitor"]["curvature/eigenvalue_2"] == pytest.approx(
        float(eigenvalues[-2]), rel=1e-3
    )
    trace = logged["HessianTraceMonitor"]
    assert trace["curvature/trace_std_error"] > 0
    assert (
        abs(trace["curvature/trace"] - float(hessian.trace()))
        <= 3 * trace["curvature/trace_std_error"]
    )
    density = logged["SpectralDensityMonitor"]
    assert density["curvature/density_max"] == pytest.approx(top, rel=1e-2)
    assert float(eigenvalues[0]) - 1e-3 * top <= density["curvature/density_min"]
