"""DDP on CPU (2 processes, gloo): rank 1 alone fails in probes, and every rank skips them.

One run covers six faults at six steps (``ddp_faults_script.FAULTS``): an exception in rank
1's eval-mode forward, one inside its third Hessian-vector product (mid-Lanczos), an
out-of-memory error, a failure of the coherence probe's per-example gradients, and in SAM's
second pass an exception and a NaN loss at w + ε. On main the first fault aborts gloo
("collective mismatch").
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from launch import run_script

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("ddp_faults_script.py")
sys.path.insert(0, str(SCRIPT.parent))
from ddp_faults_script import FAULTS, MAX_STEPS  # noqa: E402

#: one tag each monitor logs at every probe that runs
TAGS = {
    "HessianEigenvalueMonitor": "curvature/eigenvalue_1",
    "HessianTraceMonitor": "curvature/trace",
    "SpectralDensityMonitor": "curvature/density_max",
    "GradientCoherenceMonitor": "gradient/coherence",
    "BatchSharpnessMonitor": "curvature/batch_sharpness",
    "TrainingGradientCoherenceMonitor": "gradient/ddp/coherence",
}


def _logged_steps(path: Path) -> dict[str, list[int]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {tag: [int(r["step"]) for r in rows if r.get(tag)] for tag in TAGS.values()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("faults")
    run_script(SCRIPT, out, "", timeout=300)  # a hang fails here, after 300 s
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_one_warning_per_fault_names_rank_1_the_step_and_the_exception(
    run: tuple[Path, list[dict]],
) -> None:
    _, ranks = run
    then = {"SAM": "the optimizer steps with the plain gradient, as without SAM"}
    expected = [
        f"{who}: skipped {'the SAM part' if who == 'SAM' else 'the probe'} at step {step} "
        f"(rank 1 raised {what}); {then.get(who, 'training goes on')}."
        for step, (what, who) in FAULTS.items()
    ]
    assert ranks[0]["warnings"] == expected
    assert ranks[1]["warnings"] == []  # rank zero says them
    assert [rank["sam"] for rank in ranks] == [(MAX_STEPS - 2, 2)] * 2  # SAM steps, skipped


def test_every_other_probe_is_logged_and_later_probes_run(run: tuple[Path, list[dict]]) -> None:
    out, ranks = run
    logged = _logged_steps(out / "faults" / "version_0" / "metrics.csv")
    for monitor, tag in TAGS.items():
        skipped = {step for step, (_, failed) in FAULTS.items() if failed == monitor}
        assert logged[tag] == [s for s in range(MAX_STEPS) if s not in skipped], monitor
    for rank in ranks:
        assert set(rank["probed_steps"].values()) == {MAX_STEPS - 1}


def test_weights_are_equal_across_ranks_and_to_training_without_monitors(
    run: tuple[Path, list[dict]],
) -> None:
    _, ranks = run
    for name, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][name]), name
        for rank in ranks:
            assert torch.equal(rank["final"][name], rank["final_without_monitors"][name]), name
