"""Stability thresholds: closed forms, the real optimizers' behaviour, Adam's preconditioner."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_curvature import hessian_eigenvalues
from lightning_curvature.functional.linalg.sampling import make_generator
from lightning_curvature.functional.stability import stability_threshold

CPU = torch.device("cpu")


def _diverges(curvature: float, make: type[torch.optim.Optimizer], **options: float) -> bool:
    """Run the real optimizer on ``curvature · w² / 2`` from w = 1; does it blow up?"""
    w = nn.Parameter(torch.ones(1, dtype=torch.float64))
    optimizer = make([w], **options)
    for _ in range(2000):
        optimizer.zero_grad()
        (0.5 * curvature * w.pow(2)).sum().backward()
        optimizer.step()
    return not abs(float(w.detach())) < 1.0  # NaN and inf count as diverged


SGD_CASES = [
    pytest.param({"lr": 0.1}, 2 / 0.1, 0.0, id="sgd"),
    pytest.param({"lr": 0.1, "momentum": 0.9}, 3.8 / 0.1, 0.0, id="heavy-ball"),
    pytest.param(
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}, 3.8 / (0.1 * 0.5), 0.0, id="dampening"
    ),
    pytest.param(
        {"lr": 0.1, "momentum": 0.9, "nesterov": True}, 3.8 / (0.1 * 2.8), 0.0, id="nesterov"
    ),
    pytest.param({"lr": 0.2, "momentum": 0.5, "nesterov": True}, 3 / (0.2 * 2), 0.0, id="nest-.5"),
    pytest.param({"lr": 0.1, "weight_decay": 0.5}, 2 / 0.1, 0.5, id="coupled-l2"),
    pytest.param({"lr": 0.1, "momentum": 0.5, "weight_decay": 0.3}, 3 / 0.1, 0.3, id="momentum-l2"),
]


@pytest.mark.parametrize(("options", "threshold", "shift"), SGD_CASES)
def test_sgd_thresholds_have_their_closed_form(
    options: dict[str, float], threshold: float, shift: float
) -> None:
    w = nn.Parameter(torch.zeros(3))
    found = stability_threshold(torch.optim.SGD([w], **options), [w])
    assert found is not None
    assert found.kind == "sgd"
    assert found.threshold == pytest.approx(threshold, rel=1e-12)
    assert found.eigenvalue_shift == shift
    assert found.preconditioner is None


@pytest.mark.parametrize(("options", "threshold", "shift"), SGD_CASES)
def test_sgd_thresholds_are_where_torch_optim_sgd_starts_to_diverge(
    options: dict[str, float], threshold: float, shift: float
) -> None:
    """The edge the monitor reports is the real one: stable 2% below, unstable 2% above."""
    w = nn.Parameter(torch.zeros(1))
    found = stability_threshold(torch.optim.SGD([w], **options), [w])
    assert found is not None
    edge = found.threshold - found.eigenvalue_shift  # Hessian eigenvalue at the edge
    assert not _diverges(0.98 * edge, torch.optim.SGD, **options)
    assert _diverges(1.02 * edge, torch.optim.SGD, **options)


def test_several_groups_take_the_largest_learning_rate() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    sgd = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.4}], lr=0.1)
    found = stability_threshold(sgd, [a, b])
    assert found is not None
    assert found.threshold == pytest.approx(2 / 0.4)


@pytest.mark.parametrize("make", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize(("beta1", "expected"), [(0.9, 38.0), (0.5, 6.0), (0.0, 2.0)])
def test_adam_threshold_is_2_plus_2_beta1_over_1_minus_beta1_lr(
    make: type[torch.optim.Optimizer], beta1: float, expected: float
) -> None:
    w = nn.Parameter(torch.zeros(3))
    found = stability_threshold(make([w], lr=0.01, betas=(beta1, 0.999)), [w])
    assert found is not None
    assert found.kind == "adam"
    assert found.threshold == pytest.approx(expected / 0.01, rel=1e-12)
    assert found.preconditioner is None  # before the first step there is no preconditioner


def _quadratic_steps(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], n: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        optimizer.zero_grad()
        loss = sum((p * torch.randn(p.shape, generator=g, dtype=p.dtype)).sum() for p in params)
        loss = loss + sum(p.pow(2).sum() for p in params)
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("make", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_preconditioner_is_computed_from_the_optimizer_state_by_hand(
    make: type[torch.optim.Optimizer], amsgrad: bool
) -> None:
    """D = 1 / sqrt((1 − β1ᵗ)(√v̂ + ε)), v̂ = v / (1 − β2ᵗ), over the given parameters."""
    a, b = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4))
    beta1, beta2, eps = 0.8, 0.99, 1e-3
    optimizer = make([a, b], lr=0.01, betas=(beta1, beta2), eps=eps, amsgrad=amsgrad)
    _quadratic_steps(optimizer, [a, b], 3)
    found = stability_threshold(optimizer, [b, a])  # the operator's layout order
    assert found is not None
    assert found.preconditioner is not None
    pieces = []
    for p in (b, a):
        state = optimizer.state[p]
        t = float(state["step"])
        v = state["max_exp_avg_sq" if amsgrad else "exp_avg_sq"]
        v_hat = v / (1 - beta2**t)
        pieces.append((1 / torch.sqrt((1 - beta1**t) * (v_hat.sqrt() + eps))).reshape(-1))
    expected = torch.cat(pieces)
    assert float(optimizer.state[a]["step"]) == 3
    torch.testing.assert_close(found.preconditioner, expected, rtol=1e-6, atol=0)
    assert found.threshold == pytest.approx((2 + 2 * beta1) / ((1 - beta1) * 0.01))


def test_adam_groups_with_other_learning_rates_are_absorbed_into_the_preconditioner() -> None:
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    groups = [{"params": [a], "lr": 0.02}, {"params": [b], "lr": 0.005}]
    optimizer = torch.optim.Adam(groups, lr=0.02)
    _quadratic_steps(optimizer, [a, b], 2)
    found = stability_threshold(optimizer, [a, b])
    assert found is not None
    assert found.preconditioner is not None
    assert found.threshold == pytest.approx(38 / 0.02)  # the largest lr is the reference
    alone = torch.optim.Adam([{"params": [b], "lr": 0.005}])
    alone.load_state_dict({"state": {0: optimizer.state_dict()["state"][1]},
                           "param_groups": [{**optimizer.state_dict()["param_groups"][1],
                                             "params": [0]}]})  # fmt: skip
    d_b = stability_threshold(alone, [b]).preconditioner  # type: ignore[union-attr]
    torch.testing.assert_close(found.preconditioner[3:], d_b * math.sqrt(0.005 / 0.02))


def test_a_parameter_the_optimizer_does_not_hold_gets_zero_motion() -> None:
    a, frozen = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([a], lr=0.01)
    _quadratic_steps(optimizer, [a], 1)
    found = stability_threshold(optimizer, [a, frozen])
    assert found is not None
    assert found.preconditioner is not None
    assert torch.equal(found.preconditioner[3:], torch.zeros(2))
    assert bool((found.preconditioner[:3] > 0).all())


@pytest.mark.parametrize(
    "optimizer",
    [torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.NAdam],
    ids=lambda c: c.__name__,
)
def test_unknown_optimizers_have_no_threshold(optimizer: type[torch.optim.Optimizer]) -> None:
    w = nn.Parameter(torch.zeros(3))
    assert stability_threshold(optimizer([w], lr=0.01), [w]) is None


# -- λ₁(D H D) against the dense P⁻¹H ------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _dense_hessian(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(vector: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = math.prod(shape)
            params[name] = vector[start : start + size].reshape(shape)
            start += size
        x, y = batch
        return (torch.func.functional_call(model, params, (x,)) - y).pow(2).mean()

    return torch.autograd.functional.hessian(loss_of, flat)


def test_preconditioned_sharpness_is_the_top_eigenvalue_of_dense_p_inverse_h() -> None:
    torch.manual_seed(0)
    model = _Tiny()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 3, generator=g, dtype=torch.float64),
             torch.randn(16, generator=g, dtype=torch.float64))  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(4):
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()
    params = list(model.parameters())
    found = stability_threshold(optimizer, params)
    assert found is not None
    assert found.preconditioner is not None

    hessian = _dense_hessian(model, batch)
    p_inverse = torch.diag(found.preconditioner.double() ** 2)  # P⁻¹ = D²
    dense = torch.linalg.eigvals(p_inverse @ hessian)
    assert float(dense.imag.abs().max()) < 1e-8  # similar to the symmetric D H D: real
    expected = float(dense.real.max())

    result = hessian_eigenvalues(
        model,
        _loss,
        batch,
        tol=1e-10,
        preconditioner=found.preconditioner,
        generator=make_generator(CPU, 0),
    )
    assert float(result.eigenvalues[0]) == pytest.approx(expected, rel=1e-6)
    # ... and it is not λ₁(H): the preconditioner matters.
    assert abs(expected - float(torch.linalg.eigvalsh(hessian)[-1])) > 0.1 * abs(expected)


@pytest.mark.parametrize(
    "make", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW], ids=lambda m: m.__name__
)
def test_lr_0_has_an_infinite_threshold_and_no_preconditioner(
    make: type[torch.optim.Optimizer],
) -> None:
    """The first step of a warmup from 0: no curvature makes a step of size 0 unstable."""
    w = nn.Parameter(torch.ones(3))
    optimizer = make([w], lr=0.0)
    w.grad = torch.ones(3)
    optimizer.step()  # Adam has state now; lr 0 still gives no threshold to divide by
    found = stability_threshold(optimizer, [w])
    assert found is not None
    assert found.threshold == math.inf
    assert found.preconditioner is None
    assert torch.equal(w.detach(), torch.ones(3))  # lr 0 really did not move it
