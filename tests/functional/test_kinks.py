"""Kinked models in float32: every backend returns the Hessian or refuses, naming the cause.

The cases of :mod:`tests.functional.kinked` (a clamp, an L1 loss, ``nn.Hardsigmoid``,
``nn.Hardswish``, ``nn.ELU(alpha=2)``, a top-2 mixture of experts near a tie), each with
one value 1e-4 from its kink. Before the self-check, finite differences returned products
12x-620x off there with no warning. Now every backend, and ``"auto"``, either returns
values within the documented float32 tolerance of the float64 dense Hessian (products 1e-3,
eigenvalues ``tol`` = 1e-3) or raises, naming the op; and the self-check alone (the module
and graph lists switched off) refuses every kinked finite difference it returns no value
for, and lets through only values within that tolerance.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch

from lightning_curvature.errors import CurvatureCheckError, CurvatureWarning
from lightning_curvature.functional.density import spectral_density
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.operator import kinks
from lightning_curvature.functional.operator.backends import BACKENDS
from lightning_curvature.functional.operator.hvp import hessian_vector_product
from lightning_curvature.functional.trace import hessian_trace
from tests.functional.kinked import KINKS, NAMED, kinked_case, kinked_hessian, twin

TOL = 1e-3  # float32: products (finite_difference.py) and eigenvalues (tol)
# Where no backend can return the Hessian: finite differences cross every kink here, and
# nn.Hardsigmoid has no second derivative in torch (nor forward mode).
REFUSED = {(name, "finite_difference") for name in KINKS} | {
    ("hardsigmoid", backend) for backend in BACKENDS
}
# What the refusal names, by backend (the op itself, or torch's missing derivative).
_CAUSE = {**NAMED, "hardsigmoid": "hardsigmoid"}


def _vector(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


def _trace(model: Any, loss_fn: Any, batch: Any, backend: str) -> float:
    generator = torch.Generator().manual_seed(3)
    out = hessian_trace(model, loss_fn, batch, num_hvps=8, backend=backend, generator=generator)  # type: ignore[arg-type]
    return float(out.estimate)


def _measure(name: str, backend: str, delta: float = 1e-4) -> dict[str, float] | Exception:
    """λ₁, H·v's error and the trace's error against the exact twin, or the refusal."""
    model, loss_fn, batch = kinked_case(name, delta=delta)
    hessian = kinked_hessian(name, delta=delta)
    v = _vector(hessian.shape[0])
    exact_product = hessian @ v.double()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CurvatureWarning)  # auto's fallback is said once
            top = hessian_eigenvalues(model, loss_fn, batch, backend=backend)  # type: ignore[arg-type]
            trace = _trace(model, loss_fn, batch, backend)
            product = hessian_vector_product(model, loss_fn, batch, v, backend=backend)  # type: ignore[arg-type]
    except (CurvatureCheckError, ValueError, RuntimeError) as refusal:
        return refusal
    assert isinstance(product, torch.Tensor)
    reference_trace = _trace(*twin(name, delta=delta), "double_backward")
    return {
        "eigenvalue": abs(float(top.eigenvalues[0]) - float(torch.linalg.eigvalsh(hessian)[-1]))
        / abs(float(torch.linalg.eigvalsh(hessian)[-1])),
        "product": float((product.double() - exact_product).norm() / exact_product.norm()),
        "trace": abs(trace - reference_trace) / abs(reference_trace),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", KINKS)
def test_every_backend_returns_the_hessian_or_refuses_naming_the_cause(
    name: str, backend: str
) -> None:
    found = _measure(name, backend)
    if (name, backend) in REFUSED:
        assert isinstance(found, Exception), found
        assert re.search(_CAUSE[name], str(found), re.IGNORECASE), str(found)
        return
    assert not isinstance(found, Exception), found
    assert max(found.values()) <= TOL, found


def test_the_self_check_names_top_k_routing_and_the_way_out() -> None:
    """No list has top-k (a mixture of experts is smooth away from ties): the self-check
    finds the tie, names the suspect op of the graph and an exact backend as the way out."""
    model, loss_fn, batch = kinked_case("moe")
    with pytest.raises(CurvatureCheckError) as refusal:
        hessian_eigenvalues(model, loss_fn, batch, backend="finite_difference")
    message = str(refusal.value)
    assert "failed their self-check" in message
    assert "TopkBackward0" in message
    assert "backend='double_backward'" in message
    assert "rounding of the dtype" not in message


@pytest.fixture
def without_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module and graph lists switched off: the self-check alone stands guard."""
    monkeypatch.setattr(kinks, "_kink", lambda node: None)
    monkeypatch.setattr(kinks, "_kinked_module", lambda module: False)


@pytest.mark.usefixtures("without_lists")
@pytest.mark.parametrize("delta", [1e-4, 1e-3])
@pytest.mark.parametrize("name", KINKS)
def test_the_self_check_alone_never_lets_a_wrong_value_through(name: str, delta: float) -> None:
    """Nearer (1e-4) every kinked estimate is refused; at 1e-3 some segments miss the kink,
    and whatever is returned is within the float32 tolerance."""
    model, loss_fn, batch = kinked_case(name, delta=delta)
    hessian = kinked_hessian(name, delta=delta)
    exact = float(torch.linalg.eigvalsh(hessian)[-1])
    estimates = {
        "eigenvalue": lambda: float(
            hessian_eigenvalues(model, loss_fn, batch, backend="finite_difference").eigenvalues[0]
        ),
        "trace": lambda: _trace(model, loss_fn, batch, "finite_difference"),
        "density": lambda: float(
            spectral_density(model, loss_fn, batch, backend="finite_difference").nodes.max()
        ),
    }
    references = {
        "eigenvalue": exact,
        "trace": _trace(*twin(name, delta=delta), "double_backward"),
        "density": exact,  # the largest node of 80 Lanczos steps on a 40-80 parameter model
    }
    refused, refusals = [], []
    for what, estimate in estimates.items():
        try:
            value = estimate()
        except CurvatureCheckError as refusal:
            refused.append(what)
            refusals.append(str(refusal))
            continue
        assert abs(value - references[what]) <= TOL * abs(references[what]), (what, value)
    assert all("failed their self-check" in message for message in refusals)
    if delta == 1e-4:
        assert refused == list(estimates)
