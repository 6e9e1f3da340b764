"""``isolated``: the one context every probe and SAM's second pass run in, piece by piece."""

from __future__ import annotations

import math
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchmetrics
from models import LIGHTNING_NOISE, assert_identical, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import SAM
from lightning_curvature.callbacks.isolation import (
    isolated,
    recording_skip_reasons,
    skip_reasons,
    training_step_loss,
)

pytestmark = LIGHTNING_NOISE


class Stateful(pl.LightningModule):
    """A training_step with every kind of side effect a probe must not leave behind."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(
            nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3)),
            nn.BatchNorm1d(3),
            nn.Dropout(0.5),
        )
        self.mean = torchmetrics.MeanMetric()
        self.hidden: torch.Tensor | None = None
        self.logged: list[str] = []

    def log(self, name: str, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self.logged.append(name)

    def training_step(self, batch: torch.Tensor) -> torch.Tensor | None:
        start = self.hidden if self.hidden is not None else torch.zeros(3)
        out = self.inner(batch + start)
        self.hidden = out.detach().mean(0)  # kept between steps
        self.mean.update(out.sum())
        self.log("loss")
        random.random()
        np.random.rand()
        return out.pow(2).mean()


def _state(model: Stateful) -> dict[str, Any]:
    return {
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "metric": {k: v.clone() for k, v in model.mean.metric_state.items()},
        "updates": model.mean.update_count,
        "modes": [m.training for m in model.modules()],
        "hidden": model.hidden,
        "torch": torch.get_rng_state(),
        "python": random.getstate()[1],
        "numpy": torch.from_numpy(np.random.get_state()[1].copy()),
        "logged": list(model.logged),
    }


@pytest.mark.parametrize("eval_mode", [True, False])
def test_nothing_a_training_step_does_is_left_behind(eval_mode: bool) -> None:
    model = Stateful().train()
    batch = torch.randn(4, 3)
    model.training_step(batch)  # a training step first: hidden, buffers, metric are set
    before = _state(model)
    with isolated(model, eval_mode=eval_mode):
        assert all(not m.training for m in model.modules()) == eval_mode
        model.training_step(batch)
        model.training_step(batch)
        model.inner[0].note = "a new attribute on a submodule"
        assert not torch.equal(model.mean.metric_state["weight"], before["metric"]["weight"])
    assert_identical(_state(model), before)
    assert "note" not in vars(model.inner[0])


def test_a_replaced_buffer_is_put_back_by_identity() -> None:
    model = Stateful()
    running = model.inner[1].running_mean
    with isolated(model):
        model.inner[1].running_mean = torch.full((3,), 7.0)
        model.inner[1].register_buffer("extra", torch.zeros(1))
    assert model.inner[1].running_mean is running
    assert "extra" not in model.inner[1]._buffers


def test_training_step_loss_sees_training_state_at_every_call_of_a_probe() -> None:
    model = Stateful().train()
    model.training_step(torch.randn(4, 3))
    hidden = model.hidden
    with isolated(model):
        losses = [training_step_loss(model, torch.ones(4, 3)) for _ in range(3)]
    assert all(torch.equal(losses[0], loss) for loss in losses)  # one function per probe
    assert model.hidden is hidden


class Skips(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        return None


def test_a_none_loss_is_an_error_outside_a_probe_and_a_recorded_nan_inside() -> None:
    model = Skips()
    with pytest.raises(ValueError, match="returned neither a tensor"):
        training_step_loss(model, torch.ones(2))
    assert skip_reasons() is None
    with recording_skip_reasons() as reasons:
        loss = training_step_loss(model, torch.ones(2))
        assert skip_reasons() is reasons
    assert reasons == ["the module's training_step returned None for the probe batch"]
    assert math.isnan(float(loss.detach()))
    (grad,) = torch.autograd.grad(loss, [model.w], create_graph=True)
    assert torch.isnan(grad).all()  # reaches the parameters, twice differentiable
    assert grad.requires_grad


class SpectralRegressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.utils.parametrizations.spectral_norm(nn.Linear(3, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (self.net(x).squeeze(-1) - y).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _one_step(callbacks: list[pl.Callback]) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    model = SpectralRegressor()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, generator=g), torch.randn(8, generator=g))
    make_trainer(callbacks, max_steps=1).fit(model, DataLoader(data, batch_size=8))
    return {k: v.clone() for k, v in model.named_buffers()}


def test_sams_second_pass_runs_no_power_iteration_of_spectral_norm() -> None:
    """After one step only the first pass has run its power iteration (as without SAM)."""
    with_sam = _one_step([SAM(rho=0.5)])
    assert_identical(with_sam, _one_step([]))
