"""Critical sharpness along AdamW's next update under FSDP2 is the unsharded run's."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from launch import run_script

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("fsdp_adam_script.py")


def _logged(out: Path, mode: str) -> dict[int, float]:
    run_script(SCRIPT, out, mode, timeout=300)
    with open(out / mode / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    return {
        int(row["step"]): float(row["curvature/critical_sharpness"])
        for row in rows
        if row.get("curvature/critical_sharpness")
    }


def test_adamw_critical_sharpness_over_shards_is_the_unsharded_one(tmp_path: Path) -> None:
    single, sharded = _logged(tmp_path, "single"), _logged(tmp_path, "fsdp")
    assert sorted(single) == sorted(sharded) == [0, 1, 2, 3]  # step 0: Adam with no state yet
    for step, value in single.items():
        assert sharded[step] == pytest.approx(value, rel=1e-5), step
    assert len({round(v, 6) for v in single.values()}) == 4  # the state moves the update
