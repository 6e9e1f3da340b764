"""The shared list of tiny float64 cases, their exact dense Hessians, and model snapshots.

Every case builds the same model and batch each time (seeded, without touching the global
RNG). The reference Hessian is computed here independently of the library: the loss is
made a pure function of one flat parameter vector with ``torch.func.functional_call`` and
differentiated twice by ``torch.func`` (``jacrev(grad(f))``, see :func:`dense_hessian` for
why not ``torch.func.hessian``). Parameters are those of
``named_parameters()`` with ``requires_grad=True``, so shared (tied) parameters count once
and frozen ones are left out, in the same order as the library's flat vectors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

LossFn = Callable[[nn.Module, Any], torch.Tensor]
DTYPE = torch.float64


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG inside the block and give its old state back afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def mse(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def dict_cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def half_squares(model: nn.Module, batch: Any) -> torch.Tensor:
    """``½ mean((x w − y)²)`` on a list batch ``[x, y]``: Hessian ``XᵀX / n``."""
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y).pow(2).mean()


def _mlp(activation: nn.Module, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), activation, nn.Linear(5, outputs))


def _classification(n: int = 8, features: int = 4, classes: int = 3) -> tuple[torch.Tensor, ...]:
    return torch.randn(n, features, dtype=DTYPE), torch.randint(0, classes, (n,))


class SmallCNN(nn.Module):
    """Conv, BatchNorm (eval mode, non-trivial running statistics), tanh, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(18, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bn(self.conv(x))).flatten(1))


class FrozenAndTied(nn.Module):
    """``decode`` shares its weight with ``encode``; ``middle`` is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(4, 4, bias=False)
        self.middle = nn.Linear(4, 4)
        self.decode = nn.Linear(4, 4, bias=False)
        self.decode.weight = self.encode.weight
        self.head = nn.Linear(4, 3)
        self.middle.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.encode(x))
        h = torch.tanh(self.middle(h))
        return self.head(torch.tanh(self.decode(h)))


class TinyTransformer(nn.Module):
    """One ``nn.TransformerEncoderLayer`` (2 heads), mean-pooled, with a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model=4, nhead=2, dim_feedforward=6, dropout=0.1, batch_first=True
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=1))


class BatchNormDropoutNet(nn.Module):
    """Linear, BatchNorm1d, tanh, Dropout, linear: probed in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.tanh(self.bn(self.first(x)))))


def batch_norm_dropout_case() -> tuple[nn.Module, LossFn, Any]:
    """The train-mode BatchNorm + Dropout model (with a ``.grad`` on some parameters)."""
    with seeded(99):
        model = BatchNormDropoutNet().to(DTYPE).train()
        model.bn.running_mean.copy_(torch.randn(4, dtype=DTYPE))
        model.bn.num_batches_tracked.fill_(5)
        model.first.weight.grad = torch.randn_like(model.first.weight)
        batch = (torch.randn(6, 3, dtype=DTYPE), torch.randint(0, 2, (6,)))
    return model, cross_entropy, batch


def batch_norm_dropout_hessian(model: BatchNormDropoutNet, batch: Any) -> torch.Tensor:
    """Exact Hessian of the train-mode model with dropout off, BatchNorm written out by
    hand on the batch statistics (biased variance), so it owes nothing to ``nn`` modules."""
    x, y = batch
    named = trainable(model)
    point = torch.cat([p.detach().reshape(-1) for _, p in named])
    sizes = [p.numel() for _, p in named]
    eps = model.bn.eps

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        w1, b1, gamma, beta, w2, b2 = torch.split(flat, sizes)
        h = x @ w1.view(4, 3).T + b1
        mean, var = h.mean(dim=0), h.var(dim=0, unbiased=False)
        h = (h - mean) / torch.sqrt(var + eps) * gamma + beta
        return F.cross_entropy(torch.tanh(h) @ w2.view(2, 4).T + b2, y)

    return torch.func.jacrev(torch.func.grad(loss_of))(point).detach()


@dataclass(frozen=True)
class Case:
    """A tiny model with its loss and batch.

    Attributes:
        name: test id.
        make: builds ``(model, loss_fn, batch)``; the same every call.
        closed_form: the exact Hessian from the batch alone, where one is known.
    """

    name: str
    make: Callable[[], tuple[nn.Module, LossFn, Any]]
    closed_form: Callable[[Any], torch.Tensor] | None = None

    def build(self) -> tuple[nn.Module, LossFn, Any]:
        with seeded(sum(map(ord, self.name))):
            return self.make()

    def __repr__(self) -> str:
        return self.name


def _mlp_tanh() -> tuple[nn.Module, LossFn, Any]:
    return _mlp(nn.Tanh(), 3).to(DTYPE), cross_entropy, _classification()


def _mlp_relu() -> tuple[nn.Module, LossFn, Any]:
    x = torch.randn(8, 4, dtype=DTYPE)
    return _mlp(nn.ReLU(), 2).to(DTYPE), mse, (x, torch.randn(8, 2, dtype=DTYPE))


def _mlp_gelu() -> tuple[nn.Module, LossFn, Any]:
    x, y = _classification()
    return _mlp(nn.GELU(), 3).to(DTYPE), dict_cross_entropy, {"x": x, "y": y}


def _cnn_bn_eval() -> tuple[nn.Module, LossFn, Any]:
    model = SmallCNN().to(DTYPE)
    model.bn.running_mean.copy_(torch.randn(2, dtype=DTYPE))
    model.bn.running_var.copy_(torch.rand(2, dtype=DTYPE) + 0.5)
    model.eval()
    x = torch.randn(6, 1, 5, 5, dtype=DTYPE)
    return model, cross_entropy, (x, torch.randint(0, 3, (6,)))


def _frozen_tied() -> tuple[nn.Module, LossFn, Any]:
    return FrozenAndTied().to(DTYPE), cross_entropy, _classification()


def _transformer() -> tuple[nn.Module, LossFn, Any]:
    model = TinyTransformer().to(DTYPE).eval()
    x = torch.randn(3, 5, 4, dtype=DTYPE)
    return model, cross_entropy, (x, torch.randint(0, 3, (3,)))


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _least_squares() -> tuple[nn.Module, LossFn, Any]:
    x = torch.randn(10, 5, dtype=DTYPE)
    return nn.Linear(5, 1).to(DTYPE), mse, (x, torch.randn(10, 1, dtype=DTYPE))


def _least_squares_closed_form(batch: Any) -> torch.Tensor:
    a = _with_ones(batch[0])  # weight columns, then the bias column
    return 2 * a.T @ a / a.shape[0]


def _half_least_squares() -> tuple[nn.Module, LossFn, Any]:
    x = torch.randn(12, 6, dtype=DTYPE)
    return nn.Linear(6, 1, bias=False).to(DTYPE), half_squares, [x, torch.randn(12, dtype=DTYPE)]


def _half_least_squares_closed_form(batch: Any) -> torch.Tensor:
    x = batch[0]
    return x.T @ x / x.shape[0]


CASES = [
    Case("mlp_tanh", _mlp_tanh),
    Case("mlp_relu", _mlp_relu),
    Case("mlp_gelu", _mlp_gelu),
    Case("cnn_batchnorm_eval", _cnn_bn_eval),
    Case("frozen_and_tied", _frozen_tied),
    Case("transformer_layer", _transformer),
    Case("least_squares", _least_squares, _least_squares_closed_form),
    Case("half_least_squares", _half_least_squares, _half_least_squares_closed_form),
]
CASES_BY_NAME = {case.name: case for case in CASES}


class _LossOf(nn.Module):
    """``forward(batch) = loss_fn(inner, batch)``, so ``functional_call`` can swap params."""

    def __init__(self, inner: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = inner
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.inner, batch)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters()`` with ``requires_grad`` (shared ones once)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def flat_loss(
    model: nn.Module, loss_fn: LossFn, batch: Any
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The loss as a function of one flat vector of the trainable parameters, and its point."""
    named = trainable(model)
    wrapper = _LossOf(model, loss_fn)
    point = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, p in named:
            params[f"inner.{name}"] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        return torch.func.functional_call(wrapper, params, (batch,))

    return loss_of, point


def dense_hessian(model: nn.Module, loss_fn: LossFn, batch: Any) -> torch.Tensor:
    """The exact ``P × P`` Hessian over the trainable parameters, by ``torch.func``.

    ``jacrev(grad(f))``, vectorised reverse-over-reverse. Not ``torch.func.hessian``
    (``jacfwd(jacrev(f))``): in torch 2.13 it returns a wrong, non-symmetric Hessian through
    a LayerNorm whose input depends on the parameters; nor ``jacfwd(grad(f))``, whose
    forward mode fails through ``F.mse_loss`` ("ZeroTensors are immutable"). The reference
    is checked against ``torch.autograd.functional.hessian`` in ``test_hvp.py``.
    """
    loss_of, point = flat_loss(model, loss_fn, batch)
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jacrev(torch.func.grad(loss_of))(point).detach()


@functools.cache
def reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense Hessian of a case and its eigenvalues, largest first (computed once)."""
    model, loss_fn, batch = CASES_BY_NAME[name].build()
    hessian = dense_hessian(model, loss_fn, batch)
    hessian = (hessian + hessian.T) / 2
    return hessian, torch.linalg.eigvalsh(hessian).flip(0)


@dataclass
class Snapshot:
    """Everything a probe must leave as it found it."""

    state: dict[str, torch.Tensor]
    modes: dict[str, bool]
    attributes: dict[str, tuple[Any, ...]]
    grads: dict[str, torch.Tensor | None]
    requires_grad: dict[str, bool]
    rng: torch.Tensor


def snapshot(model: nn.Module) -> Snapshot:
    """Copy parameters, buffers, modes, attributes, grads and the global RNG state."""
    return Snapshot(
        state={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        modes={name: m.training for name, m in model.named_modules()},
        attributes={
            name: (
                getattr(m, "track_running_stats", None),
                getattr(m, "momentum", None),
                sorted(vars(m)),  # e.g. no instance ``forward`` left behind
            )
            for name, m in model.named_modules()
        },
        grads={
            name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()
        },
        requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        rng=torch.get_rng_state(),
    )


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    """Assert that ``model`` and the global RNG are exactly as in ``before``."""
    after = snapshot(model)
    assert after.state.keys() == before.state.keys()
    for key, value in before.state.items():
        assert after.state[key].dtype == value.dtype, key
        assert torch.equal(after.state[key], value), key
    assert after.modes == before.modes
    assert after.attributes == before.attributes
    assert after.requires_grad == before.requires_grad
    for name, grad in before.grads.items():
        if grad is None:
            assert after.grads[name] is None, name
        else:
            assert after.grads[name] is not None, name
            assert torch.equal(after.grads[name], grad), name
    assert torch.equal(after.rng, before.rng)
