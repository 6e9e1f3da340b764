"""SAM/ASAM perturbations and the model-level SAM gradient against closed forms."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from lightning_curvature.errors import NonFiniteCurvatureError
from lightning_curvature.functional.gradients.perturbation import (
    perturbed_parameters,
    sam_perturbation,
)
from lightning_curvature.functional.gradients.rng import RNGState
from lightning_curvature.functional.gradients.summed import gradient_sum
from lightning_curvature.functional.model.batches import BatchList
from lightning_curvature.functional.sam import check_sam_arguments, sam_gradient

F64 = torch.float64


class QuadraticModel(nn.Module):
    """f(w) = ½ wᵀAw with w one parameter vector; the batch is A."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())


def quadratic(model: nn.Module, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * model.w @ a @ model.w


# -- the quadratic check --------------------------------------------------------------------
def test_quadratic_sam_gradient_is_exact_on_dyadic_numbers() -> None:
    a = torch.diag(torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=F64))
    w = torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=F64)  # Aw = (1, 1, 1, 1), ‖Aw‖ = 2
    out = sam_gradient(QuadraticModel(w), quadratic, a, rho=0.25)
    aw = a @ w
    expected = a @ (w + 0.25 * aw / aw.norm())
    assert torch.equal(out.gradients[0], expected)
    assert out.gradients[0].tolist() == [1.125, 1.25, 1.5, 2.0]
    assert float(out.loss) == 0.9375
    assert float(out.perturbed_loss) == 1.5546875
    assert float(out.sharpness) == 1.5546875 - 0.9375
    assert float(out.perturbation.norm()) == 0.25


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quadratic_sam_gradient_matches_the_closed_form_on_a_random_spd_matrix(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(6, 6, generator=g, dtype=F64)
    a = m @ m.T + 0.1 * torch.eye(6, dtype=F64)
    w = torch.randn(6, generator=g, dtype=F64)
    model = QuadraticModel(w)
    out = sam_gradient(model, quadratic, a, rho=0.1)
    aw = a @ w
    torch.testing.assert_close(out.gradients[0], a @ (w + 0.1 * aw / aw.norm()), rtol=1e-13, atol=0)
    # sharpness of a quadratic: f(w+ε) − f(w) = εᵀAw + ½ εᵀAε
    eps = 0.1 * aw / aw.norm()
    sharpness = eps @ aw + 0.5 * eps @ a @ eps
    torch.testing.assert_close(out.sharpness, sharpness, rtol=1e-12, atol=0)
    assert torch.equal(model.w.detach(), w)  # weights restored exactly
    assert model.w.grad is None  # and no .grad written


def test_asam_gradient_matches_the_closed_form_with_dense_T() -> None:
    g = torch.Generator().manual_seed(3)
    m = torch.randn(5, 5, generator=g, dtype=F64)
    a = m @ m.T
    w = torch.randn(5, generator=g, dtype=F64)
    out = sam_gradient(QuadraticModel(w), quadratic, a, rho=0.7, adaptive=True, eta=0.01)
    t = torch.diag(w.abs() + 0.01)  # T = diag(|w|) + η
    grad = a @ w
    eps = 0.7 * t @ t @ grad / torch.linalg.vector_norm(t @ grad)
    torch.testing.assert_close(out.gradients[0], a @ (w + eps), rtol=1e-13, atol=0)
    torch.testing.assert_close(out.perturbation.norm(), eps.norm(), rtol=1e-13, atol=0)


# -- sam_perturbation ----------------------------------------------------------------------------
def test_sam_perturbation_has_norm_rho_and_the_gradient_direction_over_all_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)]
    grads = [torch.randn_like(p) for p in params]
    eps = sam_perturbation(params, grads, rho=0.3)
    flat_g = torch.cat([x.flatten() for x in grads])
    flat_e = torch.cat([x.flatten() for x in eps.tensors])  # type: ignore[union-attr]
    torch.testing.assert_close(flat_e, 0.3 * flat_g / flat_g.norm(), rtol=1e-14, atol=0)
    torch.testing.assert_close(eps.norm(), torch.tensor(0.3, dtype=F64), rtol=1e-14, atol=0)
    torch.testing.assert_close(eps.gradient_norm, flat_g.norm(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_power_of_two_loss_scale_gives_the_bit_identical_perturbation(adaptive: bool) -> None:
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(7, 3, generator=g), torch.randn(3, generator=g)]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    plain = sam_perturbation(params, grads, rho=0.05, adaptive=adaptive)
    scaled = sam_perturbation(params, [x * 65536.0 for x in grads], rho=0.05, adaptive=adaptive)
    for a, b in zip(plain.tensors, scaled.tensors, strict=True):
        assert torch.equal(a, b)  # type: ignore[arg-type]


def test_parameters_without_gradient_are_not_perturbed_and_a_zero_gradient_gives_zero() -> None:
    params = [torch.ones(2), torch.ones(3)]
    eps = sam_perturbation(params, [torch.tensor([3.0, 4.0]), None], rho=1.0)
    assert eps.tensors[1] is None
    assert eps.tensors[0].tolist() == pytest.approx([0.6, 0.8])  # type: ignore[union-attr]
    zero = sam_perturbation(params, [torch.zeros(2), torch.zeros(3)], rho=1.0, adaptive=True)
    assert all(torch.equal(e, torch.zeros_like(e)) for e in zero.tensors)  # type: ignore[arg-type]
    assert zero.is_finite()
    none = sam_perturbation(params, [None, None])
    assert none.tensors == (None, None)
    assert float(none.norm()) == 0.0


@pytest.mark.parametrize("value", [1e-4, 300.0])  # fp16 squares: underflow, overflow
def test_low_precision_gradients_are_combined_in_fp32_and_cast_back(value: float) -> None:
    params = [torch.ones(4, dtype=torch.float16)]
    grads = [torch.full((4,), value, dtype=torch.float16)]
    eps = sam_perturbation(params, grads, rho=1.0)
    assert eps.is_finite()
    assert eps.tensors[0].dtype == torch.float16  # type: ignore[union-attr]
    assert eps.tensors[0].tolist() == [0.5] * 4  # type: ignore[union-attr]


def test_a_non_finite_gradient_is_reported_not_applied() -> None:
    params = [torch.zeros(2)]
    for bad in (math.inf, math.nan):
        eps = sam_perturbation(params, [torch.tensor([1.0, bad])])
        assert not eps.is_finite()


# -- apply, restore, accumulate ------------------------------------------------------------------
def test_perturbed_parameters_restores_bit_exactly_even_after_an_error() -> None:
    w = nn.Parameter(torch.tensor([0.1, 0.2, 0.3]))
    before = w.detach().clone()
    eps = sam_perturbation([w], [torch.tensor([1e-3, 7.0, -3.0])], rho=0.123)
    # subtracting ε would not give w back in float32; the saved copy does
    assert not torch.equal((w.detach() + eps.tensors[0]) - eps.tensors[0], before)  # type: ignore[operator]
    seen = []

    def fail_inside() -> None:
        with perturbed_parameters([w], eps):
            seen.append(w.detach().clone())
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        fail_inside()
    assert torch.equal(seen[0], before + eps.tensors[0])  # type: ignore[operator]
    assert torch.equal(w.detach(), before)


def test_gradient_sum_equals_backward_accumulation_bit_for_bit() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    batches = [torch.randn(5, 3) for _ in range(3)]
    params = list(net.parameters())
    total = gradient_sum(params, (net(b).pow(2).mean() / 3 for b in batches))
    for b in batches:
        (net(b).pow(2).mean() / 3).backward()
    for p, g in zip(params, total, strict=True):
        assert torch.equal(p.grad, g)  # type: ignore[arg-type]
    # a None loss is skipped; an unused parameter gets None
    extra = nn.Parameter(torch.ones(1))
    assert gradient_sum([params[0], extra], [None, net(batches[0]).sum()])[1] is None
    # an expanded gradient (of a sum) is accumulated out of place
    w = torch.ones(3, requires_grad=True)
    assert gradient_sum([w], (w.sum() for _ in range(2)))[0].tolist() == [2.0, 2.0, 2.0]  # type: ignore[union-attr]


def test_rng_state_covers_torch_python_and_numpy() -> None:
    np = pytest.importorskip("numpy")
    state = RNGState.capture(torch.device("cpu"))
    draws = (torch.rand(2), random.random(), np.random.rand())
    state.restore()
    again = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0])
    assert draws[1:] == again[1:]


# -- sam_gradient on a real network: BatchNorm, dropout, batches ---------------------------------
def _bn_dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 6, dtype=F64),
        nn.BatchNorm1d(6, dtype=F64),
        nn.Tanh(),
        nn.Dropout(0.5),
        nn.Linear(6, 1, dtype=F64),
    ).train()


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x).squeeze(-1) - y).pow(2).mean()


def test_sam_gradient_updates_batchnorm_once_and_replays_dropout() -> None:
    net = _bn_dropout_net()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(16, 3, generator=g, dtype=F64), torch.randn(16, generator=g, dtype=F64))
    twin = _bn_dropout_net()
    params = list(net.parameters())

    torch.manual_seed(5)
    out = sam_gradient(net, _mse, batch, rho=0.2)
    after = torch.get_rng_state()

    # by hand: one forward/backward at w (masks from seed 5), the same masks at w + ε
    torch.manual_seed(5)
    loss = _mse(twin, batch)
    grads = torch.autograd.grad(loss, list(twin.parameters()))
    after_first = torch.get_rng_state()
    stats = [twin[1].running_mean.clone(), twin[1].running_var.clone()]
    norm = torch.linalg.vector_norm(torch.stack([x.norm() for x in grads]))
    with torch.no_grad():
        for p, x in zip(twin.parameters(), grads, strict=True):
            p.add_(x * (0.2 / norm))
    torch.manual_seed(5)
    expected = torch.autograd.grad(_mse(twin, batch), list(twin.parameters()))

    for a, b in zip(out.gradients, expected, strict=True):
        assert torch.equal(a, b)  # type: ignore[arg-type]
    assert torch.equal(after, after_first)  # the RNG is where one pass leaves it
    assert int(net[1].num_batches_tracked) == 1  # running stats: first pass only
    assert torch.equal(net[1].running_mean, stats[0])
    assert torch.equal(net[1].running_var, stats[1])
    assert all(p.grad is None for p in params)


def test_resampled_dropout_draws_new_masks() -> None:
    net = _bn_dropout_net()
    batch = (torch.randn(16, 3, dtype=F64), torch.randn(16, dtype=F64))
    torch.manual_seed(5)
    reused = sam_gradient(net, _mse, batch, rho=0.2)
    torch.manual_seed(5)
    resampled = sam_gradient(net, _mse, batch, rho=0.2, dropout="resample")
    assert torch.equal(reused.loss, resampled.loss)  # same first pass
    assert not torch.equal(reused.perturbed_loss, resampled.perturbed_loss)


def test_several_batches_are_weighted_by_size() -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 1, dtype=F64)
    x, y = torch.randn(10, 3, dtype=F64), torch.randn(10, dtype=F64)
    whole = sam_gradient(net, _mse, (x, y), rho=0.1)
    parts = sam_gradient(net, _mse, BatchList([(x[:4], y[:4]), (x[4:], y[4:])]), rho=0.1)
    for a, b in zip(whole.gradients, parts.gradients, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(whole.sharpness, parts.sharpness, rtol=1e-10, atol=1e-15)


def test_only_the_selected_parameters_are_perturbed() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3, dtype=F64), nn.Linear(3, 1, dtype=F64))
    batch = (torch.randn(8, 3, dtype=F64), torch.randn(8, dtype=F64))
    out = sam_gradient(net, _mse, batch, parameters="1.*")
    assert out.parameter_names == ("1.weight", "1.bias")
    assert len(out.gradients) == 2


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rho", "eta", "match"),
    [
        (0.0, 0.01, r"`rho` must be a finite number > 0, got 0.0"),
        (-0.5, 0.01, r"`rho` must be a finite number > 0, got -0.5"),
        (math.inf, 0.01, r"`rho` must be a finite number > 0, got inf"),
        (True, 0.01, r"`rho` must be a finite number > 0, got True"),
        (0.05, -1.0, r"`eta` must be a finite number >= 0, got -1.0"),
        (0.05, math.nan, r"`eta` must be a finite number >= 0, got nan"),
    ],
)
def test_out_of_range_arguments_raise(rho: float, eta: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_sam_arguments(rho, eta)
    with pytest.raises(ValueError, match=match):
        sam_perturbation([torch.ones(1)], [torch.ones(1)], rho, eta=eta)


def test_a_gradient_count_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"one entry per parameter: got 1 gradients for 2"):
        sam_perturbation([torch.ones(1), torch.ones(1)], [torch.ones(1)])


def test_an_unknown_dropout_mode_raises() -> None:
    with pytest.raises(ValueError, match=r"`dropout` must be one of \('reuse', 'resample'\)"):
        sam_gradient(nn.Linear(1, 1), lambda m, b: m(b).sum(), torch.ones(1, 1), dropout="new")  # type: ignore[arg-type]


def test_a_non_finite_loss_raises_and_leaves_the_weights() -> None:
    net = nn.Linear(2, 1)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(NonFiniteCurvatureError, match=r"not finite"):
        sam_gradient(net, lambda m, b: m(b).sum() * math.inf, torch.ones(3, 2))
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
