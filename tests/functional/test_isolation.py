"""Every public function leaves the model, its gradients and the global RNG as it found them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_curvature.errors import NonFiniteCurvatureError
from lightning_curvature.functional.density import spectral_density
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.operator.hvp import hessian_vector_product
from lightning_curvature.functional.operator.operator import HessianOperator
from lightning_curvature.functional.trace import hessian_trace
from tests.functional.cases import (
    CASES_BY_NAME,
    LossFn,
    assert_unchanged,
    batch_norm_dropout_case,
    seeded,
    snapshot,
)


def _hvp(model: nn.Module, loss_fn: LossFn, batch: Any, **kwargs: Any) -> object:
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vector = torch.ones(size, dtype=torch.float64)
    return hessian_vector_product(model, loss_fn, batch, vector, **kwargs)


FUNCTIONS: dict[str, Callable[..., object]] = {
    "hessian_vector_product": _hvp,
    "hessian_eigenvalues": lambda m, f, b, **kw: hessian_eigenvalues(m, f, b, k=2, tol=1e-2, **kw),
    "hessian_trace": lambda m, f, b, **kw: hessian_trace(m, f, b, num_hvps=3, per_layer=True, **kw),
    "spectral_density": lambda m, f, b, **kw: spectral_density(m, f, b, num_steps=4, **kw),
}
MODELS: dict[str, Callable[[], tuple[nn.Module, LossFn, Any]]] = {
    "batch_norm_train_dropout": batch_norm_dropout_case,
    "cnn_batchnorm_eval": CASES_BY_NAME["cnn_batchnorm_eval"].build,
    "transformer_train_mode": lambda: _in_train_mode(CASES_BY_NAME["transformer_layer"].build()),
    "frozen_and_tied": CASES_BY_NAME["frozen_and_tied"].build,
}


def _in_train_mode(built: tuple[nn.Module, LossFn, Any]) -> tuple[nn.Module, LossFn, Any]:
    built[0].train()
    return built


def _give_grads(model: nn.Module) -> None:
    """Some parameters get a .grad, others keep None: both must survive as they are."""
    with seeded(1):
        for i, p in enumerate(model.parameters()):
            if i % 2 == 0 and p.requires_grad:
                p.grad = torch.randn_like(p)


@pytest.mark.parametrize("batch_norm", ["as_is", "train", "eval"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_model_and_global_rng_untouched(function: str, model_name: str, batch_norm: str) -> None:
    model, loss_fn, batch = MODELS[model_name]()
    _give_grads(model)
    modes_before = {name: m.training for name, m in model.named_modules()}
    before = snapshot(model)
    FUNCTIONS[function](model, loss_fn, batch, batch_norm=batch_norm)
    assert_unchanged(model, before)
    assert {name: m.training for name, m in model.named_modules()} == modes_before


def test_mixed_modes_restored_per_submodule() -> None:
    model, loss_fn, batch = batch_norm_dropout_case()
    model.bn.eval()  # train model, eval BatchNorm, train dropout
    before = snapshot(model)
    for batch_norm in ("as_is", "train", "eval"):
        hessian_trace(model, loss_fn, batch, num_hvps=2, batch_norm=batch_norm)
        assert_unchanged(model, before)
    assert model.training
    assert not model.bn.training
    assert model.dropout.training


def test_running_statistics_would_change_without_the_probe_guard() -> None:
    """Sanity check of the setting: a plain train-mode forward does update BatchNorm."""
    model, loss_fn, batch = batch_norm_dropout_case()
    before = model.bn.running_mean.clone()
    loss_fn(model, batch)
    assert not torch.equal(model.bn.running_mean, before)


def test_untouched_after_a_failing_probe() -> None:
    model, loss_fn, batch = batch_norm_dropout_case()
    before = snapshot(model)

    def nan_loss(m: nn.Module, b: Any) -> torch.Tensor:
        return loss_fn(m, b) * float("nan")

    with pytest.raises(NonFiniteCurvatureError, match="loss is not finite"):
        hessian_eigenvalues(model, nan_loss, batch)
    assert_unchanged(model, before)

    def broken_loss(m: nn.Module, b: Any) -> torch.Tensor:
        m(b[0])
        raise KeyError("label")

    with pytest.raises(KeyError, match="label"):
        hessian_trace(model, broken_loss, batch)
    assert_unchanged(model, before)


def test_dropout_on_request_still_leaves_the_global_rng() -> None:
    model, loss_fn, batch = batch_norm_dropout_case()
    before = snapshot(model)
    with HessianOperator(model, loss_fn, batch, dropout=True, backend="double_backward") as op:
        first = op.matvec(torch.ones(op.size, dtype=torch.float64))
        second = op.matvec(torch.ones(op.size, dtype=torch.float64))
    assert torch.equal(first, second)  # one set of masks per probe: one operator
    assert_unchanged(model, before)
