"""FSDP2 on CPU (2 processes, gloo): rank 1 alone fails, outside FSDP's own collectives.

What the agreement covers under ``ModelParallelStrategy`` + ``fully_shard`` (see
``docs/ARCHITECTURE.md``): failures before a sharded module's forward, between its
products' collectives, in the loss, and at the top of SAM's second pass. One run covers five
of them (``fsdp_faults_script.FAULTS``); the unequal probe sizes of the eigenvalue monitor
(8 and 3 examples) check the union batch's λ₁ under FSDP2 too.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from launch import run_script

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("fsdp_faults_script.py")
sys.path.insert(0, str(SCRIPT.parent))
from fsdp_faults_script import FAULTS, MAX_STEPS, loss_of, make_net  # noqa: E402

TAGS = {
    "HessianEigenvalueMonitor": "curvature/eigenvalue_1",
    "HessianTraceMonitor": "curvature/trace",
    "SpectralDensityMonitor": "curvature/density_max",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp_faults")
    run_script(SCRIPT, out, "", timeout=400)  # a hang fails here
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_every_rank_skips_together_one_warning_per_fault_naming_rank_1(
    run: tuple[Path, list[dict]],
) -> None:
    out, ranks = run
    then = {"SAM": "the optimizer steps with the plain gradient, as without SAM"}
    expected = [
        f"{who}: skipped {'the SAM part' if who == 'SAM' else 'the probe'} at step {step} "
        f"(rank 1 raised {what}); {then.get(who, 'training goes on')}."
        for step, (what, who) in FAULTS.items()
    ]
    assert ranks[0]["warnings"] == expected
    with (out / "faults" / "version_0" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for monitor, tag in TAGS.items():
        skipped = {step for step, (_, who) in FAULTS.items() if who == monitor}
        logged = [int(row["step"]) for row in rows if row.get(tag)]
        assert logged == [s for s in range(MAX_STEPS) if s not in skipped], monitor
    for rank in ranks:
        assert rank["last_probe"] == [MAX_STEPS - 1] * 3


def test_weights_are_equal_across_ranks_and_to_the_run_without_monitors(
    run: tuple[Path, list[dict]],
) -> None:
    _, ranks = run
    for name, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][name]), name
        for rank in ranks:
            assert torch.equal(rank["final"][name], rank["final_without_monitors"][name]), name


def _top_eigenvalue(weights: dict[str, torch.Tensor], batches: list, shares: list[float]) -> float:
    """λ₁ of ``Σ share_i H_i`` (dense, float64), ``H_i`` the Hessian of batch ``i``'s mean loss."""
    net = make_net().double()
    names = list(weights)
    flat = torch.cat([weights[n].reshape(-1).double() for n in names])

    def loss(point: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(point, [weights[n].numel() for n in names])
        params = {n: p.view(weights[n].shape) for n, p in zip(names, pieces, strict=True)}
        call = lambda x: torch.func.functional_call(net, params, (x,))  # noqa: E731
        return sum(  # type: ignore[return-value]
            s * loss_of(call, tuple(t.double() for t in b))
            for s, b in zip(shares, batches, strict=True)
        )

    return float(torch.linalg.eigvalsh(torch.func.hessian(loss)(flat))[-1])


def test_unequal_probe_sizes_give_the_union_batch_under_fsdp2(run: tuple[Path, list[dict]]) -> None:
    _, ranks = run
    batches = [tuple(rank["probe"][0]) for rank in ranks]
    sizes = [b[0].shape[0] for b in batches]
    assert sizes == [8, 3]
    union = _top_eigenvalue(ranks[0]["initial"], batches, [n / sum(sizes) for n in sizes])
    equal = _top_eigenvalue(ranks[0]["initial"], batches, [0.5, 0.5])
    logged = ranks[0]["eigenvalue_1"]
    assert logged == ranks[1]["eigenvalue_1"]
    assert logged == pytest.approx(union, rel=1e-3)  # finite differences in float32
    assert abs(equal - union) > 10 * 1e-3 * union  # the equal-weight mean is 1.7 % away
