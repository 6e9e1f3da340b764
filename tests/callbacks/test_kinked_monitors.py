"""The trace, eigenvalue and density monitors on kinked models: right values, or none.

Each case of :mod:`tests.functional.kinked` trained with ``lr=0`` (the weights, and so the
exact Hessian, stay those of the case), probed every step by the three monitors, read back
from a CSV logger. Before the self-check, a finite-difference probe logged a trace of
199.7 ± 28 where the exact one was -0.134, λ₁ = 223 for 0.41. Now, with
``backend="auto"``, every logged value is within the float32 tolerance of the dense
float64 Hessian (the trace within four of its logged standard errors); with
``backend="finite_difference"`` (or ``"auto"`` on ``nn.Hardsigmoid``, which has no second
derivative in torch) nothing is logged and each monitor warns once, naming the cause;
kinked modules are refused to finite differences at setup.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import LIGHTNING_NOISE, csv_logger, make_trainer, read_csv
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import (
    CurvatureWarning,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)
from tests.functional.kinked import KINKS, NAMED, kinked_case, kinked_hessian

pytestmark = LIGHTNING_NOISE
TOL = 1e-3
TAGS = ("curvature/eigenvalue_1", "curvature/trace", "curvature/density_max")
# Refused at setup (kinked modules), or skipped at every probe (kinks in the graph, or no
# second derivative anywhere), by backend.
AT_SETUP = {"hardsigmoid", "hardswish", "elu2"}


class Kinked(pl.LightningModule):
    """A kinked case as a LightningModule that does not move (``lr=0``)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.net, self.loss_fn, self.batch = kinked_case(name)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss_fn(self.net, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path: Path, name: str, backend: str) -> tuple[dict[str, Any], list[str]]:
    """Two steps on the case's batch; the logged series and the CurvatureWarnings."""
    pl.seed_everything(0, verbose=False)
    module = Kinked(name)
    x, y = module.batch
    data = DataLoader(TensorDataset(x, y), batch_size=len(x))  # the probe: the whole batch
    monitors: list[pl.Callback] = [
        HessianEigenvalueMonitor(every_n_steps=1, backend=backend, stability=False),  # type: ignore[arg-type]
        HessianTraceMonitor(every_n_steps=1, backend=backend),  # type: ignore[arg-type]
        SpectralDensityMonitor(every_n_steps=1, backend=backend),  # type: ignore[arg-type]
    ]
    logger = csv_logger(tmp_path, name=f"{name}_{backend}")
    with pytest.warns() as caught:
        make_trainer(monitors, logger=logger, max_steps=2).fit(module, data)
    said = [str(w.message) for w in caught if issubclass(w.category, CurvatureWarning)]
    written = (Path(logger.log_dir) / "metrics.csv").exists() or bool(logger.experiment.metrics)
    return (read_csv(logger) if written else {}), said


@pytest.mark.parametrize("name", [n for n in KINKS if n != "hardsigmoid"])
def test_auto_logs_the_exact_curvature_of_kinked_models(tmp_path: Path, name: str) -> None:
    logged, said = _fit(tmp_path, name, "auto")
    assert said == []
    spectrum = torch.linalg.eigvalsh(kinked_hessian(name))
    top, trace = float(spectrum[-1]), float(spectrum.sum())
    assert [step for step, _ in logged["curvature/eigenvalue_1"]] == [0, 1]
    for (_, eigenvalue), (_, density_max) in zip(
        logged["curvature/eigenvalue_1"], logged["curvature/density_max"], strict=True
    ):
        assert abs(eigenvalue - top) <= TOL * abs(top)
        assert abs(density_max - top) <= TOL * abs(top)
    for (_, estimate), (_, error) in zip(
        logged["curvature/trace"], logged["curvature/trace_std_error"], strict=True
    ):
        assert abs(estimate - trace) <= 4 * error + TOL * abs(trace)


@pytest.mark.parametrize(
    ("name", "backend"),
    [(n, "finite_difference") for n in KINKS if n not in AT_SETUP] + [("hardsigmoid", "auto")],
)
def test_kinks_log_no_value_and_each_monitor_says_why_once(
    tmp_path: Path, name: str, backend: str
) -> None:
    logged, said = _fit(tmp_path, name, backend)
    assert not any(tag in logged for tag in TAGS), logged.keys()
    assert len(said) == 3, said  # one per monitor, not one per probe
    cause = "hardsigmoid" if name == "hardsigmoid" else NAMED[name]
    assert all(re.search(cause, message, re.IGNORECASE) for message in said), said
    assert all("skipped the probe at step 0" in message for message in said)


@pytest.mark.parametrize("name", sorted(AT_SETUP))
def test_kinked_modules_are_refused_to_finite_differences_at_setup(
    tmp_path: Path, name: str
) -> None:
    module = Kinked(name)
    x, y = module.batch
    monitor = HessianTraceMonitor(every_n_steps=1, backend="finite_difference")
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=1)
    with pytest.raises(MisconfigurationException, match=NAMED[name]):
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=len(x)))
    assert isinstance(module.net, nn.Module)
