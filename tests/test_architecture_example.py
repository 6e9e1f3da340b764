"""The monitor of docs/ARCHITECTURE.md runs as written and logs the exact mean eigenvalue.

Its model's loss ``½ mean_b ‖w ⊙ x_b‖²`` has the diagonal Hessian ``diag(mean_b x_b²)``,
whatever ``w``: Hutchinson's Rademacher estimate ``zᵀHz = Σ H_ii z_i²`` is then exact, so
the logged ``tr(H) / n`` must equal the dense Hessian's up to float32 rounding.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"
BLOCKS = re.findall(r"```python\n(.*?)```", ARCHITECTURE.read_text(), flags=re.DOTALL)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    (code,) = BLOCKS  # the one example of the page
    namespace: dict[str, Any] = {"__name__": "__architecture__"}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("architecture"))
        exec(compile(code, str(ARCHITECTURE), "exec"), namespace)
        namespace["csv"] = Path("logs/lightning_logs/version_0/metrics.csv").read_text()
    return namespace


def test_the_example_logs_the_dense_hessians_mean_eigenvalue(example: dict[str, Any]) -> None:
    monitor = example["monitor"]
    (probe,) = monitor.fixed_probe  # one fixed probe batch of 16 examples
    assert probe.shape == (16, 4)
    model = example["Scaled"]()
    weights = model.w.detach().clone()
    dense = torch.func.hessian(lambda w: 0.5 * (w * probe).pow(2).sum(dim=1).mean())(weights)
    assert torch.equal(dense, torch.diag(torch.diagonal(dense)))  # diagonal, so exact
    expected = float(torch.trace(dense)) / 4
    logged = monitor.last_metrics
    # float32: the trace is a sum of 4 products of 16-term means (rounding ~1e-7 relative)
    assert logged["curvature/mean_eigenvalue"] == pytest.approx(expected, rel=1e-6)
    assert logged["probe_cost/mean_curvature_hvps"] == 8.0
    assert set(logged) == {
        "curvature/mean_eigenvalue",
        "probe_cost/mean_curvature_hvps",
        "probe_cost/mean_curvature_seconds",
    }


def test_the_example_probes_every_step_and_writes_to_its_logger(example: dict[str, Any]) -> None:
    assert example["trainer"].global_step == 3
    assert example["monitor"].schedule.last_step == 2  # steps 0, 1, 2
    header, *rows = example["csv"].splitlines()
    column = header.split(",").index("curvature/mean_eigenvalue")
    step = header.split(",").index("step")
    probed = [int(row.split(",")[step]) for row in rows if row.split(",")[column]]
    assert probed == [0, 1, 2]
