"""``next_update`` is the step torch's own optimizers take, computed without taking it.

Each optimizer first takes three real steps (so momentum buffers, moments and step counts
are non-trivial), then the update computed from a new gradient is compared with
``(w − w_after) / lr`` of a copy of the parameters and the optimizer that really steps.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from lightning_curvature.functional.optimizer_update import OptimizerUpdate, next_update

CONFIGS: list[tuple[type[torch.optim.Optimizer], dict[str, Any]]] = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.05}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "maximize": True}),
    (torch.optim.Adam, {"lr": 1e-2}),
    (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    (torch.optim.Adam, {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-3, "maximize": True}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
]


def _parameters() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), (2, 2)]
    return [
        torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64)) for s in shapes
    ]


def _step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad: torch.Tensor) -> None:
    for p, g in zip(params, grad.split([p.numel() for p in params]), strict=True):
        p.grad = g.reshape(p.shape).clone()
    optimizer.step()


@pytest.mark.parametrize(("kind", "options"), CONFIGS, ids=lambda c: str(c))
@pytest.mark.parametrize("steps_before", [0, 3])
def test_the_update_is_the_step_the_optimizer_takes(
    kind: type[torch.optim.Optimizer], options: dict[str, Any], steps_before: int
) -> None:
    params = _parameters()
    size = sum(p.numel() for p in params)
    optimizer = kind(params, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps_before):
        _step(optimizer, params, torch.randn(size, generator=generator, dtype=torch.float64))
    gradient = torch.randn(size, generator=generator, dtype=torch.float64)
    state_before = copy.deepcopy(optimizer.state_dict())
    weights_before = [p.detach().clone() for p in params]
    found = next_update(optimizer, params, gradient)
    assert found is not None
    assert found.lr == options["lr"]
    # nothing was written: weights, state
    assert all(torch.equal(p, w) for p, w in zip(params, weights_before, strict=True))
    assert str(optimizer.state_dict()) == str(state_before)
    # a copy that really steps moves by lr·u
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = kind(twins, **options)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _step(twin, twins, gradient)
    moved = torch.cat([(w - t.detach()).reshape(-1) for w, t in zip(params, twins, strict=True)])
    torch.testing.assert_close(found.step, moved, rtol=1e-12, atol=1e-15)
    assert found.kind == ("sgd" if kind is torch.optim.SGD else "adam")


def test_groups_with_their_own_rates_and_parameters_not_optimized() -> None:
    params = _parameters()
    optimizer = torch.optim.SGD(
        [{"params": [params[0]], "lr": 0.2}, {"params": [params[1]], "lr": 0.05}], lr=0.1
    )
    gradient = torch.ones(sum(p.numel() for p in params), dtype=torch.float64)
    found = next_update(optimizer, params, gradient)
    assert found is not None
    assert found.lr == 0.2  # the largest group's
    first, second, third = found.update.split([p.numel() for p in params])
    assert first.tolist() == [1.0] * 12
    assert second.tolist() == [0.25] * 4  # 0.05 / 0.2 of the reference rate
    assert third.tolist() == [0.0] * 4  # params[2] is not in the optimizer


def test_other_optimizers_and_a_rate_of_zero_give_none() -> None:
    params = _parameters()
    gradient = torch.ones(sum(p.numel() for p in params), dtype=torch.float64)
    assert next_update(torch.optim.RMSprop(params), params, gradient) is None
    assert next_update(torch.optim.SGD(params, lr=0.0), params, gradient) is None
    with pytest.raises(ValueError, match=r"`gradient` must have shape \(20,\)"):
        next_update(torch.optim.SGD(params, lr=0.1), params, torch.ones(3))


def test_the_result_is_a_frozen_dataclass() -> None:
    assert OptimizerUpdate.__dataclass_params__.frozen  # type: ignore[attr-defined]
