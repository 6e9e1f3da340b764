"""A layer frozen mid-training: every monitor re-resolves what it measures, training goes on.

The module freezes ``net.0`` in its own ``on_train_batch_start`` of step 4, which Lightning
calls after the callbacks' hook of that step: a probe of step 4 has already run (on the old
set), the free coherence monitor has already started reading that step's backward passes.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from models import LIGHTNING_NOISE, TanhRegressor, csv_logger, loader, make_trainer, read_csv
from models import regression_data as data

import lightning_curvature.callbacks.eigenvalues as eigenvalue_module
from lightning_curvature import (
    BatchSharpnessMonitor,
    CurvatureWarning,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

pytestmark = LIGHTNING_NOISE

STEPS, FREEZE = 8, 4

MONITORS: dict[str, Callable[..., pl.Callback]] = {
    "eigenvalue": lambda **kw: HessianEigenvalueMonitor(every_n_steps=1, **kw),
    "trace": lambda **kw: HessianTraceMonitor(num_hvps=4, every_n_steps=1, **kw),
    "density": lambda **kw: SpectralDensityMonitor(
        num_steps=6, num_points=20, every_n_steps=1, **kw
    ),
    "batch_sharpness": lambda **kw: BatchSharpnessMonitor(num_batches=2, every_n_steps=1, **kw),
    "coherence": lambda **kw: GradientCoherenceMonitor(every_n_steps=1, **kw),
    "accumulation": lambda **kw: GradientCoherenceMonitor(
        source="accumulation", every_n_steps=1, **kw
    ),
}
TAGS = {
    "eigenvalue": "curvature/eigenvalue_1",
    "trace": "curvature/trace",
    "density": "curvature/density_max",
    "batch_sharpness": "curvature/batch_sharpness",
    "coherence": "gradient/coherence",
    "accumulation": "gradient/coherence",
}


class Freezing(TanhRegressor):
    """Freezes ``freeze`` (and unfreezes ``thaw``) in its own hook of step ``FREEZE``."""

    def __init__(self, freeze: str = "net.0.*", thaw: str | None = None) -> None:
        super().__init__()
        self.freeze, self.thaw = freeze, thaw
        if thaw is not None:
            self._set(thaw, False)

    def _set(self, pattern: str, trainable: bool) -> None:
        for name, p in self.named_parameters():
            if fnmatch.fnmatch(name, pattern):
                p.requires_grad_(trainable)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == FREEZE:  # (both micro-batches of the step: the first one counts)
            self._set(self.freeze, False)
            if self.thaw is not None:
                self._set(self.thaw, True)


def fit(tmp_path: Path, callbacks: list[pl.Callback], **freezing: Any) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    module = Freezing(**freezing)
    logger = csv_logger(tmp_path, "run")
    trainer = make_trainer(callbacks, logger=logger, max_steps=STEPS, accumulate_grad_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CurvatureWarning)
        trainer.fit(module, loader(data(n=64), batch_size=8))
    assert trainer.global_step == STEPS  # training finished
    return {
        "weights": [p.detach().clone() for p in module.parameters()],
        "logged": read_csv(logger),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, CurvatureWarning)],
    }


@pytest.fixture(scope="module")
def without_monitors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return fit(tmp_path_factory.mktemp("plain"), [])


@pytest.mark.parametrize("kind", list(MONITORS))
def test_measured_layer_frozen_midway(
    tmp_path: Path, kind: str, without_monitors: dict[str, Any]
) -> None:
    """``parameters="net.0.*"`` and net.0 frozen: probes stop with one warning, nothing else."""
    run = fit(tmp_path, [MONITORS[kind](parameters="net.0.*")])
    for mine, plain in zip(run["weights"], without_monitors["weights"], strict=True):
        assert torch.equal(mine, plain)  # bit for bit the training without the monitor
    (warning,) = run["warnings"]
    assert "changed at step" in warning
    assert "no longer trainable: ['net.0.weight', 'net.0.bias']" in warning
    assert "nothing is left to measure" in warning
    steps = [step for step, _ in run["logged"][TAGS[kind]]]
    last = FREEZE if kind != "accumulation" else FREEZE - 1  # (step 4's samples: mixed sets)
    assert steps == list(range(last + 1))


@pytest.mark.parametrize("kind", ["eigenvalue", "trace", "coherence", "accumulation"])
def test_a_block_that_vanished_is_left_out_and_the_rest_measured(
    tmp_path: Path, kind: str, without_monitors: dict[str, Any]
) -> None:
    blocks = {"first": "net.0.*", "last": "net.2.*"}
    run = fit(tmp_path, [MONITORS[kind](per_layer=blocks)])
    for mine, plain in zip(run["weights"], without_monitors["weights"], strict=True):
        assert torch.equal(mine, plain)
    (warning,) = run["warnings"]
    assert "per_layer block(s) ['first'] have no trainable parameter" in warning
    tag = TAGS[kind]
    first = [step for step, _ in run["logged"][f"{tag}/first"]]
    last = [step for step, _ in run["logged"][f"{tag}/last"]]
    total = [step for step, _ in run["logged"][tag]]
    changed = FREEZE if kind != "accumulation" else FREEZE - 1
    assert first == list(range(changed + 1))
    measured_after = [s for s in range(STEPS) if kind != "accumulation" or s != FREEZE]
    assert last == total == measured_after


def test_warm_starts_over_other_parameters_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """net.0.bias frozen and net.2.weight thawed at once: as many parameters (8 each), other
    coordinates. The probe after the change starts cold; every other probe starts warm."""
    starts: list[torch.Tensor | None] = []
    measure = eigenvalue_module.hessian_eigenvalues

    def spy(*args: Any, **kwargs: Any) -> Any:
        starts.append(kwargs.get("init"))
        return measure(*args, **kwargs)

    monkeypatch.setattr(eigenvalue_module, "hessian_eigenvalues", spy)
    monitor = HessianEigenvalueMonitor(every_n_steps=1, stability=False)
    run = fit(tmp_path, [monitor], freeze="net.0.bias", thaw="net.2.weight")
    assert [start is None for start in starts] == [s in (0, FREEZE + 1) for s in range(STEPS)]
    assert monitor._warm.names("full") == ("net.0.weight", "net.2.weight", "net.2.bias")
    (warning,) = run["warnings"]
    assert "newly trainable: ['net.2.weight']" in warning
    assert "starting cold" in warning


def test_fewer_trainable_parameters_than_k_skip_the_probe(tmp_path: Path) -> None:
    """k=5 over net.2 (9 parameters): with its weight frozen, 1 is left."""
    monitor = HessianEigenvalueMonitor(k=5, every_n_steps=1, parameters="net.2.*")
    run = fit(tmp_path, [monitor], freeze="net.2.weight")
    changed, too_few = run["warnings"]
    assert "no longer trainable: ['net.2.weight']" in changed
    assert f"at step {FREEZE + 1} only 1 measured parameters are trainable, fewer than k=5" in (
        too_few
    )
    assert [step for step, _ in run["logged"]["curvature/eigenvalue_5"]] == list(range(FREEZE + 1))
