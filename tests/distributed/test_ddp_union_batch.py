"""DDP with unequal probe sizes: every quantity is the union batch's, each rank weighted by
its share of the examples (not the equal-weight mean of the ranks' Hessians)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("ddp_union_script.py")
sys.path.insert(0, str(SCRIPT.parent))
from ddp_union_script import SPLITS, Regressor  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("union")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        for name in SPLITS
    }


def _without_timing(logged: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {m: {k: v for k, v in t.items() if not k.endswith("seconds")} for m, t in logged.items()}


def _union(batches: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))


def _loss_and_point(weights: dict[str, torch.Tensor], batch):  # type: ignore[no-untyped-def]
    model = Regressor()
    names = [n for n, _ in model.named_parameters()]
    shapes = [weights[n].shape for n in names]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, [s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        x, y = batch
        return (
            (torch.func.functional_call(model.net, _strip(params), (x,)).squeeze(-1) - y)
            .pow(2)
            .mean()
        )

    return loss, torch.cat([weights[n].reshape(-1) for n in names])


def _strip(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n.removeprefix("net."): p for n, p in params.items()}


def _exact(weights: dict[str, torch.Tensor], batch) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The union batch's gradient and Hessian, dense, float64."""
    loss, point = _loss_and_point(weights, batch)
    return torch.func.grad(loss)(point), torch.func.hessian(loss)(point)


@pytest.mark.parametrize("split", list(SPLITS))
def test_unequal_probe_sizes_give_the_union_batch_values(
    runs: dict[str, list[dict]], split: str
) -> None:
    ranks = runs[split]
    assert [b[0].shape[0] for r in ranks for b in r["probe"]] == [
        SPLITS[split][0][0],
        SPLITS[split][1][0],
    ]
    assert _without_timing(ranks[0]["logged"]) == _without_timing(ranks[1]["logged"])
    weights = ranks[0]["weights"]
    logged = ranks[0]["logged"]

    _, hessian = _exact(weights, _union([r["probe"][0] for r in ranks]))
    top = float(torch.linalg.eigvalsh(hessian)[-1])
    eig = logged["HessianEigenvalueMonitor"]["curvature/eigenvalue_1"]
    trace = logged["HessianTraceMonitor"]["curvature/trace"]
    assert eig == pytest.approx(top, rel=1e-4), f"λ₁ {(eig - top) / top:+.2%} off"
    exact_trace = float(hessian.trace())
    assert trace == pytest.approx(exact_trace, rel=1e-4), (
        f"trace {(trace - exact_trace) / exact_trace:+.2%} off"
    )

    quotients = []
    for i in range(2):
        g, h = _exact(weights, _union([r["sharpness_batches"][i] for r in ranks]))
        quotients.append(float(g @ h @ g / (g @ g)))
    expected = sum(quotients) / 2
    sharpness = logged["BatchSharpnessMonitor"]["curvature/batch_sharpness"]
    assert sharpness == pytest.approx(expected, rel=1e-4), (
        f"batch sharpness {(sharpness - expected) / expected:+.2%} off"
    )
