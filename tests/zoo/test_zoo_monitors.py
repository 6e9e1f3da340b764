"""The monitors in a real Trainer fit of Lightning's own demo Transformer module.

``LightningTransformer`` with a tiny network and random tokens (its ``prepare_data`` would
download WikiText2), trained with dropout on. The monitors' logged values at step 0 (the
weights before training) are compared with independent float64 references, and the
trained weights with those of the same fit without monitors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import (
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
)
from tests.callbacks.models import csv_logger, make_trainer, read_csv
from tests.zoo import zoo
from tests.zoo.reference import Reference
from tests.zoo.test_zoo import brute_force_coherence

demos = pytest.importorskip("lightning.pytorch.demos")


class TinyLightningTransformer(demos.LightningTransformer):  # type: ignore[misc,name-defined]
    """The demo module, its network shrunk and its data random (no download)."""

    def __init__(self) -> None:
        super().__init__(vocab_size=zoo.VOCAB)
        self.model = zoo.demo_transformer(dropout=0.2).model
        self.tokens = zoo.demo_transformer().batch

    def prepare_data(self) -> None:
        """The demo downloads WikiText2 here; the tokens are made in ``__init__``."""

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(*self.tokens), batch_size=zoo.BATCH)


def _fit(tmp_path: Path, monitors: bool) -> tuple[TinyLightningTransformer, dict[str, Any]]:
    torch.manual_seed(0)
    module = TinyLightningTransformer()
    callbacks = (
        [
            HessianEigenvalueMonitor(k=3, max_iter=100, every_n_steps=2),
            HessianTraceMonitor(num_hvps=32, every_n_steps=2),
            GradientCoherenceMonitor(every_n_steps=2),
        ]
        if monitors
        else []
    )
    logger = csv_logger(tmp_path)
    references: dict[str, Any] = {}
    if monitors:
        case = zoo.ZooCase(module.model, zoo.demo_transformer_loss, module.tokens)
        ref = Reference(case, eval_mode=True)  # the probe turns the dropout off
        hessian = ref.dense()
        references = {
            "eigenvalues": torch.linalg.eigvalsh(hessian).flip(0)[:3],
            "trace": float(hessian.trace()),
            "coherence": brute_force_coherence(zoo.ZooCase(ref.model, case.loss_fn, case.batch)),
        }
    make_trainer(callbacks, logger=logger if monitors else False, max_steps=3).fit(module)
    return module, {**references, "logged": read_csv(logger) if monitors else {}}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")  # inside Lightning 2.6.6
def test_monitors_on_lightning_demo_transformer(tmp_path: Path) -> None:
    monitored, found = _fit(tmp_path, monitors=True)
    plain, _ = _fit(tmp_path, monitors=False)
    for a, b in zip(monitored.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)  # the monitors leave training bit for bit as it was

    logged = found["logged"]
    assert [step for step, _ in logged["curvature/eigenvalue_1"]] == [0, 2]
    exact = found["eigenvalues"]
    for i in range(3):
        value = logged[f"curvature/eigenvalue_{i + 1}"][0][1]
        assert abs(value - float(exact[i])) <= 1e-3 * abs(float(exact[i])) + 1e-5 * float(exact[0])
    trace, error = logged["curvature/trace"][0][1], logged["curvature/trace_std_error"][0][1]
    assert 0 < error < math.inf
    assert abs(trace - found["trace"]) <= 3 * error
    assert logged["gradient/num_samples"][0][1] == zoo.BATCH
    assert logged["gradient/coherence"][0][1] == pytest.approx(found["coherence"], rel=1e-4)
