"""A checkpoint written before the package moved into folders (commit 8e73fee) still loads:
the resumed run logs, after step 5, exactly what the run that wrote it logged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from models import LIGHTNING_NOISE
from old_checkpoint_run import fit

pytestmark = [*LIGHTNING_NOISE, pytest.mark.filterwarnings("ignore:.*The dirpath has changed.*")]

DATA = Path(__file__).parent.parent / "data"


def test_a_checkpoint_of_the_old_layout_loads_with_weights_only() -> None:
    states = torch.load(DATA / "monitors_8e73fee.ckpt", weights_only=True)["callbacks"]
    assert sum(key.startswith("Hessian") for key in states) == 2


def test_resuming_from_it_logs_what_the_old_run_logged(tmp_path: Path) -> None:
    checkpoint = tmp_path / "old.ckpt"
    shutil.copy(DATA / "monitors_8e73fee.ckpt", checkpoint)
    logged = json.loads((DATA / "monitors_8e73fee.json").read_text())
    expected = {tag: series for tag, series in logged.items() if series}  # noise_scale: < 0
    resumed = fit(tmp_path, "resumed", ckpt_path=checkpoint)["values"]
    assert set(resumed) == set(expected)
    assert len(expected) >= 12
    for tag, series in resumed.items():
        assert [s for s, _ in series] == [s for s, _ in expected[tag]], tag
        values = [v for _, v in series]
        assert values == pytest.approx([v for _, v in expected[tag]], rel=1e-6, abs=1e-9), tag
