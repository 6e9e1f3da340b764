"""The examples run as a user runs them, and print the conclusion they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, tmp_path: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--log-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_edge_of_stability_sharpens_to_the_threshold_and_hovers(tmp_path: Path) -> None:
    out = _run("edge_of_stability.py", tmp_path)
    found = re.search(
        r"started at ([\d.]+), reached the edge at step (\d+) and then stayed within "
        r"\[([\d.]+), ([\d.]+)\]",
        out,
    )
    assert found, out
    start, _, low, high = (float(g) for g in found.groups())
    assert start < 0.7
    assert 0.85 <= low <= high <= 1.2
    assert list(tmp_path.glob("edge_of_stability/version_0/events.out.tfevents.*"))
