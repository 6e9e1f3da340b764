"""Batched Hessian-vector products: the same products, counted and checked, the faster way."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from lightning_curvature.functional.density import spectral_density
from lightning_curvature.functional.linalg.product_batches import (
    BATCHED_ENTRIES,
    GROUP,
    ProductBatches,
)
from lightning_curvature.functional.linalg.quadrature import lanczos_quadrature, lanczos_quadratures
from lightning_curvature.functional.linalg.trace_estimators import hutch_plus_plus, hutchinson
from lightning_curvature.functional.operator.operator import HessianOperator
from lightning_curvature.functional.trace import hessian_trace


class PartlyUsed(nn.Module):
    """A tanh MLP with a layer the loss never reaches (its products are zeros)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).sum(1).mean()


@pytest.fixture
def model() -> nn.Module:
    return PartlyUsed().double()


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("backend", ["retained_graph", "double_backward", "finite_difference"])
def test_matmat_is_matvec_row_by_row(model: nn.Module, batch: torch.Tensor, backend: str) -> None:
    size = sum(p.numel() for p in model.parameters())
    vectors = torch.randn(5, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with HessianOperator(model, loss_fn, batch, backend=backend) as H:  # type: ignore[arg-type]
        rows = torch.stack([H.matvec(v) for v in vectors])
        assert H.num_hvps >= 5
        counted = H.num_hvps
        together = H.matmat(vectors)
        assert H.num_hvps == counted + 5  # a batched row counts as one product
    assert together.shape == (5, size)
    assert torch.allclose(together, rows, rtol=1e-9, atol=1e-12)
    unused = slice(size - 12, size)  # the unused layer's 9 + 3 entries, last in the layout
    assert torch.equal(together[:, unused], torch.zeros(5, 12, dtype=torch.float64))


def dense_hessian(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The exact Hessian over all parameters, in their layout order."""
    named = list(model.named_parameters())

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, [p.numel() for _, p in named])
        params = {n: piece.view(p.shape) for (n, p), piece in zip(named, pieces, strict=True)}
        return torch.func.functional_call(model, params, (batch,)).pow(2).sum(1).mean()

    return torch.func.hessian(loss_of)(torch.cat([p.detach().reshape(-1) for _, p in named]))


def test_a_first_matmat_takes_the_first_product_alone(
    model: nn.Module, batch: torch.Tensor
) -> None:
    size = sum(p.numel() for p in model.parameters())
    with HessianOperator(model, loss_fn, batch) as H:
        first = H.matmat(torch.eye(size, dtype=torch.float64)[:3])
        assert H.num_hvps == 3
    assert torch.allclose(first, dense_hessian(model, batch)[:3], rtol=1e-9, atol=1e-12)


def test_hutchinson_gives_the_same_samples_batched_or_not(
    model: nn.Module, batch: torch.Tensor
) -> None:
    num = 3 * GROUP + 3  # four groups: warm-up, batched, single, the faster one
    with HessianOperator(model, loss_fn, batch) as H:
        alone = hutchinson(H.matvec, H.size, num, torch.Generator().manual_seed(5),
                           dtype=torch.float64)  # fmt: skip
        grouped = hutchinson(H.matvec, H.size, num, torch.Generator().manual_seed(5),
                             dtype=torch.float64, matmat=H.matmat)  # fmt: skip
    assert grouped.num_matvecs == alone.num_matvecs == num
    assert torch.allclose(grouped.samples, alone.samples, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("per_layer", [False, True])
def test_hutch_plus_plus_gives_the_same_estimate_batched_or_not(
    model: nn.Module, batch: torch.Tensor, per_layer: bool
) -> None:
    num = 3 * (3 * GROUP + 3)  # each of the three parts takes four groups
    calls = {"batched": 0}
    with HessianOperator(model, loss_fn, batch) as H:
        blocks = H.layout.groups(True) if per_layer else None

        def matmat(rows: torch.Tensor) -> torch.Tensor:
            calls["batched"] += 1
            return H.matmat(rows)

        alone = hutch_plus_plus(H.matvec, H.size, num, torch.Generator().manual_seed(5),
                                dtype=torch.float64, blocks=blocks)  # fmt: skip
        grouped = hutch_plus_plus(H.matvec, H.size, num, torch.Generator().manual_seed(5),
                                  dtype=torch.float64, blocks=blocks, matmat=matmat)  # fmt: skip
    assert calls["batched"] >= 1  # the batched way was timed, at least
    assert grouped.num_matvecs == alone.num_matvecs == num
    assert grouped.estimate == pytest.approx(alone.estimate, rel=1e-10)
    assert torch.allclose(grouped.samples, alone.samples, rtol=1e-8, atol=1e-10)
    for name in grouped.block_samples:
        assert grouped.block(name)[0] == pytest.approx(alone.block(name)[0], rel=1e-8, abs=1e-10)
    exact = float(dense_hessian(model, batch).trace())
    assert abs(grouped.estimate - exact) <= 4 * grouped.std_error + 1e-9


def test_hessian_trace_batches_and_is_right(model: nn.Module, batch: torch.Tensor) -> None:
    out = hessian_trace(
        model, loss_fn, batch, num_hvps=32, generator=torch.Generator().manual_seed(0)
    )
    exact = float(dense_hessian(model, batch).trace())
    assert out.num_hvps == 32
    assert abs(float(out.estimate) - exact) <= 4 * float(out.std_error) + 1e-9


def _slow(seconds: float):  # type: ignore[no-untyped-def]
    def product(v: torch.Tensor) -> torch.Tensor:
        time.sleep(seconds)
        return 2 * v

    return product


@pytest.mark.parametrize(
    ("single", "batched", "kept"), [(0.02, 0.001, "batched"), (0.0, 0.2, "single")]
)
def test_the_faster_way_is_kept(single: float, batched: float, kept: str) -> None:
    products = ProductBatches(_slow(single), _slow(batched), torch.device("cpu"))
    ways = []
    for _ in range(5):
        before = dict(products.seconds)
        assert torch.equal(products(torch.ones(4, 3)), 2 * torch.ones(4, 3))
        ways.append(sorted(set(products.seconds) - set(before)))
    assert ways[:3] == [[], ["batched"], ["single"]]  # warm-up, then each way timed once
    assert min(products.seconds, key=products.seconds.__getitem__) == kept
    assert products._way() == kept


def test_out_of_memory_goes_on_one_by_one() -> None:
    calls = {"batched": 0}

    def no_room(rows: torch.Tensor) -> torch.Tensor:
        calls["batched"] += 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    products = ProductBatches(lambda v: 3 * v, no_room, torch.device("cpu"))
    for _ in range(4):
        assert torch.equal(products(torch.ones(2, 2)), 3 * torch.ones(2, 2))
    assert calls["batched"] == 1
    assert "batched" not in products.seconds


def test_large_operators_take_their_products_one_by_one() -> None:
    """Above BATCHED_ENTRIES a group would hold too much at once: no batched call is made."""

    def never(rows: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a batched call above the memory cap")

    size = BATCHED_ENTRIES // (2 * GROUP) + 1
    out = hutchinson(lambda v: 2 * v, size, 3 * GROUP, torch.Generator().manual_seed(0),
                     matmat=never)  # fmt: skip
    assert out.estimate == pytest.approx(2 * size)  # Rademacher: zᵀ(2z) = 2·size exactly
    small = hutchinson(lambda v: 2 * v, 10, 3 * GROUP, torch.Generator().manual_seed(0),
                       matmat=lambda rows: 2 * rows)  # fmt: skip
    assert small.estimate == pytest.approx(20.0)


def test_a_single_row_and_no_row(model: nn.Module, batch: torch.Tensor) -> None:
    size = sum(p.numel() for p in model.parameters())
    row = torch.randn(1, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with HessianOperator(model, loss_fn, batch) as H:
        first = H.matmat(row)  # the operator's first product, alone
        again = H.matmat(row)
        none = H.matmat(row[:0])
        assert H.num_hvps == 2
    assert first.shape == again.shape == (1, size)
    assert none.shape == (0, size)
    assert torch.allclose(first, row @ dense_hessian(model, batch), rtol=1e-9, atol=1e-12)


def test_lockstep_quadratures_are_the_runs_one_after_another() -> None:
    """Each step multiplies every live run's vector in one call; runs that end early (an
    invariant Krylov space: a start on 2 of the 4 eigenvalues) drop out of the calls."""
    diagonal = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    starts = torch.tensor(
        [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.5, 1.0, -1.0, 2.0]], dtype=torch.float64
    )
    calls: list[int] = []

    def products(rows: torch.Tensor) -> torch.Tensor:
        calls.append(len(rows))
        return rows * diagonal

    together = lanczos_quadratures(lambda v: diagonal * v, starts, 4, products=products)
    assert calls == [3, 3, 2, 2]  # the second run spans its space in two steps
    for (nodes, weights), start in zip(together, starts, strict=True):
        alone_nodes, alone_weights = lanczos_quadrature(lambda v: diagonal * v, start, 4)
        torch.testing.assert_close(nodes, alone_nodes, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(weights, alone_weights, rtol=1e-12, atol=1e-12)


def test_spectral_density_batches_its_runs(
    model: nn.Module, batch: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten runs go in lockstep groups of 8 and 2 through the batched backward: the same
    starts, nodes and weights as one product at a time, the same products counted."""
    batched: list[int] = []
    matmat = HessianOperator.matmat

    def counting(self: HessianOperator, vectors: torch.Tensor) -> torch.Tensor:
        batched.append(len(vectors))
        return matmat(self, vectors)

    single = spectral_density(model, loss_fn, batch, num_steps=12, num_runs=10,
                              generator=torch.Generator().manual_seed(3))  # fmt: skip
    monkeypatch.setattr(HessianOperator, "matmat", counting)
    together = spectral_density(model, loss_fn, batch, num_steps=12, num_runs=10,
                                generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert set(batched) == {GROUP, 2}
    assert together.num_hvps == single.num_hvps == 120
    torch.testing.assert_close(together.nodes, single.nodes, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(together.weights, single.weights, rtol=1e-7, atol=1e-10)
