"""An exception of any class in a probe skips that probe with one warning; training is untouched.

Only ``RuntimeError`` (and the project's own errors) used to be bad luck: a ``ValueError``
raised by an eval-mode forward, or a loss that is a vector only in a probe, ended ``fit``.
Here the module's probe-only code raises once, at step 2, inside whichever monitor probes
first: that probe is skipped with exactly one warning naming the step and the exception,
every other probe is logged, and the weights end bit for bit where training without the
monitors ends.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import (
    LIGHTNING_NOISE,
    TanhRegressor,
    csv_logger,
    loader,
    make_trainer,
    read_csv,
    regression_data,
    steps,
)

from lightning_curvature import (
    BatchSharpnessMonitor,
    CurvatureWarning,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

pytestmark = LIGHTNING_NOISE

FAULT_STEP = 2
FAULTS = {
    "value-error": ValueError("an eval-mode shape check failed"),
    "runtime-error": RuntimeError("an eval-mode kernel failed"),
    "out-of-memory": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
    "key-error": KeyError("missing_feature"),
    "per-example-loss": "vector",  # a loss of one value per example (not a scalar)
}
#: The first of each monitor's tags, and the message a per-example loss gives.
TAGS = {
    "HessianEigenvalueMonitor": "curvature/eigenvalue_1",
    "HessianTraceMonitor": "curvature/trace",
    "SpectralDensityMonitor": "curvature/density_max",
    "GradientCoherenceMonitor": "gradient/coherence",
    "BatchSharpnessMonitor": "curvature/batch_sharpness",
}


class FailsInOneProbe(TanhRegressor):
    """Its first eval-mode ``training_step`` at ``FAULT_STEP`` (a probe) fails with ``fault``."""

    def __init__(self, fault: Any) -> None:
        super().__init__()
        self.pending = [fault]  # emptied in place: the probe's isolation does not restore it

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        due = not self.training and self.trainer.global_step == FAULT_STEP and self.pending
        fault = self.pending.pop() if due else None
        if isinstance(fault, BaseException):
            raise fault
        if fault == "vector":
            x, y = batch
            return (self.net(x).squeeze(-1) - y).pow(2)
        return super().training_step(batch, batch_idx)


def every_monitor() -> list[Any]:
    return [
        HessianEigenvalueMonitor(tol=1e-2, every_n_steps=1),
        HessianTraceMonitor(num_hvps=4, every_n_steps=1),
        SpectralDensityMonitor(num_steps=6, num_points=10, every_n_steps=1),
        GradientCoherenceMonitor(every_n_steps=1),
        BatchSharpnessMonitor(num_batches=2, every_n_steps=1),
    ]


@pytest.fixture(scope="module")
def without_monitors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = FailsInOneProbe(None)
    make_trainer(max_steps=5).fit(model, loader(regression_data(n=80), 8))
    return model.state_dict()


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_an_exception_in_a_probe_skips_it_with_one_warning_and_trains_bit_identically(
    tmp_path: Path, fault: Any, without_monitors: dict[str, torch.Tensor]
) -> None:
    torch.manual_seed(0)
    model, monitors, logger = FailsInOneProbe(fault), every_monitor(), csv_logger(tmp_path)
    trainer = make_trainer(monitors, logger=logger, max_steps=5)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(model, loader(regression_data(n=80), 8))

    messages = [str(r.message) for r in records if issubclass(r.category, CurvatureWarning)]
    assert len(messages) == 1, messages
    first = type(monitors[0]).__name__
    assert messages[0].startswith(f"{first}: skipped the probe at step {FAULT_STEP} (")
    if isinstance(fault, BaseException):
        assert f"{type(fault).__name__}: {fault}" in messages[0]
    else:
        assert "scalar" in messages[0]
    assert "rank" not in messages[0]  # one process: no rank to name
    assert model.pending == []
    logged = read_csv(logger)
    for monitor in monitors:
        name = type(monitor).__name__
        expected = [s for s in range(5) if not (name == first and s == FAULT_STEP)]
        assert steps(logged[TAGS[name]]) == expected, name
    for name, value in model.state_dict().items():
        assert torch.equal(value, without_monitors[name]), name
