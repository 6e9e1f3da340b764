"""FSDP2 on CPU (2 processes, gloo, ModelParallelStrategy + fully_shard): the monitors measure
the Hessian of the unsharded model, leave training unchanged, and SAM is the unsharded SAM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from launch import run_script

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("fsdp_script.py")
sys.path.insert(0, str(SCRIPT.parent))
from fsdp_script import LR, MAX_STEPS, RHO, loss_of, make_net  # noqa: E402


def _without_timing(values: dict) -> dict:
    return {
        m: {k: v for k, v in tags.items() if not k.endswith("seconds")}
        for m, tags in values.items()
    }


def _loss_of_flat(weights: dict[str, torch.Tensor], batch, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    net = make_net().to(dtype)
    names = list(weights)
    shapes = [weights[n].shape for n in names]
    batch = tuple(t.to(dtype) for t in batch)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, [s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        return loss_of(lambda x: torch.func.functional_call(net, params, (x,)), batch)

    flat = torch.cat([weights[n].reshape(-1).to(dtype) for n in names])
    return loss, flat


def _dense_hessian(weights: dict[str, torch.Tensor], batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The exact Hessian of the unsharded model on ``batch``, in float64."""
    loss, flat = _loss_of_flat(weights, batch, torch.float64)
    return torch.func.hessian(loss)(flat)


@pytest.mark.parametrize("mode", ["monitors", "bounded"])
def test_monitors_under_fsdp2_measure_the_unsharded_hessian(tmp_path: Path, mode: str) -> None:
    """``bounded``: every basis held to a few rows (thick restarts for the top 2, two-row SLQ),
    as on a model above ``FULL_BASIS_ENTRIES``: the same checks, λ₂ too."""
    run_script(SCRIPT, tmp_path, mode, timeout=300)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert _without_timing(reports[0]["values"]) == _without_timing(reports[1]["values"])
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # The probes on the two ranks differ (each its own data shard); the monitors measure the
    # Hessian of the mean loss over both, i.e. over their union (equal sizes).
    assert not torch.equal(saved[0]["probe"][0][0], saved[1]["probe"][0][0])
    union = tuple(torch.cat([s["probe"][0][i] for s in saved]) for i in (0, 1))
    step = reports[0]["last_step"]["HessianEigenvalueMonitor"]
    assert step == 2  # probed at steps 0 and 2 of 3: between training steps too
    weights = saved[0]["weights"][step]
    for name, value in weights.items():
        assert torch.equal(value, saved[1]["weights"][step][name])
    hessian = _dense_hessian(weights, union)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    logged = reports[0]["values"]

    top = float(eigenvalues[-1])
    assert logged["HessianEigenvalueMonitor"]["curvature/eigenvalue_1"] == pytest.approx(
        top, rel=1e-3
    )
    restarts = reports[0]["restarts"]
    assert (len(restarts) > 0) == (mode == "bounded")  # the bounded bases did restart
    if mode == "bounded":
        assert logged["HessianEigenvalueMonitor"]["curvature/eigenvalue_2"] == pytest.approx(
            float(eigenvalues[-2]), rel=1e-3
        )
    trace = logged["HessianTraceMonitor"]
    error = trace["curvature/trace_std_error"]
    assert 0 < error < float("inf")
    assert abs(trace["curvature/trace"] - float(hessian.trace())) <= 3 * error
    # Ritz values lie inside the spectrum (up to the products' rounding).
    density = logged["SpectralDensityMonitor"]
    margin = 1e-3 * top
    assert float(eigenvalues[0]) - margin <= density["curvature/density_min"]
    assert density["curvature/density_max"] <= top + margin
    assert density["curvature/density_max"] == pytest.approx(top, rel=1e-2)  # 6 steps: edge

    # Harmless: the same sharded training without the monitors ends at the same weights.
    for rank in saved:
        for name, value in rank["final"].items():
            assert torch.equal(value, rank["final_without_monitors"][name]), name
        assert not torch.equal(rank["final"]["0.weight"], weights["0.weight"])  # it trained


def _unflat(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    pieces = torch.split(flat, [t.numel() for t in like.values()])
    return [p.view(t.shape) for p, t in zip(pieces, like.values(), strict=True)]


def _hand_written_sam(  # type: ignore[no-untyped-def]
    weights: dict[str, torch.Tensor], steps, local_norm: bool, curvatures: list[float] | None = None
) -> dict[str, torch.Tensor]:
    """SAM with SGD on the unsharded model over the union of the ranks' batches.

    ``local_norm``: the trap, each rank normalising its own shard (rows split as FSDP2's
    ``torch.chunk`` along dim 0) by its local norm. ``curvatures`` receives each step's
    ``(g_SAM − g)·ε/‖ε‖²``.
    """
    w = {n: t.clone() for n, t in weights.items()}
    for batch in steps:
        loss, flat = _loss_of_flat(w, batch, torch.float32)
        names = list(w)
        g = _unflat(torch.func.grad(loss)(flat), w)
        if local_norm:
            eps = []
            chunks = [torch.chunk(t, 2, dim=0) for t in g]
            norms = [
                torch.stack([c[r].norm() for c in chunks if len(c) > r]).norm() for r in (0, 1)
            ]
            for c in chunks:
                eps.append(torch.cat([c[r] * (RHO / norms[r]) for r in range(len(c))]))
        else:
            total = torch.stack([t.norm() for t in g]).norm()
            eps = [t * (RHO / total) for t in g]
        moved = flat + torch.cat([e.reshape(-1) for e in eps])
        g_sam = _unflat(torch.func.grad(loss)(moved), w)
        if curvatures is not None:
            e = torch.cat([t.reshape(-1) for t in eps]).double()
            change = torch.cat([(s - t).reshape(-1) for s, t in zip(g_sam, g, strict=True)])
            curvatures.append(float(change.double() @ e / (e @ e)))
        w = {n: w[n] - LR * s for n, s in zip(names, g_sam, strict=True)}
    return w


def test_sam_under_fsdp2_is_sam_of_the_unsharded_model(tmp_path: Path) -> None:
    run_script(SCRIPT, tmp_path, "sam", timeout=300)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert saved[0]["sam_steps"] == saved[1]["sam_steps"] == MAX_STEPS
    steps = [
        tuple(torch.cat([s["batches"][i][j] for s in saved]) for j in (0, 1))
        for i in range(MAX_STEPS)
    ]
    curvatures: list[float] = []
    reference = _hand_written_sam(
        saved[0]["initial"], steps, local_norm=False, curvatures=curvatures
    )
    trap = _hand_written_sam(saved[0]["initial"], steps, local_norm=True)
    # float32, three steps: the sharded run sums the gradient over ranks and its norm over
    # shards in another order (a few ulps per step, weights of order 0.3), so 1e-6 absolute.
    # The local-norm trap moves the weights by more than 1e-4: the test tells them apart.
    moved = max(float((trap[n] - reference[n]).abs().max()) for n in reference)
    assert moved > 1e-4
    for rank in saved:
        for name, value in rank["final"].items():
            torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6)
    # Logged at step 0 (log_every_n_steps=50): the same on both ranks, the unsharded values.
    # sam/curvature is a difference quotient of float32 gradients over ‖ε‖ = ρ: ~eps/ρ·‖g‖.
    logged = [rank["metrics"] for rank in saved]
    assert logged[0] == logged[1]
    assert logged[0]["sam/perturbation_norm"] == pytest.approx(RHO, rel=1e-5)
    assert logged[0]["sam/curvature"] == pytest.approx(curvatures[0], rel=1e-3, abs=1e-4)


def test_a_kink_under_fsdp2_is_skipped_on_every_rank_with_one_warning(tmp_path: Path) -> None:
    """Finite differences are the only backend over shards: top-2 routing at a tie on every
    rank's probe fails the self-check on both ranks together (their inner products are
    summed over shards), so no value is logged, training finishes, and rank zero says why
    once per monitor, naming the routing's top-k."""
    run_script(SCRIPT, tmp_path, "kink", timeout=300)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["steps"] == MAX_STEPS
        for values in report["values"].values():
            assert not any(tag.startswith("curvature/") for tag in values), values
    said = reports[0]["warnings"]
    assert len(said) == 3, said  # one per monitor
    assert all("TopkBackward0" in message and "self-check" in message for message in said)
    assert reports[1]["warnings"] == []  # only rank zero writes
