"""Warnings that tell what happened: one per fault, and no claim that is not true.

* A fault in the coherence probe's per-example pass and in the micro-batches it falls back
  to gave two warnings, the first announcing a fallback that never ran: now one, the skip.
* A fixed probe batch for which ``training_step`` returns ``None`` was kept all run, every
  probe skipped: now the next batches are drawn and measured, once the skip is said.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from models import LIGHTNING_NOISE, TanhRegressor, csv_logger, make_trainer, read_csv, steps
from models import regression_data as data
from torch.utils.data import DataLoader

from lightning_curvature import (
    CurvatureWarning,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    gradient_coherence,
    hessian_eigenvalues,
)
from lightning_curvature.callbacks.fixed_probe import FixedProbe
from lightning_curvature.callbacks.isolation import training_step_loss

pytestmark = LIGHTNING_NOISE


def fit(tmp_path: Path, module: pl.LightningModule, monitor: pl.Callback, steps: int) -> Any:
    logger = csv_logger(tmp_path)
    trainer = make_trainer([monitor], logger=logger, max_steps=steps)
    with pytest.warns(CurvatureWarning) as records:
        trainer.fit(module, DataLoader(data(n=80), batch_size=8))  # 10 batches, in order
    assert trainer.global_step == steps  # training went on
    messages = [str(r.message) for r in records if issubclass(r.category, CurvatureWarning)]
    return read_csv(logger), messages


class BrokenInProbes(TanhRegressor):
    """A forward that fails whenever it runs in eval mode: in every probe, per example or not."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if not self.training:
            raise RuntimeError("the eval-mode kernel is missing")
        return super().training_step(batch, batch_idx)


def test_one_fault_in_the_coherence_probe_gives_one_true_warning(tmp_path: Path) -> None:
    logged, messages = fit(tmp_path, BrokenInProbes(), GradientCoherenceMonitor(every_n_steps=1), 3)
    (message,) = messages
    assert "skipped the probe at step 0 (RuntimeError: the eval-mode kernel is missing)" in message
    assert "micro-batches" not in message  # no fallback ran, none is claimed
    assert not any(tag.startswith("gradient/") for tag in logged)


class SkipsMarked(TanhRegressor):
    """Skips (returns ``None`` for) every batch whose first target is exactly 0: the first."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:  # type: ignore[override]
        return None if float(batch[1][0]) == 0.0 else super().training_step(batch, batch_idx)


def marked() -> Any:
    dataset = data(n=80)
    dataset.tensors[1][0] = 0.0  # the first batch: the fixed probe's first draw
    return dataset


@pytest.mark.parametrize("kind", ["coherence", "eigenvalue"])
def test_a_fixed_probe_skipped_by_training_step_is_drawn_again(tmp_path: Path, kind: str) -> None:
    monitor: Any = (
        GradientCoherenceMonitor(every_n_steps=1, on_train_end=True)
        if kind == "coherence"
        else HessianEigenvalueMonitor(every_n_steps=1, on_train_end=True, tol=1e-4)
    )
    module = SkipsMarked()
    logger = csv_logger(tmp_path)
    trainer = make_trainer([monitor], logger=logger, max_steps=4)
    loader = DataLoader(marked(), batch_size=8)
    with pytest.warns(CurvatureWarning) as records:
        trainer.fit(module, loader)
    (message,) = [str(r.message) for r in records if issubclass(r.category, CurvatureWarning)]
    assert "skipped the probe at step 0 (the module's training_step returned None" in message
    assert "another fixed probe batch is drawn for the next probes" in message
    assert monitor._fixed.draws == 1
    second = list(loader)[1]
    assert all(torch.equal(a, b) for a, b in zip(monitor.fixed_probe[0], second, strict=True))
    logged = read_csv(logger)
    tag = "gradient/coherence" if kind == "coherence" else "curvature/eigenvalue_1"
    assert steps(logged[tag]) == [1, 2, 3, 4]  # step 0 skipped; 4: the train-end probe
    # The last value is that of the new batch at the final weights.
    if kind == "coherence":
        expected = gradient_coherence(module, training_step_loss, monitor.fixed_probe).coherence
    else:
        found = hessian_eigenvalues(
            module, training_step_loss, monitor.fixed_probe, tol=1e-4, batch_norm="train"
        )
        expected = found.eigenvalues[0]
    assert logged[tag][-1][1] == pytest.approx(float(expected), rel=3e-4)  # both to 1e-4


class NoneInProbes(TanhRegressor):
    """Returns ``None`` for every batch of a probe (eval mode), never in training."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:  # type: ignore[override]
        return None if not self.training else super().training_step(batch, batch_idx)


def test_redraws_stop_with_one_more_warning(tmp_path: Path) -> None:
    monitor = GradientCoherenceMonitor(every_n_steps=1)
    logged, messages = fit(tmp_path, NoneInProbes(), monitor, FixedProbe.MAX_DRAWS + 2)
    assert len(messages) == 2, messages
    assert "another fixed probe batch is drawn" in messages[0]
    assert f"returned None for each of the {FixedProbe.MAX_DRAWS} fixed probes" in messages[1]
    assert monitor._fixed.draws == FixedProbe.MAX_DRAWS - 1
    assert not any(tag.startswith("gradient/") for tag in logged)


def test_resumed_run_probes_the_batch_it_had_drawn(tmp_path: Path) -> None:
    state = GradientCoherenceMonitor(every_n_steps=1).state_dict()
    assert "probe_draws" not in state  # nothing redrawn: the state of before
    redrawn = GradientCoherenceMonitor(every_n_steps=1)
    redrawn._fixed.draws = 2
    again = GradientCoherenceMonitor(every_n_steps=1)
    again.load_state_dict(redrawn.state_dict())
    assert again._fixed.draws == 2
