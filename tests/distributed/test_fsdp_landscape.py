"""FSDP2 on CPU (2 processes, gloo, ModelParallelStrategy + fully_shard): loss slices and
critical sharpness over shards are those of the unsharded model on the union batch, the same
on every rank, and training with the monitors is bit for bit training without them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import run_script

from lightning_curvature import critical_sharpness, directional_curvature, loss_slice
from lightning_curvature.functional.model.batches import BatchList
from lightning_curvature.functional.optimizer_update import next_update

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("fsdp_landscape_script.py")
sys.path.insert(0, str(SCRIPT.parent))
from fsdp_landscape_script import MOMENTUM, OFFSETS  # noqa: E402
from fsdp_script import LR, loss_of, make_net  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp_landscape")
    run_script(SCRIPT, out, "", timeout=400)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    saved = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return {"reports": reports, "saved": saved}


def _net(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = make_net()
    net.load_state_dict(weights)
    return net


def _union(saved: list[dict[str, Any]], monitor: int) -> BatchList:
    (first,), (second,) = (s["probe"][monitor] for s in saved)
    assert not torch.equal(first[0], second[0])  # each rank probes its own batch
    return BatchList([tuple(torch.cat([a, b]) for a, b in zip(first, second, strict=True))])


def _flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in weights.values()])


def _loss_at(net: torch.nn.Module, batch: BatchList, flat: torch.Tensor) -> float:
    """The loss of the unsharded model at the flat weights ``flat`` (float32, as training)."""
    pieces = torch.split(flat, [p.numel() for p in net.parameters()])
    params = {
        name: piece.view(p.shape)
        for (name, p), piece in zip(net.named_parameters(), pieces, strict=True)
    }
    (x, y) = batch[0]
    with torch.no_grad():
        out = torch.func.functional_call(net, params, (x,)).squeeze(-1)
    return float((out - y).pow(2).mean())


def test_every_rank_logs_the_same_values_and_training_is_unchanged(run: dict[str, Any]) -> None:
    def without_timing(values: dict) -> dict:
        return {m: {k: v for k, v in t.items() if "seconds" not in k} for m, t in values.items()}

    first, second = (r["values"] for r in run["reports"])
    assert without_timing(first) == without_timing(second)
    assert "landscape/secant_curvature_update" in first["LossLandscapeMonitor"]
    assert "curvature/critical_sharpness" in first["CriticalSharpnessMonitor"]
    for rank in run["saved"]:
        for name, value in rank["final"].items():
            assert torch.equal(value, rank["final_without_monitors"][name]), name
            assert torch.equal(value, rank["after_functional"][name]), name  # put back exactly
        assert not torch.equal(rank["final"]["0.weight"], rank["weights"][0]["0.weight"])


def test_the_slices_logged_are_the_unsharded_models_on_the_union_batch(
    run: dict[str, Any],
) -> None:
    """The step-2 probe: the points along the last update ``u`` recomputed by forward passes
    of the unsharded model; the curvatures against the exact Hessian (finite differences
    over shards: 1e-3)."""
    saved, logged = run["saved"], run["reports"][0]["values"]["LossLandscapeMonitor"]
    batch = _union(saved, 0)
    before, weights = saved[0]["weights"][1], saved[0]["weights"][2]
    net = _net(weights)
    w = _flat(weights)
    u = w - _flat(before)
    center, ahead, behind = (_loss_at(net, batch, w + t * u) for t in (0.0, 1.0, -1.0))
    squared = float(u.double() @ u.double())
    secant = (ahead + behind - 2 * center) / squared
    # float32 losses near 1.9: a few 1e-7 each, over a second difference of 5e-3
    assert logged["landscape/step_loss_change_update"] == pytest.approx(ahead - center, abs=2e-6)
    assert logged["landscape/secant_curvature_update"] == pytest.approx(secant, rel=1e-4)
    along = directional_curvature(net, loss_of, batch, u)
    assert logged["landscape/curvature_update"] == pytest.approx(float(along.value), rel=1e-3)

    # Along the top eigenvector, in lengths of the next SGD-with-momentum step (its momentum
    # buffers read from their shards): the secant over ±h, h = lr·‖u_next‖.
    flat = _flat(weights).double()
    hessian = torch.func.hessian(lambda f: _loss_of_flat(net, batch, f))(flat)
    values, vectors = torch.linalg.eigh(hessian)
    assert logged["landscape/curvature_1"] == pytest.approx(float(values[-1]), rel=1e-3)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    for name, p in net.named_parameters():
        optimizer.state[p]["momentum_buffer"] = saved[0]["momentum"][2][name]
    gradient = torch.func.grad(lambda f: _loss_of_flat(net, batch, f))(w)
    found = next_update(optimizer, list(net.parameters()), gradient)
    assert found is not None
    h = float(found.step.double().norm())
    v = vectors[:, -1].float()
    around = [_loss_at(net, batch, w + t * h * v) for t in (1.0, -1.0)]
    assert logged["landscape/secant_curvature_1"] == pytest.approx(
        (sum(around) - 2 * center) / h**2, rel=2e-3
    )


def _loss_of_flat(net: torch.nn.Module, batch: BatchList, flat: torch.Tensor) -> torch.Tensor:
    pieces = torch.split(flat, [p.numel() for p in net.parameters()])
    params = {
        name: piece.view(p.shape)
        for (name, p), piece in zip(net.named_parameters(), pieces, strict=True)
    }
    x, y = (t.to(flat.dtype) for t in batch[0])
    return loss_of(lambda z: torch.func.functional_call(net, params, (z,)), (x, y))


def test_critical_sharpness_logged_is_the_unsharded_models(run: dict[str, Any]) -> None:
    saved, logged = run["saved"], run["reports"][0]["values"]["CriticalSharpnessMonitor"]
    net = _net(saved[0]["weights"][2])
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    for name, p in net.named_parameters():
        optimizer.state[p]["momentum_buffer"] = saved[0]["momentum"][2][name]
    parameters = list(net.parameters())

    def rule(gradient: torch.Tensor) -> torch.Tensor:
        found = next_update(optimizer, parameters, gradient)
        assert found is not None
        return found.update

    exact = critical_sharpness(net, loss_of, _union(saved, 1), rule, init=LR, rtol=1e-5)
    # the monitor's bracket is rtol=1e-4 wide, the reference's 1e-5
    assert logged["curvature/critical_sharpness"] == pytest.approx(float(exact.value), rel=2e-4)


def test_functional_slices_over_shards_equal_the_single_process_ones(run: dict[str, Any]) -> None:
    """``loss_slice`` and ``critical_sharpness`` on the sharded model, each rank passing its
    shards of two full directions and its half of the batch, against one process with the
    whole model, the whole directions and the union batch."""
    saved = run["saved"]
    assert saved[0]["slice"].keys() == saved[1]["slice"].keys()
    for key, value in saved[0]["slice"].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(saved[1]["slice"][key])), key
    net = _net(saved[0]["final"])
    x, y = saved[0]["union"]
    whole = loss_slice(net, loss_of, (x, y), saved[0]["directions"], OFFSETS)
    sharded = saved[0]["slice"]
    torch.testing.assert_close(sharded["losses"], whole.losses, rtol=0, atol=2e-6)
    torch.testing.assert_close(sharded["loss"], whole.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(sharded["slopes"], whole.slopes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sharded["squared_norms"], whole.squared_norms, rtol=1e-6, atol=0)
    torch.testing.assert_close(sharded["hessian_form"], whole.hessian_form, rtol=0, atol=5e-4)
    assert sharded["num_forwards"] == whole.num_forwards
    for rank in saved:  # a point whose loss is not finite is kept, on every rank, not raised
        assert float(rank["far"][0, 0]) == pytest.approx(float(whole.loss), abs=1e-6)
        assert not bool(torch.isfinite(rank["far"][0, 1]))

    critical = saved[0]["critical"]
    for key, value in critical.items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(saved[1]["critical"][key]))
    alone = critical_sharpness(net, loss_of, (x, y), lambda g: g, init=0.1, rtol=1e-4)
    assert critical["converged"]
    assert alone.converged
    assert float(critical["value"]) == pytest.approx(float(alone.value), rel=2e-4)
    assert float(critical["slope"]) == pytest.approx(float(alone.slope), rel=1e-5)
