"""Batch sharpness, directional curvature, subspace share and SAM's curvature along ε,
against brute force from dense Hessians (``torch.func``) on the shared tiny cases.

float64: the estimators are exact up to rounding (1e-9 relative). float32: the reference is
the float64 computation on the float32-rounded weights and data, so what is measured is the
float32 arithmetic; its products carry a few hundred roundings of ``‖H‖`` (sums over the
batch and the parameters), hence ``1e-4·(|exact| + ‖H‖)``.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_curvature.functional.batch_sharpness import batch_sharpness
from lightning_curvature.functional.directional import directional_curvature, subspace_share
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.operator.operator import HessianOperator
from lightning_curvature.functional.sam import sam_gradient
from tests.functional.cases import CASES, dense_hessian, flat_loss, half_squares, seeded
from tests.functional.test_float32 import _to

NAMES = [case.name for case in CASES]
BUILD = {case.name: case.build for case in CASES}
DTYPES = [torch.float64, torch.float32]


def _rows(batch: Any, index: slice) -> Any:
    """The examples ``index`` of a batch (tuple, list or dict of tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, dict):
        return {key: _rows(value, index) for key, value in batch.items()}
    return type(batch)(_rows(item, index) for item in batch)


def _size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _size(next(iter(batch.values())))
    return _size(batch[0])


def _case(name: str, dtype: torch.dtype) -> tuple[nn.Module, Any, Any]:
    model, loss_fn, batch = BUILD[name]()
    return copy.deepcopy(model).to(dtype), loss_fn, _to(batch, dtype)


def _exact(model: nn.Module, loss_fn: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 dense Hessian and gradient of the (possibly float32) model's weights."""
    model64, batch64 = copy.deepcopy(model).double(), _to(batch, torch.float64)
    hessian = dense_hessian(model64, loss_fn, batch64)
    loss_of, point = flat_loss(model64, loss_fn, batch64)
    return (hessian + hessian.T) / 2, torch.func.grad(loss_of)(point).detach()


def _tolerance(dtype: torch.dtype, exact: float, hessian: torch.Tensor) -> float:
    scale = abs(exact) + float(torch.linalg.matrix_norm(hessian, ord=2))
    return (1e-9 if dtype == torch.float64 else 1e-4) * scale


def _halves(batch: Any) -> list[Any]:
    n = _size(batch)
    cut = max(1, n // 2)
    return [_rows(batch, slice(0, cut)), _rows(batch, slice(cut, n))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_batch_sharpness_is_the_mean_rayleigh_quotient_of_each_batch(
    name: str, dtype: torch.dtype
) -> None:
    model, loss_fn, batch = _case(name, dtype)
    batches = _halves(batch)
    quotients = []
    for part in batches:
        hessian, gradient = _exact(model, loss_fn, part)
        quotients.append(float(gradient @ hessian @ gradient / (gradient @ gradient)))
    out = batch_sharpness(model, loss_fn, batches)
    exact = sum(quotients) / 2
    spread = abs(quotients[0] - quotients[1]) / 2  # std(…, unbiased) / √2 for two values
    assert out.num_batches == 2
    assert out.num_hvps == 2
    tolerance = _tolerance(dtype, exact, hessian)
    assert abs(float(out.estimate) - exact) <= tolerance, (float(out.estimate), exact)
    assert abs(float(out.std_error) - spread) <= 2 * tolerance
    for value, quotient in zip(out.values.tolist(), quotients, strict=True):
        assert abs(value - quotient) <= tolerance


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_directional_curvature_is_the_rayleigh_quotient(name: str, dtype: torch.dtype) -> None:
    model, loss_fn, batch = _case(name, dtype)
    hessian, _ = _exact(model, loss_fn, batch)
    generator = torch.Generator().manual_seed(3)
    direction = torch.randn(hessian.shape[0], generator=generator, dtype=torch.float64)
    exact = float(direction @ hessian @ direction / (direction @ direction))
    out = directional_curvature(model, loss_fn, batch, direction.to(dtype))
    assert out.num_hvps == 1
    assert abs(float(out.value) - exact) <= _tolerance(dtype, exact, hessian)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_gradient_share_of_the_top_eigenspace(name: str, dtype: torch.dtype) -> None:
    model, loss_fn, batch = _case(name, dtype)
    hessian, gradient = _exact(model, loss_fn, batch)
    values, vectors = torch.linalg.eigh(hessian)
    k = 2
    if float(values[-k] - values[-k - 1]) < 1e-3 * float(values.abs().max()):
        pytest.skip("no gap below the top 2: the top-2 eigenspace is not defined")
    top = vectors[:, -k:].T
    exact = float((top @ gradient).square().sum() / (gradient @ gradient))
    # the function itself, on the exact basis
    assert abs(float(subspace_share(gradient, top)) - exact) <= 1e-12
    # through the eigenvalue solver's own gradient and Ritz vectors
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    out = hessian_eigenvalues(
        model, loss_fn, batch, k=k, tol=tol, max_iter=hessian.shape[0],
        return_eigenvectors=True, return_gradient=True,
    )  # fmt: skip
    assert out.gradient is not None
    assert out.eigenvectors is not None
    grad_tol = 1e-10 if dtype == torch.float64 else 1e-5
    scale = float(gradient.abs().max())
    assert float((out.gradient.double() - gradient).abs().max()) <= grad_tol * max(scale, 1.0)
    gap = float(values[-k] - values[-k - 1]) / float(values.abs().max())
    share_tol = 1e-6 if dtype == torch.float64 else 2e-3 / min(gap, 1.0)
    assert abs(float(subspace_share(out.gradient, out.eigenvectors)) - exact) <= share_tol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_sam_curvature_is_the_secant_of_the_gradient_along_epsilon(
    name: str, dtype: torch.dtype
) -> None:
    model, loss_fn, batch = _case(name, dtype)
    model.eval()  # the transformer's dropout off, so the brute force sees the same loss
    rho = 1e-2
    out = sam_gradient(model, loss_fn, batch, rho=rho)
    hessian, gradient = _exact(model, loss_fn, batch)
    loss_of, point = flat_loss(copy.deepcopy(model).double(), loss_fn, _to(batch, torch.float64))
    eps = rho * gradient / gradient.norm()
    secant = float((torch.func.grad(loss_of)(point + eps) - gradient) @ eps / (eps @ eps))
    rayleigh = float(eps @ hessian @ eps / (eps @ eps))
    # the logged quantity, computed the long way: exact in float64; in float32 the two
    # gradients' roundings (eps·‖g‖) are divided by ‖ε‖ = ρ
    norm = float(gradient.norm())
    secant_tol = 1e-9 * (abs(secant) + norm / rho) if dtype == torch.float64 else None
    if secant_tol is None:
        secant_tol = 64 * torch.finfo(torch.float32).eps * (abs(secant) + 10 * norm / rho)
    assert abs(float(out.curvature) - secant) <= secant_tol, (float(out.curvature), secant)
    # and it is the curvature along ε up to O(ρ): exact on the quadratic cases
    if name in ("least_squares", "half_least_squares"):
        assert abs(secant - rayleigh) <= 1e-9 * abs(rayleigh)
    else:
        assert abs(secant - rayleigh) <= 0.05 * (abs(rayleigh) + 1.0), (secant, rayleigh)


def _mlp_dataset() -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor]:
    with seeded(11):
        x = torch.randn(8, 3, dtype=torch.float64)
        y = torch.randn(8, dtype=torch.float64)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    return model, half_squares, x, y


def test_the_standard_error_covers_the_expectation_over_all_batches() -> None:
    """Over all C(8, 3) = 56 batches of a small dataset the expectation is exact; 20 batches
    drawn at random (a shuffled loader's batches) give an interval ±2 SE that covers it in at
    least 90% of 100 seeds (nominally about 94%, Student t with 19 degrees of freedom; over
    1000 seeds of this very setting, 95.0%)."""
    model, loss_fn, x, y = _mlp_dataset()
    subsets = list(itertools.combinations(range(8), 3))
    quotients = []
    for subset in subsets:
        part = [x[list(subset)], y[list(subset)]]
        hessian, gradient = _exact(model, loss_fn, part)
        quotients.append(float(gradient @ hessian @ gradient / (gradient @ gradient)))
    expectation = sum(quotients) / len(quotients)
    covered = 0
    for seed in range(100):
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(len(subsets), (20,), generator=generator).tolist()
        batches = [[x[list(subsets[i])], y[list(subsets[i])]] for i in picks]
        out = batch_sharpness(model, loss_fn, batches)
        assert math.isclose(
            float(out.estimate), sum(quotients[i] for i in picks) / 20, rel_tol=1e-9
        )
        covered += abs(float(out.estimate) - expectation) <= 2 * float(out.std_error)
    assert covered >= 90, f"covered in {covered} of 100 seeds"


def test_batch_sharpness_needs_two_batches() -> None:
    model, loss_fn, x, y = _mlp_dataset()
    with pytest.raises(ValueError, match="at least 2 batches"):
        batch_sharpness(model, loss_fn, [[x, y]])


def test_a_zero_gradient_batch_is_left_out_with_a_warning() -> None:
    net = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        net.weight.zero_()
    loss_fn = half_squares
    x = torch.eye(2, dtype=torch.float64)
    batches = [[x, torch.ones(2, dtype=torch.float64)]] * 2 + [
        [x, torch.zeros(2, dtype=torch.float64)]
    ]
    with pytest.warns(match="zero gradient"):
        out = batch_sharpness(net, loss_fn, batches)
    assert out.num_batches == 2
    assert out.num_hvps == 2
    assert math.isnan(float(out.values[2]))
    assert float(out.estimate) == pytest.approx(0.5)  # H = I/2 along any g


def test_shapes_are_checked() -> None:
    model, loss_fn, x, y = _mlp_dataset()
    with pytest.raises(ValueError, match=r"`direction` must have shape \("):
        directional_curvature(model, loss_fn, [x, y], torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="`basis` must be"):
        subspace_share(torch.zeros(3), torch.zeros(2, 4))
    zero = subspace_share(torch.zeros(3), torch.eye(3)[:1])
    assert math.isnan(float(zero))


@pytest.mark.parametrize("backend", ["auto", "double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("name", NAMES)
def test_ggn_mode_gradient_and_curvature_along_directions(name: str, backend: str) -> None:
    """With ``curvature="ggn"`` the operator's gradient is still the loss's (Jᵀ∂ℓ/∂z) and
    the quotients are those of the dense GGN (float64)."""
    from tests.functional.test_ggn import _build, dense_ggn

    if name == "transformer_layer" and backend == "forward_over_reverse":
        pytest.skip("the eval-mode encoder layer's fused kernel has no forward-mode derivative")
    model, split, batch = _build(name)
    ggn = dense_ggn(model, split, batch)
    _, gradient = _exact(model, split, batch)
    with HessianOperator(model, split, batch, curvature="ggn", backend=backend) as operator:
        found = operator.gradient()
    assert float((found - gradient).abs().max()) <= 1e-10 * max(float(gradient.abs().max()), 1)
    direction = torch.randn(ggn.shape[0], generator=torch.Generator().manual_seed(5)).double()
    exact = float(direction @ ggn @ direction / (direction @ direction))
    out = directional_curvature(model, split, batch, direction, curvature="ggn", backend=backend)
    assert abs(float(out.value) - exact) <= _tolerance(torch.float64, exact, ggn)
    batches = _halves(batch)
    quotients = []
    for part in batches:
        part_ggn = dense_ggn(model, split, part)
        _, g = _exact(model, split, part)
        quotients.append(float(g @ part_ggn @ g / (g @ g)))
    sharp = batch_sharpness(model, split, batches, curvature="ggn", backend=backend)
    expected = sum(quotients) / 2
    assert abs(float(sharp.estimate) - expected) <= _tolerance(torch.float64, expected, ggn)
