"""``curvature="ggn"``: the generalized Gauss–Newton matrix ``Jᵀ H_ℓ J`` against a dense one.

The reference is built here without the library: ``J`` by ``torch.func.jacrev`` of the
outputs in one flat parameter vector, ``H_ℓ`` by ``jacrev(grad(ℓ))`` in the flat outputs,
``G = Jᵀ H_ℓ J``, on the shared tiny cases (``cases.py``) in float64 and, rounded, in
float32 (the float64 GGN of the rounded weights is the reference there).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_curvature import (
    HessianOperator,
    OperatorOptions,
    OutputLoss,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
    spectral_density,
)
from lightning_curvature.functional.linalg.sampling import make_generator, rademacher
from lightning_curvature.functional.linalg.trace_estimators import hutchinson
from lightning_curvature.functional.model.batches import BatchList, map_tensors
from tests.functional.cases import (
    CASES,
    CASES_BY_NAME,
    assert_unchanged,
    cross_entropy,
    dense_hessian,
    dict_cross_entropy,
    half_squares,
    mse,
    seeded,
    snapshot,
    trainable,
)

CPU = torch.device("cpu")
EPS32 = torch.finfo(torch.float32).eps


def _pair(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    return model(batch[0]), batch[1]


def _from_dict(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    return model(batch["x"]), batch["y"]


def _squeezed(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    return model(batch[0]).squeeze(-1), batch[1]


def _half_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs - targets).pow(2).mean()


# Each case's loss, split at the model's outputs (the same loss: checked below).
SPLITS: dict[Callable[..., torch.Tensor], OutputLoss] = {
    cross_entropy: OutputLoss(_pair, F.cross_entropy),
    mse: OutputLoss(_pair, F.mse_loss),
    dict_cross_entropy: OutputLoss(_from_dict, F.cross_entropy),
    half_squares: OutputLoss(_squeezed, _half_mse),
}


def _build(name: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, OutputLoss, Any]:
    model, loss_fn, batch = CASES_BY_NAME[name].build()
    return model.to(dtype), SPLITS[loss_fn], _cast(batch, dtype)


def _cast(batch: Any, dtype: torch.dtype) -> Any:
    return map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)


def dense_ggn(model: nn.Module, split: OutputLoss, batch: Any) -> torch.Tensor:
    """``Jᵀ H_ℓ J`` in float64 over the trainable parameters, by ``torch.func`` alone."""
    model = copy.deepcopy(model).double()
    batch = _cast(batch, torch.float64)
    named = trainable(model)
    point = torch.cat([p.detach().reshape(-1) for _, p in named])

    class Outputs(nn.Module):
        def forward(self, b: Any) -> torch.Tensor:
            return split.output_fn(model, b)[0]

    wrapper = Outputs()
    wrapper.model = model  # type: ignore[assignment]

    def flat_outputs(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, p in named:
            params[f"model.{name}"] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        return torch.func.functional_call(wrapper, params, (batch,)).reshape(-1)

    with sdpa_kernel(SDPBackend.MATH):
        outputs, targets = split.output_fn(model, batch)
        shape = outputs.shape
        jacobian = torch.func.jacrev(flat_outputs)(point)
        loss_hessian = torch.func.jacrev(
            torch.func.grad(lambda z: split.loss(z.reshape(shape), targets))
        )(outputs.detach().reshape(-1))
    ggn = jacobian.T @ loss_hessian @ jacobian
    return ((ggn + ggn.T) / 2).detach()


@functools.cache
def reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 GGN of a case and its eigenvalues, largest first."""
    ggn = dense_ggn(*_build(name))
    return ggn, torch.linalg.eigvalsh(ggn).flip(0)


NAMES = [case.name for case in CASES]
# A GGN has rank at most (examples × outputs): its smallest eigenvalue is 0, to which no
# relative tolerance can certify it; what is checked is that it is not negative.
ZERO_SMALLEST = pytest.mark.filterwarnings("ignore:Lanczos did not certify λ_min")


@pytest.mark.parametrize("name", NAMES)
def test_the_split_is_the_same_loss(name: str) -> None:
    model, loss_fn, batch = CASES_BY_NAME[name].build()
    assert torch.equal(SPLITS[loss_fn](model, batch), loss_fn(model, batch))


def _operator_matrix(model: nn.Module, split: OutputLoss, batch: Any, **kwargs: Any) -> Any:
    with HessianOperator(model, split, batch, curvature="ggn", **kwargs) as operator:
        eye = torch.eye(operator.size, dtype=operator.dtype)
        return torch.stack([operator.matvec(column) for column in eye], dim=1)


@pytest.mark.parametrize("backend", ["auto", "double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("name", NAMES)
def test_products_are_the_dense_ggn_float64(name: str, backend: str) -> None:
    model, split, batch = _build(name)
    if backend == "forward_over_reverse" and name == "transformer_layer":
        pytest.skip("the fused attention kernel has no forward-mode derivative")
    measured = _operator_matrix(model, split, batch, backend=backend)
    ggn, _ = reference(name)
    scale = float(ggn.abs().max())
    assert torch.allclose(measured, ggn, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_products_are_the_dense_ggn_float32(name: str) -> None:
    model, split, batch = _build(name, torch.float32)
    measured = _operator_matrix(model, split, batch).double()
    ggn = dense_ggn(model, split, batch)  # of the rounded weights
    scale = float(ggn.abs().max())
    # float32 products: a few hundred roundings of the largest entry at most
    assert torch.allclose(measured, ggn, rtol=0, atol=300 * EPS32 * scale)


@ZERO_SMALLEST
@pytest.mark.parametrize("name", NAMES)
def test_top_eigenvalues_and_the_smallest_float64(name: str) -> None:
    model, split, batch = _build(name)
    _, eigenvalues = reference(name)
    out = hessian_eigenvalues(
        model, split, batch, k=3, tol=1e-8, smallest=True, curvature="ggn", max_iter=200
    )
    assert out.converged.all()
    lam1 = float(eigenvalues[0])
    assert torch.allclose(out.eigenvalues, eigenvalues[:3], rtol=1e-7, atol=1e-9 * lam1)
    # PSD: the smallest eigenvalue is 0 up to rounding, never negative beyond it
    assert float(eigenvalues[-1]) >= -1e-12 * lam1
    assert out.smallest_eigenvalue is not None
    assert float(out.smallest_eigenvalue) >= -1e-8 * lam1


@ZERO_SMALLEST
@pytest.mark.parametrize("name", NAMES)
def test_top_eigenvalues_float32(name: str) -> None:
    model, split, batch = _build(name, torch.float32)
    eigenvalues = torch.linalg.eigvalsh(dense_ggn(model, split, batch)).flip(0)
    out = hessian_eigenvalues(model, split, batch, k=2, smallest=True, curvature="ggn")
    lam1 = float(eigenvalues[0])
    assert out.eigenvalues.dtype == torch.float32
    for found, exact in zip(out.eigenvalues.tolist(), eigenvalues[:2].tolist(), strict=True):
        assert abs(found - exact) <= 1e-3 * abs(exact) + 64 * EPS32 * lam1
    assert out.smallest_eigenvalue is not None
    assert float(out.smallest_eigenvalue) >= -64 * EPS32 * lam1  # PSD up to float32 rounding


@ZERO_SMALLEST
def test_the_hessian_of_a_case_is_indefinite_where_its_ggn_is_not() -> None:
    """What the option is for: the tanh MLP's Hessian has a negative eigenvalue, its GGN none."""
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    hessian_low = hessian_eigenvalues(model, loss_fn, batch, smallest=True).smallest_eigenvalue
    ggn_low = hessian_eigenvalues(
        model, SPLITS[loss_fn], batch, smallest=True, curvature="ggn"
    ).smallest_eigenvalue
    assert hessian_low is not None
    assert ggn_low is not None
    assert float(hessian_low) < -1e-3
    assert float(ggn_low) >= -1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", NAMES)
def test_trace_is_hutchinson_on_the_dense_ggn(name: str, dtype: torch.dtype) -> None:
    model, split, batch = _build(name, dtype)
    ggn = dense_ggn(model, split, batch)
    out = hessian_trace(
        model, split, batch, num_hvps=8, curvature="ggn", generator=make_generator(CPU, 3)
    )
    same_probes = hutchinson(
        lambda v: (ggn @ v.double()).to(dtype),
        ggn.shape[0],
        8,
        make_generator(CPU, 3),
        dtype=dtype,
        device=CPU,
    )
    tolerance = 1e-10 if dtype == torch.float64 else 300 * EPS32
    scale = float(ggn.diagonal().abs().sum())
    assert float(out.estimate) == pytest.approx(same_probes.estimate, abs=tolerance * scale)
    assert float(out.std_error) == pytest.approx(same_probes.std_error, abs=tolerance * scale)
    exact = float(ggn.trace())
    assert abs(float(out.estimate) - exact) <= 4 * float(out.std_error) + tolerance * scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["mlp_tanh", "cnn_batchnorm_eval", "least_squares"])
def test_density_edges_and_quadrature_are_the_dense_ggns(name: str, dtype: torch.dtype) -> None:
    model, split, batch = _build(name, dtype)
    ggn = dense_ggn(model, split, batch)
    eigenvalues = torch.linalg.eigvalsh(ggn)
    size = ggn.shape[0]
    esd = spectral_density(model, split, batch, num_steps=size, num_runs=2, curvature="ggn")
    lam1 = float(eigenvalues[-1])
    tolerance = 1e-8 if dtype == torch.float64 else 1e-3
    assert float(esd.nodes.max()) == pytest.approx(lam1, rel=tolerance)
    assert float(esd.nodes.min()) >= -tolerance * lam1  # PSD: no node below 0
    weights, nodes = esd.weights.double(), esd.nodes.double()  # results: the model's dtype
    assert torch.allclose(weights.sum(1), torch.ones(2, dtype=torch.float64))
    # Gauss quadrature is exact for t ↦ t: Σ w θ = vᵀGv/‖v‖² for each run's Rademacher start
    generator = make_generator(CPU)  # the default generator the call drew its starts from
    starts = [rademacher((size,), generator, dtype, CPU).double() for _ in range(2)]
    forms = torch.stack([v @ ggn @ v / size for v in starts])
    assert torch.allclose((weights * nodes).sum(1), forms, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ggn_is_the_hessian_of_linear_least_squares(dtype: torch.dtype) -> None:
    """A model linear in its weights has no second-order term: G = H, at any point and at
    the minimum (the least-squares solution) in particular."""
    model, loss_fn, batch = CASES_BY_NAME["least_squares"].build()
    x, y = batch
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    with torch.no_grad():
        model.weight.copy_(solution[:-1].T)
        model.bias.copy_(solution[-1])
    model, batch = model.to(dtype), _cast(batch, dtype)
    gradient = torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))
    assert max(float(g.abs().max()) for g in gradient) < (1e-12 if dtype == torch.float64 else 1e-5)
    ggn = _operator_matrix(model, SPLITS[loss_fn], batch)
    hessian = dense_hessian(copy.deepcopy(model).double(), loss_fn, _cast(batch, torch.float64))
    tolerance = 1e-12 if dtype == torch.float64 else 64 * EPS32
    assert torch.allclose(
        ggn.double(), hessian, rtol=0, atol=tolerance * float(hessian.abs().max())
    )
    top = hessian_eigenvalues(model, SPLITS[loss_fn], batch, k=2, curvature="ggn").eigenvalues
    exact = hessian_eigenvalues(model, loss_fn, batch, k=2).eigenvalues
    assert torch.allclose(top, exact, rtol=1e-3)


def test_ggn_is_the_hessian_at_zero_residual_of_a_nonlinear_model() -> None:
    """Where the model fits its targets exactly the second-order term vanishes: G = H; away
    from there they differ (so the equality is not vacuous)."""
    with seeded(5):
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        x = torch.randn(6, 3, dtype=torch.float64)
    split = OutputLoss(_pair, F.mse_loss)
    fitted = (x, model(x).detach())  # zero residual
    hessian = dense_hessian(model, split, fitted)
    ggn = _operator_matrix(model, split, fitted)
    assert torch.allclose(ggn, hessian, rtol=0, atol=1e-12 * float(hessian.abs().max()))
    off = (x, torch.zeros(6, 2, dtype=torch.float64))
    difference = _operator_matrix(model, split, off) - dense_hessian(model, split, off)
    assert float(difference.abs().max()) > 1e-3


def test_keywords_and_options_give_the_same_result() -> None:
    model, split, batch = _build("mlp_gelu")
    options = OperatorOptions(curvature="ggn", parameters="0.*")
    by_keywords = hessian_trace(model, split, batch, num_hvps=6, curvature="ggn", parameters="0.*")
    by_options = hessian_trace(model, split, batch, num_hvps=6, options=options)
    assert torch.equal(by_keywords.estimate, by_options.estimate)
    assert by_options.num_parameters == 25  # the first layer only


def test_a_ggn_probe_leaves_the_model_as_it_was() -> None:
    model, loss_fn, batch = CASES_BY_NAME["cnn_batchnorm_eval"].build()
    before = snapshot(model)
    hessian_eigenvalues(model, SPLITS[loss_fn], batch, k=2, curvature="ggn", batch_norm="train")
    assert_unchanged(model, before)


def test_one_product_by_hessian_vector_product() -> None:
    model, split, batch = _build("mlp_tanh")
    ggn, _ = reference("mlp_tanh")
    with seeded(1):
        vector = torch.randn(ggn.shape[0], dtype=torch.float64)
    product = hessian_vector_product(model, split, batch, vector, curvature="ggn")
    assert isinstance(product, torch.Tensor)
    exact = ggn @ vector
    assert torch.allclose(product, exact, rtol=0, atol=1e-10 * float(exact.abs().max()))


def test_several_batches_average_by_size() -> None:
    model, split, batch = _build("mlp_tanh")
    x, y = batch
    whole = _operator_matrix(model, split, batch)
    parts = _operator_matrix(model, split, BatchList([(x[:3], y[:3]), (x[3:], y[3:])]))
    assert torch.allclose(parts, whole, rtol=0, atol=1e-12 * float(whole.abs().max()))


# -- refusals ----------------------------------------------------------------------------------
def test_ggn_without_a_split_loss_is_refused_naming_what_to_pass() -> None:
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    with pytest.raises(ValueError, match=r"curvature='ggn' needs .*`loss_fn=OutputLoss\("):
        hessian_eigenvalues(model, loss_fn, batch, curvature="ggn")


def test_an_unknown_curvature_is_refused() -> None:
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    with pytest.raises(ValueError, match=r"`curvature` must be one of \('hessian', 'ggn'\)"):
        hessian_trace(model, loss_fn, batch, curvature="fisher")  # type: ignore[arg-type]


def test_ggn_with_finite_differences_is_refused() -> None:
    model, split, batch = _build("mlp_tanh")
    with pytest.raises(ValueError, match=r"curvature='ggn' takes `backend` in .*'finite_diff"):
        spectral_density(model, split, batch, curvature="ggn", backend="finite_difference")


def test_options_and_keywords_together_are_refused() -> None:
    model, split, batch = _build("mlp_tanh")
    with pytest.raises(ValueError, match=r"either as `options` or as keywords.*`backend`"):
        hessian_trace(model, split, batch, options=OperatorOptions(), backend="double_backward")


def test_an_output_fn_that_returns_no_pair_is_refused() -> None:
    model, _, batch = _build("mlp_tanh")
    split = OutputLoss(lambda m, b: m(b[0]), F.cross_entropy)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match=r"`output_fn` must return a pair \(outputs, targets\)"):
        hessian_eigenvalues(model, split, batch, curvature="ggn")


def test_a_split_that_is_not_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="`loss` must be callable as loss"):
        OutputLoss(_pair, "cross_entropy")  # type: ignore[arg-type]
