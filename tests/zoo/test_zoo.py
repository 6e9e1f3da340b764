"""The library on architectures nobody here wrote, in float32, against float64 references.

Every model is random-initialised from a tiny config (``zoo.py``) and measured in float32,
in train mode, the way the monitors see it during training; each reference is computed
independently in float64 on a copy with the same weights (``reference.py``): the dense
Hessian built column by column from double-backward products where the model has at most
3,000 parameters, otherwise scipy's ``eigsh`` (``tol=1e-10``) on the same product.
Tolerances follow from the dtype: ``1e-3·|λ_i|`` (the requested ``tol``) plus
``100·eps₃₂·λ₁`` of float32 rounding.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Any

import pytest
import torch

from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional import (
    gradient_coherence,
    hessian_eigenvalues,
    hessian_trace,
)
from lightning_curvature.functional.linalg import basis
from lightning_curvature.functional.operator.hvp import hessian_vector_product
from tests.zoo import zoo
from tests.zoo.reference import D, Reference, flat_gradient, measured

EPS32 = torch.finfo(torch.float32).eps
DENSE_LIMIT = 3000
MODELS = list(zoo.BUILDERS)


@functools.cache
def case(name: str) -> zoo.ZooCase:
    return zoo.BUILDERS[name]()


@functools.cache
def reference(name: str) -> tuple[torch.Tensor, float, float]:
    """Top-3 eigenvalues, trace and the trace's standard error (0 when exact)."""
    ref = Reference(case(name))
    if ref.size <= DENSE_LIMIT:
        hessian = ref.dense()
        return torch.linalg.eigvalsh(hessian).flip(0)[:3], float(hessian.trace()), 0.0
    trace, error = ref.hutchinson(probes=200)
    return ref.top_eigenvalues(3), trace, error


def test_the_zoo_covers_both_kinds_of_reference() -> None:
    """At least one model is checked against eigsh (> 3k parameters), the rest densely."""
    ref = Reference(case("litgpt_eigsh"))
    assert ref.size > DENSE_LIMIT
    for name in ("gpt2_eager", "bert", "litgpt", "demo_transformer", "demo_lstm"):
        assert Reference(case(name)).size <= DENSE_LIMIT, name


def _assert_close_to_reference(values: torch.Tensor, exact: torch.Tensor, tol: float) -> None:
    bound = tol * exact.abs() + 100 * EPS32 * exact[0].abs()
    error = (values.to("cpu", D) - exact).abs()
    assert bool((error <= bound).all()), (values.tolist(), exact.tolist(), error.tolist())


@pytest.mark.parametrize("name", MODELS)
def test_top3_eigenvalues(name: str) -> None:
    model = case(name)
    exact, _, _ = reference(name)
    out = hessian_eigenvalues(
        model.model, model.loss_fn, model.batch, k=3, max_iter=150, parameters=model.parameters
    )
    assert out.eigenvalues.dtype == torch.float32
    assert out.converged.tolist() == [True, True, True]
    _assert_close_to_reference(out.eigenvalues, exact, 1e-3)


@pytest.mark.parametrize("name", MODELS)
def test_converged_flags_are_honest_at_the_default_budget(name: str) -> None:
    """With the default ``max_iter`` every value flagged converged is within ``tol``."""
    model = case(name)
    exact, _, _ = reference(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)  # an honest "not converged"
        out = hessian_eigenvalues(
            model.model, model.loss_fn, model.batch, k=3, parameters=model.parameters
        )
    flagged = out.converged.cpu()
    _assert_close_to_reference(
        torch.where(flagged, out.eigenvalues.cpu().double(), exact), exact, 1e-3
    )


@pytest.mark.parametrize("name", MODELS)
def test_trace_within_three_standard_errors(name: str) -> None:
    model = case(name)
    _, exact, exact_error = reference(name)
    out = hessian_trace(model.model, model.loss_fn, model.batch, parameters=model.parameters)
    assert out.num_hvps == 32
    error = math.hypot(float(out.std_error), exact_error)
    assert 0 < error < math.inf
    assert abs(float(out.estimate) - exact) <= 3 * error, (float(out.estimate), exact, error)


def _example(batch: Any, i: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[i : i + 1]
    if isinstance(batch, dict):
        return {key: _example(value, i) for key, value in batch.items()}
    return type(batch)(_example(item, i) for item in batch)


def brute_force_coherence(model: zoo.ZooCase) -> float:
    """``‖Σ g_i‖² / Σ ‖g_i‖²`` from one float64 backward per example."""
    ref = Reference(model)
    grads = [
        flat_gradient(ref.model, ref.loss_fn, _example(ref.batch, i), ref.params, False)
        for i in range(zoo.BATCH)
    ]
    stacked = torch.stack(grads)
    return float(stacked.sum(0).pow(2).sum() / stacked.pow(2).sum())


# Per-example gradients need uncoupled examples: ResNet's train-mode BatchNorm couples them
# (gradient_coherence then uses micro-batches by design); litgpt_eigsh adds nothing here.
COHERENCE_MODELS = [name for name in MODELS if name not in ("litgpt_eigsh", "torchvision_resnet18")]


@pytest.mark.parametrize("name", COHERENCE_MODELS)
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # LSTM in vmap
def test_coherence_against_a_per_example_loop(name: str) -> None:
    model = zoo.BUILDERS[name]()  # its own copy, referenced first: see the next test
    exact = brute_force_coherence(model)
    out = gradient_coherence(model.model, model.loss_fn, model.batch, parameters=model.parameters)
    assert out.mode == "per_example"
    assert out.num_samples == zoo.BATCH
    assert float(out.coherence) == pytest.approx(exact, rel=1e-4)


def test_per_example_gradients_leave_no_functorch_tensor_in_the_model() -> None:
    """The demo Transformer builds its positional table lazily, in its first forward; a
    coherence probe at step 0 runs before any training forward."""
    model = zoo.demo_transformer()
    gradient_coherence(model.model, model.loss_fn, model.batch)
    wrapped = [
        name
        for name, value in vars(model.model.pos_encoder).items()
        if isinstance(value, torch.Tensor)
        and torch._C._functorch.is_functorch_wrapped_tensor(value)
    ]
    assert wrapped == []
    copy.deepcopy(model.model)


@pytest.mark.parametrize("name", ["gpt2_eager", "bert"])
def test_dense_reference_matches_central_finite_differences(name: str) -> None:
    """Double backward through LayerNorm (where torch.func.hessian is wrong in torch 2.13)
    agrees with central differences of the gradient along random directions."""
    ref = Reference(case(name))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(ref.size, dtype=D, generator=generator)
        product = ref.hvp(v)
        difference = ref.finite_difference(v, step=1e-6)
        assert float((product - difference).norm()) <= 1e-6 * float(product.norm())


DROPOUT_CASES = {
    "gpt2_eager": lambda: zoo.gpt2("eager", dropout=0.1),
    "gpt2_sdpa": lambda: zoo.gpt2("sdpa", dropout=0.1),
    "bert": lambda: zoo.bert(dropout=0.1),
    "demo_transformer": lambda: zoo.demo_transformer(dropout=0.2),
    "demo_lstm": lambda: zoo.demo_lstm(dropout=0.2),
    "timm_vit": lambda: zoo.timm_vit(drop_path=0.1),
}


@pytest.mark.parametrize("name", list(DROPOUT_CASES))
def test_probes_see_the_model_without_dropout(name: str) -> None:
    """A train-mode model with dropout: the probe's product is the eval-mode Hessian's."""
    model = DROPOUT_CASES[name]()
    ref = Reference(model, eval_mode=True)
    v = torch.randn(ref.size, dtype=D, generator=torch.Generator().manual_seed(0))
    expected = ref.hvp(v)
    for _ in range(2):  # the same operator every time, not one dropout mask
        product = hessian_vector_product(
            model.model, model.loss_fn, model.batch, v.float(), parameters=model.parameters
        )
        assert isinstance(product, torch.Tensor)
        error = float((product.double() - expected).norm())
        assert error <= 1e-4 * float(expected.norm()), error / float(expected.norm())
    assert model.model.training


def test_gpt2_ties_its_embeddings_and_both_attentions_agree() -> None:
    """Tied weights count once; eager and sdpa attention give one Hessian."""
    eager, sdpa = case("gpt2_eager"), case("gpt2_sdpa")
    names = [n for n, _ in eager.model.named_parameters()]
    assert "lm_head.weight" not in names
    assert len(measured(eager.model, None)) == len(names)
    v = torch.randn(Reference(eager).size, generator=torch.Generator().manual_seed(1))
    products = [hessian_vector_product(c.model, c.loss_fn, c.batch, v) for c in (eager, sdpa)]
    torch.testing.assert_close(products[0], products[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_top3_with_the_basis_held_to_a_few_rows(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a model above ``FULL_BASIS_ENTRIES``: thick restarts at the fewest rows for
    k = 3 (14), every certificate kept, the same values within tol."""
    monkeypatch.setattr(basis, "FULL_BASIS_ENTRIES", 1)
    model = case(name)
    exact, _, _ = reference(name)
    out = hessian_eigenvalues(
        model.model, model.loss_fn, model.batch, k=3, max_iter=150, parameters=model.parameters
    )
    assert out.num_hvps > basis.thick_restart(3, False, 1).rows  # it did restart
    assert out.converged.tolist() == [True, True, True]
    _assert_close_to_reference(out.eigenvalues, exact, 1e-3)


@pytest.mark.parametrize("name", MODELS)
def test_lambda1_on_the_two_row_window(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a model above ``FULL_BASIS_ENTRIES`` without eigenvectors: the recurrence's two
    rows in one ring, float32, cold to the miss probability, λ₁ certified within tol."""
    monkeypatch.setattr(basis, "FULL_BASIS_ENTRIES", 1)
    model = case(name)
    exact, _, _ = reference(name)
    out = hessian_eigenvalues(
        model.model, model.loss_fn, model.batch, max_iter=100, parameters=model.parameters
    )
    assert out.converged.tolist() == [True]
    _assert_close_to_reference(out.eigenvalues, exact[:1], 1e-3)
