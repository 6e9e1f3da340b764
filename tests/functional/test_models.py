"""Models people train: transformer, torch.compile, LSTM, train-mode BatchNorm, unused and
non-differentiable parameters, low precision."""

from __future__ import annotations

import copy
from collections import namedtuple
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.operator.hvp import hessian_vector_product
from lightning_curvature.functional.operator.operator import HessianOperator
from lightning_curvature.functional.trace import hessian_trace
from tests.functional.cases import (
    CASES_BY_NAME,
    DTYPE,
    assert_unchanged,
    batch_norm_dropout_case,
    batch_norm_dropout_hessian,
    cross_entropy,
    dense_hessian,
    reference,
    seeded,
    snapshot,
)

BACKENDS = ("auto", "retained_graph", "double_backward", "forward_over_reverse")
Pair = namedtuple("Pair", ["x", "y"])


def _vector(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(size, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformer_in_train_mode_probes_without_dropout(backend: str) -> None:
    """Dropout (also inside attention) is off during the probe and SDPA runs on its math
    kernel: the train-mode layer has the Hessian of the eval-mode one."""
    model, loss_fn, batch = CASES_BY_NAME["transformer_layer"].build()
    hessian, _ = reference("transformer_layer")
    model.train()
    vector = _vector(hessian.shape[0])
    product = hessian_vector_product(model, loss_fn, batch, vector, backend=backend)
    torch.testing.assert_close(product, hessian @ vector, atol=1e-10, rtol=0)
    assert model.training
    assert model.layer.dropout.training


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compiled_module_is_probed_through_its_original(compile_backend: str) -> None:
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    hessian, _ = reference("mlp_tanh")
    compiled = torch.compile(model, backend=compile_backend)
    assert compiled(batch[0]).shape == (8, 3)  # compiled once, as training would
    before = snapshot(model)
    vector = _vector(hessian.shape[0])
    for backend in ("auto", "double_backward"):
        product = hessian_vector_product(compiled, loss_fn, batch, vector, backend=backend)
        torch.testing.assert_close(product, hessian @ vector, atol=1e-10, rtol=0)
    top = hessian_eigenvalues(compiled, loss_fn, batch, tol=1e-10, max_iter=hessian.shape[0])
    assert float(top.eigenvalues[0]) == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]))
    assert_unchanged(model, before)


def test_compiled_submodule_runs_eagerly_in_the_probe() -> None:
    """A submodule compiled with aot_autograd has no double backward; the probe makes it
    run eagerly, after a compiled training step wrote its gradients."""
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    hessian, _ = reference("mlp_tanh")
    model[0] = torch.compile(model[0], backend="aot_eager")
    loss_fn(model, batch).backward()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True)
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        torch.autograd.grad(grads, params, grad_outputs=[torch.ones_like(p) for p in params])
    before = snapshot(model)
    vector = _vector(hessian.shape[0])
    product = hessian_vector_product(model, loss_fn, batch, vector)
    torch.testing.assert_close(product, hessian @ vector, atol=1e-10, rtol=0)
    assert_unchanged(model, before)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def _recurrent(dtype: torch.dtype) -> tuple[nn.Module, Any]:
    with seeded(4):
        model = Recurrent().to(dtype)
        batch = (torch.randn(4, 5, 3, dtype=dtype), torch.randint(0, 2, (4,)))
    return model, batch


def test_lstm_hvp_is_exact() -> None:
    model, batch = _recurrent(DTYPE)
    hessian = dense_hessian(model, cross_entropy, batch)
    vector = _vector(hessian.shape[0])
    for backend in ("auto", "retained_graph", "double_backward"):
        product = hessian_vector_product(model, cross_entropy, batch, vector, backend=backend)
        torch.testing.assert_close(product, hessian @ vector, atol=1e-10, rtol=0)


def test_lstm_float32_has_no_forward_mode_but_auto_works() -> None:
    """The float32 CPU LSTM kernel (mkldnn) has no forward-mode derivative."""
    model, batch = _recurrent(torch.float32)
    with (
        pytest.raises(RuntimeError, match="backend='forward_over_reverse' cannot pass"),
        HessianOperator(model, cross_entropy, batch, backend="forward_over_reverse") as op,
    ):
        op.matvec(torch.ones(op.size))
    exact_model = copy.deepcopy(model).to(DTYPE)
    exact_batch = (batch[0].to(DTYPE), batch[1])
    hessian = dense_hessian(exact_model, cross_entropy, exact_batch)
    vector = _vector(hessian.shape[0])
    with HessianOperator(model, cross_entropy, batch) as op:
        product = op.matvec(vector.float())
        assert op.backend == "retained_graph"
        assert op.dtype == torch.float32
    torch.testing.assert_close(product.double(), hessian @ vector, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_train_mode_is_the_exact_batch_statistics_hessian(backend: str) -> None:
    model, loss_fn, batch = batch_norm_dropout_case()
    hessian = batch_norm_dropout_hessian(model, batch)
    before = snapshot(model)
    vectors = torch.stack([_vector(hessian.shape[0], s) for s in range(2)])
    with HessianOperator(model, loss_fn, batch, backend=backend) as op:
        products = torch.stack([op.matvec(v) for v in vectors])
    torch.testing.assert_close(products, vectors @ hessian, atol=1e-10, rtol=0)
    assert_unchanged(model, before)


def test_batch_norm_train_eigenvalues_and_trace() -> None:
    model, loss_fn, batch = batch_norm_dropout_case()
    hessian = batch_norm_dropout_hessian(model, batch)
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    top = hessian_eigenvalues(model, loss_fn, batch, k=3, tol=1e-10, max_iter=hessian.shape[0])
    torch.testing.assert_close(top.eigenvalues, exact[:3], atol=1e-8, rtol=0)
    # batch_norm="eval" measures another function: the running-statistics one.
    other = hessian_eigenvalues(
        model, loss_fn, batch, k=1, tol=1e-10, max_iter=hessian.shape[0], batch_norm="eval"
    )
    assert abs(float(other.eigenvalues[0]) - float(exact[0])) > 1e-3


class WithUnusedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.auxiliary = nn.Linear(4, 2)  # not in the loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_unused_parameters_have_zero_rows() -> None:
    with seeded(8):
        model = WithUnusedHead().to(DTYPE)
        batch = (torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,)))
    used = 4 * 3 + 3
    size = used + 4 * 2 + 2
    full = torch.zeros(size, size, dtype=DTYPE)
    full[:used, :used] = dense_hessian(nn.Sequential(model.body), cross_entropy, batch)
    for backend in BACKENDS:
        for seed in range(2):
            vector = _vector(size, seed)
            product = hessian_vector_product(model, cross_entropy, batch, vector, backend=backend)
            torch.testing.assert_close(product, full @ vector, atol=1e-12, rtol=0)
            assert torch.equal(product[used:], torch.zeros(size - used, dtype=DTYPE))
    traced = hessian_trace(model, cross_entropy, batch, num_hvps=4, per_layer=True)
    assert float(traced.per_layer["auxiliary"]) == 0.0


class Bag(nn.Module):
    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4, mode=mode)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(tokens))


class EmbeddingMean(Bag):
    """The same function as ``Bag`` (mean mode), through ``F.embedding``: twice differentiable."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(F.embedding(tokens, self.bag.weight).mean(dim=1))


def _bag(mode: str = "mean") -> tuple[nn.Module, Any]:
    with seeded(9):
        model = Bag(mode).to(DTYPE)
        batch = (torch.randint(0, 10, (5, 3)), torch.randint(0, 2, (5,)))
    return model, batch


# "auto" falls back to finite differences there (test_auto_falls_back_to_finite_differences).
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "auto"])
def test_module_without_double_backward_gets_one_clear_error(backend: str) -> None:
    model, batch = _bag()
    before = snapshot(model)
    with pytest.raises(
        RuntimeError, match=r"(?s)cannot pass through this model.*'bag' \(EmbeddingBag\)"
    ):
        hessian_eigenvalues(model, cross_entropy, batch, backend=backend)
    assert_unchanged(model, before)


def test_auto_falls_back_to_finite_differences() -> None:
    """No double backward and no forward mode through the bag: the central difference of
    two gradients, against the Hessian of the same function written with ``F.embedding``."""
    model, batch = _bag()
    twin = EmbeddingMean().to(DTYPE)
    twin.load_state_dict(model.state_dict())
    hessian = dense_hessian(twin, cross_entropy, batch)
    v = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    before = snapshot(model)
    with HessianOperator(model, cross_entropy, batch) as operator:
        with pytest.warns(CurvatureWarning, match="runs 'finite_difference' for this") as said:
            product = operator.matvec(v)
        assert operator.backend == "finite_difference"
    assert len(said) == 1  # once, naming the backend that ran (not forward-over-reverse too)
    assert "_embedding_bag_backward" in str(said[0].message)
    assert operator.fallback.startswith("finite_difference: it has neither a double backward")
    assert float((product - hessian @ v).norm() / (hessian @ v).norm()) <= 1e-7
    assert_unchanged(model, before)


def test_auto_error_tells_every_backend() -> None:
    """A max-mode bag is piecewise linear: no finite differences either, and the error says
    what each backend found."""
    model, batch = _bag("max")
    with pytest.raises(RuntimeError, match="backend='auto' tried 'retained_graph' first") as info:
        hessian_trace(model, cross_entropy, batch, num_hvps=2)
    assert "_embedding_bag_backward" in str(info.value)
    assert "cannot fall back" in str(info.value)
    assert "'bag' (EmbeddingBag)" in str(info.value)


def test_excluding_the_bag_weights_measures_the_rest() -> None:
    model, batch = _bag()
    frozen = copy.deepcopy(model)
    frozen.bag.weight.requires_grad_(False)
    hessian = dense_hessian(frozen, cross_entropy, batch)
    out = hessian_eigenvalues(
        model, cross_entropy, batch, k=2, tol=1e-10, max_iter=hessian.shape[0], parameters="head.*"
    )
    torch.testing.assert_close(out.eigenvalues, torch.linalg.eigvalsh(hessian).flip(0)[:2])
    assert out.parameter_names == ("head.weight", "head.bias")


def test_low_precision_parameters_are_probed_in_float32() -> None:
    """bf16 parameters and inputs are promoted to float32 copies; autocast outside is off."""
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    half = copy.deepcopy(model).to(torch.bfloat16)
    half_batch = (batch[0].to(torch.bfloat16), batch[1])
    exact_model = copy.deepcopy(half).to(DTYPE)
    hessian = dense_hessian(exact_model, loss_fn, (half_batch[0].to(DTYPE), batch[1]))
    vector = _vector(hessian.shape[0]).float()
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        HessianOperator(half, loss_fn, half_batch) as op,
    ):
        assert op.dtype == torch.float32
        product = op.matvec(vector)
    assert product.dtype == torch.float32
    torch.testing.assert_close(product.double(), hessian @ vector.double(), atol=1e-5, rtol=1e-5)
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in half.parameters())


class OnceDifferentiableCube(torch.autograd.Function):
    """x³ whose backward is first-order only (as many fused kernels are)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * tangent


class CubeGradient(torch.autograd.Function):
    """``3x²·g`` with a forward-mode derivative but no backward."""

    @staticmethod
    def forward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return 3 * x**2 * grad

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx: Any, x_tangent: torch.Tensor, grad_tangent: torch.Tensor) -> torch.Tensor:
        x, grad = ctx.saved_tensors
        return 6 * x * grad * x_tangent + 3 * x**2 * grad_tangent


class ForwardModeCube(OnceDifferentiableCube):
    """x³ whose backward has no backward of its own, but a forward-mode derivative."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return CubeGradient.apply(x, grad)


class CubeNet(nn.Module):
    def __init__(self, cube: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.first = nn.Linear(3, 2)
        self.head = nn.Linear(2, 1)
        self.cube = cube

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cube.apply(self.first(x)))


class PlainCubeNet(CubeNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.first(x) ** 3)


def _cube_net(cube: type[torch.autograd.Function]) -> tuple[nn.Module, Any]:
    with seeded(12):
        model = CubeNet(cube).to(DTYPE)
        batch = (torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 1, dtype=DTYPE))
    return model, batch


def _cube_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _cube_hessian(model: nn.Module, batch: Any) -> torch.Tensor:
    """Dense Hessian of the same network with an ordinary (twice differentiable) cube."""
    plain = PlainCubeNet(OnceDifferentiableCube).to(DTYPE)
    plain.load_state_dict(model.state_dict())
    return dense_hessian(plain, _cube_loss, batch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_once_differentiable_function_is_an_error_not_a_zero(backend: str) -> None:
    """Its backward builds no graph: double backward would silently return a Hessian
    without the terms through it (forward-over-reverse too, here: zero rows for
    ``first``), so every backend refuses."""
    model, batch = _cube_net(OnceDifferentiableCube)
    with pytest.raises(RuntimeError, match="OnceDifferentiableCube has a @once_differentiable"):
        hessian_vector_product(model, _cube_loss, batch, _vector(11), backend=backend)


def test_auto_falls_back_to_forward_over_reverse() -> None:
    """No second backward through ForwardModeCube, but forward mode passes: auto switches."""
    model, batch = _cube_net(ForwardModeCube)
    hessian = _cube_hessian(model, batch)
    vectors = torch.stack([_vector(hessian.shape[0], s) for s in range(2)])
    with HessianOperator(model, _cube_loss, batch) as op:
        with pytest.warns(CurvatureWarning, match="runs 'forward_over_reverse'.*no double"):
            first = op.matvec(vectors[0])
        products = torch.stack([first, op.matvec(vectors[1])])
        assert op.backend == "forward_over_reverse"
    assert op.fallback.startswith("forward_over_reverse: it has no double backward")
    torch.testing.assert_close(products, vectors @ hessian, atol=1e-10, rtol=0)
    with pytest.raises(RuntimeError, match="backend='retained_graph' cannot pass"):
        hessian_vector_product(model, _cube_loss, batch, vectors[0], backend="retained_graph")


def test_once_differentiable_function_before_unmeasured_parameters_is_fine() -> None:
    model, batch = _cube_net(OnceDifferentiableCube)
    head = _cube_hessian(model, batch)[-3:, -3:]
    vector = _vector(3)
    for backend in BACKENDS:
        product = hessian_vector_product(
            model, _cube_loss, batch, vector, parameters="head.*", backend=backend
        )
        torch.testing.assert_close(product, head @ vector, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_probe_runs_under_no_grad_and_inference_mode(mode: Any) -> None:
    """Called from validation hooks, and on a batch kept from one (inference tensors)."""
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    hessian, exact = reference("mlp_tanh")
    vector = _vector(hessian.shape[0])
    with mode():
        kept = tuple(t.clone() for t in batch)
        product = hessian_vector_product(model, loss_fn, kept, vector)
        top = hessian_eigenvalues(model, loss_fn, kept, tol=1e-10, max_iter=hessian.shape[0])
    torch.testing.assert_close(product, hessian @ vector, atol=1e-10, rtol=0)
    assert float(top.eigenvalues[0]) == pytest.approx(float(exact[0]), rel=1e-8)
    product = hessian_vector_product(model, loss_fn, kept, vector)  # outside the mode too
    torch.testing.assert_close(product, hessian @ vector, atol=1e-10, rtol=0)


def test_low_precision_model_with_a_namedtuple_batch() -> None:
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    half = copy.deepcopy(model).to(torch.bfloat16)
    pair = Pair(batch[0].to(torch.bfloat16), batch[1])
    hessian = dense_hessian(copy.deepcopy(half).to(DTYPE), loss_fn, (pair.x.to(DTYPE), pair.y))
    vector = _vector(hessian.shape[0])

    def named_loss(m: nn.Module, b: Pair) -> torch.Tensor:
        return loss_fn(m, (b.x, b.y))

    product = hessian_vector_product(half, named_loss, pair, vector.float())
    torch.testing.assert_close(product.double(), hessian @ vector, atol=1e-5, rtol=1e-5)
