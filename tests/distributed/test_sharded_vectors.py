"""Estimators over sharded vectors, in one process: the split simulated by threads.

Each thread plays one process: it holds its rows of every vector, and ``all_sum`` sums over
the threads (a barrier), as ``torch.distributed.all_reduce`` does over processes. The
results must be the unsharded estimators' up to the order of the summation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_curvature.functional.gradients.perturbation import sam_perturbation
from lightning_curvature.functional.linalg.eigenpairs import lanczos_eigenpairs
from lightning_curvature.functional.linalg.lanczos import LanczosProcess
from lightning_curvature.functional.linalg.quadrature import lanczos_quadrature
from lightning_curvature.functional.linalg.sharded import VectorShards
from lightning_curvature.functional.linalg.trace_estimators import hutch_plus_plus, hutchinson

SPLITS = {"halves": [5, 5], "uneven with an empty shard": [7, 0, 3]}


class Threads:
    """``len(sizes)`` simulated processes, each holding ``sizes[r]`` rows of a vector."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.offsets = [sum(sizes[:r]) for r in range(len(sizes))]
        self._barrier = threading.Barrier(len(sizes), timeout=30)
        self._slots: list[Any] = [None] * len(sizes)

    def _exchange(self, rank: int, value: Any) -> list[Any]:
        self._slots[rank] = value
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()
        return values

    def shards(self, rank: int) -> VectorShards:
        def all_sum(tensor: torch.Tensor) -> torch.Tensor:
            parts = self._exchange(rank, tensor)
            total = parts[0].clone()
            for part in parts[1:]:
                total += part
            return total

        return VectorShards(sum(self.sizes), self.sizes[rank], all_sum, rank, len(self.sizes))

    def local(self, rank: int, vector: torch.Tensor) -> torch.Tensor:
        return vector[self.offsets[rank] : self.offsets[rank] + self.sizes[rank]]

    def matvec(self, rank: int, matrix: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """This process's rows of ``matrix @ v`` from its shard of ``v`` (gathered here only
        to simulate the operator; the estimators never gather)."""

        def product(v: torch.Tensor) -> torch.Tensor:
            whole = torch.cat(self._exchange(rank, v))
            return self.local(rank, matrix @ whole)

        return product

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        results: list[Any] = [None] * len(self.sizes)
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException as err:
                errors.append(err)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(len(self.sizes))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        if errors:
            raise errors[0]
        return results


def _symmetric(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.tensor([9.0, 4.0, 2.5, 1.0, 0.5, 0.1, -0.3, -1.0, 0.05, 0.2])[:n]
    return ((q * spectrum.double()) @ q.T).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes", SPLITS.values(), ids=SPLITS.keys())
def test_sharded_lanczos_is_the_unsharded_lanczos(sizes: list[int], dtype: torch.dtype) -> None:
    n = sum(sizes)
    a = _symmetric(n, dtype)
    start = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=dtype)
    whole = lanczos_eigenpairs(
        lambda v: a @ v, start, k=2, tol=1e-6, max_iter=n, return_eigenvectors=True
    )
    threads = Threads(sizes)

    def on(rank: int) -> Any:
        return lanczos_eigenpairs(
            threads.matvec(rank, a),
            threads.local(rank, start),
            k=2,
            tol=1e-6,
            max_iter=n,
            return_eigenvectors=True,
            shards=threads.shards(rank),
        )

    parts = threads.run(on)
    # float64: rounding only (1e-12); float32: the summation order changes each inner
    # product by ~eps·n, which Lanczos carries into the Ritz values at ~1e-6 relative.
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    for part in parts:
        assert part.num_steps == whole.num_steps
        assert part.converged.tolist() == whole.converged.tolist()
        torch.testing.assert_close(part.eigenvalues, whole.eigenvalues, rtol=rel, atol=rel)
    eigenvectors = torch.cat([p.eigenvectors for p in parts], dim=1)
    assert whole.eigenvectors is not None
    torch.testing.assert_close(eigenvectors, whole.eigenvectors, rtol=0, atol=100 * rel)
    exact = torch.linalg.eigvalsh(a.double()).flip(0)[:2]
    torch.testing.assert_close(parts[0].eigenvalues, exact, rtol=1e-5, atol=1e-5)


def _bulk_under(top: list[float], n: int, seed: int) -> torch.Tensor:
    """A dense symmetric matrix: ``top`` over a bulk uniform in [-1, 1], randomly rotated."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.linspace(-1.0, 1.0, n - len(top)), torch.tensor(top)])
    return (q * spectrum.double()) @ q.T


def _whole_and_sharded(
    a: torch.Tensor, start: torch.Tensor, sizes: list[int], keywords: dict[str, Any]
) -> tuple[Any, list[Any]]:
    """``lanczos_eigenpairs`` unsharded, and on each of the ``sizes`` shards (threads)."""
    whole = lanczos_eigenpairs(lambda v: a @ v, start, **keywords)
    threads = Threads(sizes)

    def on(rank: int) -> Any:
        return lanczos_eigenpairs(
            threads.matvec(rank, a), threads.local(rank, start), shards=threads.shards(rank),
            **keywords,
        )  # fmt: skip

    return whole, threads.run(on)


@pytest.mark.parametrize("sizes", [[30, 30], [41, 0, 19]], ids=["halves", "with an empty shard"])
def test_sharded_thick_restarts_are_the_unsharded_ones(sizes: list[int]) -> None:
    """Each process rewrites its own columns of the basis at a restart, from the same
    projection: the same products, values and miss bounds, the eigenvectors' shards."""
    n = sum(sizes)
    a = _bulk_under([2.5, 3.0], n, seed=2)
    start = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keywords: dict[str, Any] = {
        "k": 2, "tol": 1e-8, "max_iter": 60, "return_eigenvectors": True, "rows": 7,
        "miss_probability": 1e-3,
    }  # fmt: skip
    whole, parts = _whole_and_sharded(a, start, sizes, keywords)
    assert whole.num_steps > 7
    assert whole.converged.tolist() == [True, True]
    for part in parts:
        assert part.num_steps == whole.num_steps
        torch.testing.assert_close(part.eigenvalues, whole.eigenvalues, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(part.misses, whole.misses, rtol=1e-6, atol=0.0)
    eigenvectors = torch.cat([p.eigenvectors for p in parts], dim=1)
    assert whole.eigenvectors is not None
    torch.testing.assert_close(eigenvectors, whole.eigenvectors, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sizes", [[30, 30], [41, 0, 19]], ids=["halves", "with an empty shard"])
def test_sharded_two_row_runs_are_the_unsharded_one(sizes: list[int]) -> None:
    """Each process holds its columns of the two-row ring (none on an empty shard): the same
    products, value and miss bound as the unsharded run."""
    n = sum(sizes)
    a = _bulk_under([2.0], n, seed=4)
    start = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keywords: dict[str, Any] = {
        "tol": 1e-8, "max_iter": 60, "bounded": True, "miss_probability": 1e-3,
    }  # fmt: skip
    whole, parts = _whole_and_sharded(a, start, sizes, keywords)
    assert whole.converged.tolist() == [True]
    for part in parts:
        assert part.num_steps == whole.num_steps
        torch.testing.assert_close(part.eigenvalues, whole.eigenvalues, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(part.misses, whole.misses, rtol=1e-6, atol=0.0)


def test_sharded_basis_holds_only_the_local_rows() -> None:
    sizes = [7, 0, 3]
    a = _symmetric(10, torch.float64)
    threads = Threads(sizes)

    def on(rank: int) -> tuple[int, int]:
        run = LanczosProcess(
            threads.matvec(rank, a),
            torch.ones(sizes[rank], dtype=torch.float64),
            4,
            shards=threads.shards(rank),
        )
        while run.step():
            pass
        return run.basis.shape  # type: ignore[return-value]

    assert threads.run(on) == [(4, 7), (4, 0), (4, 3)]


@pytest.mark.parametrize("sizes", SPLITS.values(), ids=SPLITS.keys())
def test_sharded_quadrature_is_the_unsharded_quadrature(sizes: list[int]) -> None:
    a = _symmetric(sum(sizes), torch.float64)
    start = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(2), dtype=a.dtype)
    nodes, weights = lanczos_quadrature(lambda v: a @ v, start, 6)
    threads = Threads(sizes)
    parts = threads.run(
        lambda r: lanczos_quadrature(
            threads.matvec(r, a), threads.local(r, start), 6, threads.shards(r)
        )
    )
    for part_nodes, part_weights in parts:
        torch.testing.assert_close(part_nodes, nodes, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(part_weights, weights, rtol=1e-12, atol=1e-12)


def _global_probes(sizes: list[int], seed: int, count: int) -> torch.Tensor:
    """The documented construction: one seed a vector from the shared generator, then
    shard r draws its rows from a generator seeded with seed + r."""
    shared = torch.Generator().manual_seed(seed)
    probes = []
    for _ in range(count):
        s = int(torch.randint(0, 2**62, (), generator=shared))
        rows = []
        for r, size in enumerate(sizes):
            local = torch.Generator().manual_seed(s + r)
            rows.append((2 * torch.randint(0, 2, (size,), generator=local) - 1).double())
        probes.append(torch.cat(rows))
    return torch.stack(probes)


@pytest.mark.parametrize("sizes", SPLITS.values(), ids=SPLITS.keys())
def test_sharded_hutchinson_is_hutchinson_over_the_global_probes(sizes: list[int]) -> None:
    a = _symmetric(sum(sizes), torch.float64)
    slices = {"first": [slice(0, 2)], "last": [slice(sizes[0] - 1, sizes[0])]}
    threads = Threads(sizes)

    def on(rank: int) -> Any:
        lo = threads.offsets[rank]
        local_blocks = {
            name: [slice(max(s.start - lo, 0), max(min(s.stop - lo, sizes[rank]), 0))]
            for name, (s,) in slices.items()
        }
        generator = torch.Generator().manual_seed(3)
        out = hutchinson(
            threads.matvec(rank, a),
            sizes[rank],
            6,
            generator,
            dtype=torch.float64,
            blocks=local_blocks,
            shards=threads.shards(rank),
        )
        return out, generator.get_state()

    parts = threads.run(on)
    z = _global_probes(sizes, 3, 6)
    samples = torch.einsum("mi,ij,mj->m", z, a, z)
    for out, state in parts:
        torch.testing.assert_close(out.samples, samples, rtol=1e-12, atol=1e-12)
        first = (z[:, :2] * (z @ a.T)[:, :2]).sum(1)
        torch.testing.assert_close(out.block_samples["first"], first, rtol=1e-12, atol=1e-12)
        assert torch.equal(state, parts[0][1])  # the shared generator stays in step
    assert not torch.equal(z[0], _global_probes([sum(sizes)], 3, 1)[0]) or len(sizes) == 1


@pytest.mark.parametrize("sizes", SPLITS.values(), ids=SPLITS.keys())
def test_sharded_hutch_plus_plus_is_exact_on_low_rank(sizes: list[int]) -> None:
    n = sum(sizes)
    u = torch.randn(n, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = u @ u.T  # rank 2: exact with a sketch of two columns (6 products)
    threads = Threads(sizes)
    parts = threads.run(
        lambda r: hutch_plus_plus(
            threads.matvec(r, a),
            sizes[r],
            6,
            torch.Generator().manual_seed(0),
            dtype=torch.float64,
            shards=threads.shards(r),
        )
    )
    for out in parts:
        assert out.estimate == pytest.approx(float(a.trace()), rel=1e-9)
        assert out.std_error == pytest.approx(0.0, abs=1e-9)


def test_sharded_sam_normalises_by_the_global_norm() -> None:
    g = torch.tensor([3.0, 0.0, 4.0, 12.0])  # ‖g‖ = 13
    w = torch.zeros(4)
    whole = sam_perturbation([w], [g], rho=1.0).tensors[0]
    threads = Threads([3, 1])

    def on(rank: int) -> Any:
        eps = sam_perturbation(
            [threads.local(rank, w)],
            [threads.local(rank, g)],
            rho=1.0,
            all_sum=threads.shards(rank).all_sum,
        )
        return eps.tensors[0], float(eps.norm())

    parts = threads.run(on)
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole)
    assert [p[1] for p in parts] == pytest.approx([1.0, 1.0])
    local = sam_perturbation([threads.local(1, w)], [threads.local(1, g)], rho=1.0).tensors[0]
    assert float(local[0]) == pytest.approx(1.0)  # the trap: each shard stepped by ρ alone
    assert float(whole[3]) == pytest.approx(12 / 13)
