"""``probe_context`` writes a BatchNorm on running statistics out as its per-channel map.

The map ``x·s + t`` is the same function as ``batch_norm`` in eval mode, with a cheaper
double backward; these tests hold it to the native output and Hessian-vector product, check
which modules get it, and that nothing of it is left after the probe.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_curvature.errors import CurvatureCheckError
from lightning_curvature.functional.model.probe import probe_context
from lightning_curvature.functional.operator.hvp import hessian_vector_product
from lightning_curvature.functional.operator.operator import HessianOperator
from tests.functional.cases import assert_unchanged, seeded, snapshot


def _with_statistics(module: nn.modules.batchnorm._BatchNorm) -> nn.modules.batchnorm._BatchNorm:
    with seeded(3), torch.no_grad():
        module.running_mean.normal_()  # type: ignore[union-attr]
        module.running_var.uniform_(0.3, 3.0)  # type: ignore[union-attr]
        if module.weight is not None:
            module.weight.normal_()
            module.bias.normal_()  # type: ignore[union-attr]
    return module.to(torch.float64).eval()


NORMS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "bn1d_2d_input": (lambda: nn.BatchNorm1d(3), (5, 3)),
    "bn1d_3d_input": (lambda: nn.BatchNorm1d(3), (5, 3, 4)),
    "bn2d": (lambda: nn.BatchNorm2d(3), (5, 3, 4, 4)),
    "bn3d": (lambda: nn.BatchNorm3d(3), (2, 3, 2, 3, 2)),
    "bn2d_no_affine": (lambda: nn.BatchNorm2d(3, affine=False), (5, 3, 4, 4)),
    "sync_bn_eval": (lambda: nn.SyncBatchNorm(3), (5, 3, 4, 4)),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_the_map_equals_batch_norm_on_running_statistics(name: str) -> None:
    build, shape = NORMS[name]
    norm = _with_statistics(build())
    with seeded(4):
        x = torch.randn(shape, dtype=torch.float64)
    native = norm(x)
    with probe_context(norm):
        assert "forward" in vars(norm)
        written_out = norm(x)
    assert "forward" not in vars(norm)
    torch.testing.assert_close(written_out, native, rtol=1e-13, atol=1e-13)


def _conv_bn(batch_norm_mode: str) -> tuple[nn.Module, Any, Any]:
    with seeded(0):
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 2),
        ).to(torch.float64)
        batch = (torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 2, (6,)))
    _with_statistics(model[1])
    model.train() if batch_norm_mode == "train" else model.eval()

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    return model, loss_fn, batch


def _native_hvp(model: nn.Module, loss_fn: Any, batch: Any, vector: torch.Tensor) -> torch.Tensor:
    """The Hessian-vector product through ``batch_norm`` itself (no probe context)."""
    params = [p for p in model.parameters()]
    with torch.random.fork_rng():
        grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True)
        pieces = vector.split([p.numel() for p in params])
        hv = torch.autograd.grad(
            grads, params, [v.view_as(p) for v, p in zip(pieces, params, strict=True)]
        )
    return torch.cat([h.flatten() for h in hv])


@pytest.mark.parametrize("backend", ["retained_graph", "double_backward", "forward_over_reverse"])
def test_products_through_the_map_equal_those_through_batch_norm(backend: str) -> None:
    model, loss_fn, batch = _conv_bn("eval")
    size = sum(p.numel() for p in model.parameters())
    with seeded(5):
        vector = torch.randn(size, dtype=torch.float64)
    before = snapshot(model)
    product = hessian_vector_product(model, loss_fn, batch, vector, backend=backend)
    assert_unchanged(model, before)
    torch.testing.assert_close(
        product, _native_hvp(model, loss_fn, batch, vector), rtol=1e-10, atol=1e-12
    )


def test_only_batch_norms_on_running_statistics_are_written_out() -> None:
    class CustomNorm(nn.BatchNorm1d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    on_running = nn.BatchNorm1d(3).eval()
    on_batch = nn.BatchNorm1d(3).train()
    untracked = nn.BatchNorm1d(3, track_running_stats=False).eval()  # batch statistics
    custom = CustomNorm(3).eval()
    model = nn.Sequential(on_running, on_batch, untracked, custom)
    with probe_context(model):
        written = [name for name, m in model.named_modules() if "forward" in vars(m)]
    assert written == ["0"]
    with probe_context(model, batch_norm="eval"):
        written = [name for name, m in model.named_modules() if "forward" in vars(m)]
    assert written == ["0", "1"]  # train-mode BatchNorm told to use its running statistics
    assert not any("forward" in vars(m) for m in model.modules())


def test_hooks_run_and_a_bad_input_is_refused_as_by_batch_norm() -> None:
    norm = _with_statistics(nn.BatchNorm1d(3))
    seen: list[torch.Size] = []
    norm.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with probe_context(norm):
        norm(torch.ones(4, 3, dtype=torch.float64))
        with pytest.raises(ValueError, match="expected 2D or 3D input"):
            norm(torch.ones(4, 3, 2, 2, dtype=torch.float64))
    assert seen == [torch.Size([4, 3])]


def test_a_user_instance_forward_is_kept() -> None:
    norm = _with_statistics(nn.BatchNorm1d(3))
    own = norm.forward
    vars(norm)["forward"] = own
    with probe_context(norm):
        assert vars(norm)["forward"] is own
    assert vars(norm)["forward"] is own


def test_bfloat16_batch_norm_is_written_out_in_float32() -> None:
    """bf16 running statistics reach the map as the operator's float32 copies."""
    model, loss_fn, batch = _conv_bn("eval")
    half = model.to(torch.bfloat16)
    half_batch = (batch[0].to(torch.bfloat16), batch[1])
    exact = copy.deepcopy(half).to(torch.float64)
    size = sum(p.numel() for p in half.parameters())
    with seeded(6):
        vector = torch.randn(size, dtype=torch.float64)
    product = hessian_vector_product(half, loss_fn, half_batch, vector.float())
    assert product.dtype == torch.float32
    expected = _native_hvp(exact, loss_fn, (half_batch[0].to(torch.float64), batch[1]), vector)
    torch.testing.assert_close(product.double(), expected, rtol=1e-5, atol=1e-5)


# -- the whole model in eval: every form of dropout off, and no power iteration ---------------
def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training:
        return x
    keep = (torch.rand(x.shape[0], 1, 1, dtype=x.dtype) >= p).to(x.dtype)
    return x * keep / (1 - p)


class Stochastic(nn.Module):
    """Dropout in every form no isinstance check finds, and a spectral_norm."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6, dtype=torch.float64)
        self.mixed = nn.utils.parametrizations.spectral_norm(nn.Linear(6, 6, dtype=torch.float64))
        self.out = nn.Linear(6, 1, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))  # (B, T, 6)
        q = h.unsqueeze(1)
        attended = F.scaled_dot_product_attention(
            q, q, q, dropout_p=0.5 if self.training else 0.0
        ).squeeze(1)
        h = h + _drop_path(self.mixed(attended), 0.5, self.training)
        return self.out(F.dropout(h, 0.5, training=self.training)).squeeze(-1)


def _stochastic_case() -> tuple[nn.Module, Any, Any]:
    with seeded(0):
        model = Stochastic().train()
        batch = (torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        return F.mse_loss(m(b[0]), b[1])

    return model, loss_fn, batch


def test_probes_of_a_train_mode_model_are_deterministic_and_those_of_its_eval_mode() -> None:
    """Recomputed products (double backward) see one function: the eval-mode one."""
    model, loss_fn, batch = _stochastic_case()
    vector = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters())).double()
    before = snapshot(model)
    products = [
        hessian_vector_product(model, loss_fn, batch, vector, backend="double_backward")
        for _ in range(3)
    ]
    assert_unchanged(model, before)  # modes (train), spectral_norm's _u/_v, RNG
    assert all(torch.equal(products[0], p) for p in products[1:])
    reference = copy.deepcopy(model).eval()
    expected = hessian_vector_product(reference, loss_fn, batch, vector, backend="double_backward")
    torch.testing.assert_close(products[0], expected, rtol=1e-12, atol=1e-12)


class Drifting(nn.Module):
    """A layer whose forward updates a state of its own in training mode (as a power
    iteration does): each call sees another function."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2, dtype=torch.float64)
        self.register_buffer("gain", torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.gain.mul_(1.01)
        return torch.tanh(self.gain * self.linear(x))


def test_the_self_check_sees_an_operator_that_changes_when_modes_are_kept() -> None:
    """With every module's mode kept (``dropout=True``) the random draws are those of the
    probe's first product, but state a forward updates in training mode (spectral_norm's
    power iteration; here a gain) still moves the function from product to product: the
    symmetry self-check refuses it, naming that cause."""
    with seeded(1):
        model = Drifting().train()
        batch = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    u, v = torch.ones(8, dtype=torch.float64), torch.linspace(-1, 1, 8, dtype=torch.float64)

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        return F.mse_loss(m(b[0]), b[1])

    with HessianOperator(model, loss_fn, batch, backend="double_backward", dropout=True) as op:
        op.matvec(u)
        with pytest.raises(CurvatureCheckError, match="changes from product to product"):
            op.matvec(v)


def test_batch_norm_mode_goes_on_top_of_the_eval_mode() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3)).train()
    with probe_context(net, batch_norm="train"):
        assert [m.training for m in net] == [False, False, True]
    with probe_context(net, batch_norm="as_is"):
        assert [m.training for m in net] == [False, False, True]
    net[2].eval()
    with probe_context(net, batch_norm="as_is"):
        assert [m.training for m in net] == [False, False, False]
    assert [m.training for m in net] == [True, True, False]
