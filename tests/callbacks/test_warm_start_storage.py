"""Where the eigenvalue monitor keeps its warm start: on the host, and out of checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import models
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_curvature import HessianEigenvalueMonitor

DIRPATH_NOISE = pytest.mark.filterwarnings("ignore:.*The dirpath has changed.*")
pytestmark = [*models.LIGHTNING_NOISE, DIRPATH_NOISE]

STEPS, TOL = 8, 1e-4


def fit(tmp_path: Path, name: str, ckpt_path: Path | None = None, **options: Any) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    monitor = HessianEigenvalueMonitor(k=2, tol=TOL, every_n_steps=1, **options)
    logger = models.csv_logger(tmp_path, name)
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / name / "checkpoints", every_n_train_steps=4, save_top_k=-1
    )
    trainer = models.make_trainer(
        [monitor, checkpoints], logger=logger, max_steps=STEPS, enable_checkpointing=True
    )
    module = models.TanhRegressor()
    data = models.loader(models.regression_data(n=32), batch_size=8)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    logged = models.read_csv(logger)
    return {
        "top": logged["curvature/eigenvalue_1"],
        "hvps": logged["probe_cost/eigenvalue_hvps"],
        "monitor": monitor,
        "weights": [p.detach().clone() for p in module.parameters()],
        "dir": tmp_path / name / "checkpoints",
    }


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Warm starts on the model's device and in checkpoints (opted in)."""
    return fit(tmp_path_factory.mktemp("warm"), "default", checkpoint_warm_start=True)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"warm_start_device": "cuda"}, "warm_start_device"),
        ({"checkpoint_warm_start": 1}, "checkpoint_warm_start"),
    ],
    ids=["device", "checkpoint"],
)
def test_bad_options_name_the_argument(options: dict[str, Any], name: str) -> None:
    with pytest.raises(MisconfigurationException, match=f"`{name}` must be"):
        HessianEigenvalueMonitor(**options)


def test_host_warm_start_logs_the_same_values(tmp_path: Path, default_run: dict[str, Any]) -> None:
    host = fit(tmp_path, "host", warm_start_device="cpu", checkpoint_warm_start=True)
    assert host["top"] == default_run["top"]  # the same floats, step by step
    assert host["hvps"] == default_run["hvps"]
    assert all(
        torch.equal(a, b) for a, b in zip(host["weights"], default_run["weights"], strict=True)
    )
    warm = host["monitor"]._warm
    assert set(warm) == {"full"}
    assert warm["full"].device.type == "cpu"
    assert warm["full"].shape == (3, sum(w.numel() for w in host["weights"]))


def test_checkpoints_without_the_warm_start_load_with_weights_only_and_resume_cold(
    tmp_path: Path, default_run: dict[str, Any]
) -> None:
    lean = fit(tmp_path, "lean", checkpoint_warm_start=False)
    assert lean["top"] == default_run["top"]  # storage, not measurement
    (path,) = lean["dir"].glob("*step=4.ckpt")
    (full_path,) = default_run["dir"].glob("*step=4.ckpt")
    state = torch.load(path, weights_only=True)["callbacks"][lean["monitor"].state_key]
    assert set(state) == {"schedule", "generator"}
    full_state = torch.load(full_path, weights_only=True)["callbacks"]
    assert full_state[default_run["monitor"].state_key]["warm_start"]["full"].shape[0] == 3
    assert path.stat().st_size < full_path.stat().st_size

    resumed = fit(tmp_path, "lean_resumed", ckpt_path=path, checkpoint_warm_start=False)
    after = [(step, value) for step, value in default_run["top"] if step >= 4]
    assert [s for s, _ in resumed["top"]] == [s for s, _ in after]
    for (_, value), (_, expected) in zip(resumed["top"], after, strict=True):
        assert value == pytest.approx(expected, rel=2 * TOL)  # both certified to TOL
    # The first probe after the resume starts cold: more products than the warm one.
    cold = resumed["hvps"][0][1]
    warm = dict(default_run["hvps"])[4]
    assert cold > warm


def test_a_basis_held_to_a_few_rows_logs_the_same_eigenvalues(
    tmp_path: Path, default_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thick restarts (what a model above ``FULL_BASIS_ENTRIES`` gets, forced here): every
    probe certified to the same values within tol, warm starts of the same shape, the
    training untouched."""
    from lightning_curvature.functional.linalg import basis, lanczos

    held: list[int] = []
    step = lanczos.LanczosProcess.step

    def counting(run: lanczos.LanczosProcess) -> bool:
        held.append(run.allocated_rows)
        assert run.thick is not None
        return step(run)

    monkeypatch.setattr(basis, "FULL_BASIS_ENTRIES", 1)
    monkeypatch.setattr(lanczos.LanczosProcess, "step", counting)
    thick = fit(tmp_path, "thick", checkpoint_warm_start=True)
    rows = basis.thick_restart(2, False, 1).rows
    assert max(held) == rows  # the cold probe filled its rows and restarted
    assert max(hvps for _, hvps in thick["hvps"]) > rows
    assert len(thick["top"]) == len(default_run["top"]) == STEPS
    for (step_ours, ours), (step_whole, whole) in zip(
        thick["top"], default_run["top"], strict=True
    ):
        assert step_ours == step_whole
        assert ours == pytest.approx(whole, rel=2 * TOL)
    assert all(
        torch.equal(a, b) for a, b in zip(thick["weights"], default_run["weights"], strict=True)
    )
    assert thick["monitor"]._warm["full"].shape == default_run["monitor"]._warm["full"].shape
