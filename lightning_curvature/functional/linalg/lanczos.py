"""Lanczos with full reorthogonalisation over any symmetric ``matvec``, honest in float32.

:class:`LanczosProcess` builds the orthonormal Krylov basis ``Q`` and the tridiagonal
``T = Qᵀ A Q`` one product at a time, reorthogonalising every new vector against the whole
basis twice ("twice is enough", Parlett 1998). Inner products and norms are accumulated in
float64 (:mod:`~lightning_curvature.functional.linalg.reductions`), so a float32 run over 10⁸
parameters keeps the accuracy its flags promise.

Breakdown is declared only when nothing but rounding is left of the new residual
(``β ≤ 16·eps·‖T‖``): a small residual is not an invariant subspace. In float32 the residual
of a bulk of eigenvalues 10⁻⁴ below an outlier is exactly that small, and treating it as a
breakdown threw the bulk away (the run returned wrong eigenvalues marked converged). After a
true breakdown the run may restart from a fresh random vector orthogonal to the basis, which
is how repeated eigenvalues are found; the residual dropped there still enters the error
bound of every Ritz value (``Σ β_b |s_{b,i}|``), so a restart never certifies anything.

This module is the process alone; what is read from it lives beside it:
:mod:`~lightning_curvature.functional.linalg.eigenpairs` certifies the extreme eigenpairs and
decides when to stop, :mod:`~lightning_curvature.functional.linalg.quadrature` gives the Gauss
quadrature of stochastic Lanczos quadrature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_curvature.functional.linalg.reductions import inner_products
from lightning_curvature.functional.linalg.sharded import VectorShards

__all__ = ["LanczosProcess"]

Matvec = Callable[[torch.Tensor], torch.Tensor]
# A residual below this many eps·‖T‖ is rounding alone: the Krylov space is invariant.
_BREAKDOWN = 16.0
# A residual below this fraction of ‖A q_j‖ starts a new block for the complement test (the
# space is nearly invariant: a second copy of a repeated eigenvalue may lie beyond it). Not
# of ‖T‖: below an outlier, every residual of a bulk 10⁻⁴ as large would start a block.
_NEARLY_INVARIANT = 1e-4
# The smallest eigenvalue error a run can certify: a relative part, in eps·|θ| (a float32
# least-squares Hessian put λ₁ 2.4·eps·λ₁ off), plus a multiple of the rounding measured
# along the explored directions (4 to 10⁵ times the bulk eigenvalues' errors on the stiff
# least squares, a tanh/GELU MLP and a tanh CNN in float32).
_RELATIVE_ROUNDING = 16.0
_MEASURED_ROUNDING = 4.0
_BLOCK = 8  # basis rows allocated at a time: memory follows the run, nothing is ever copied


class LanczosProcess:
    """Incremental Lanczos process with full reorthogonalisation.

    Args:
        matvec: the symmetric linear map.
        start: starting vector (normalised here).
        max_iter: most products this process may take (bounds the basis memory).
        generator: random source for restarts after a breakdown; ``None`` stops there.
        shards: how the vectors are split across processes (default: whole here); each
            process then holds its shard of ``start`` and of every basis vector, and the
            inner products are summed across processes
            (:class:`~lightning_curvature.functional.linalg.sharded.VectorShards`).

    Attributes:
        spanned: the basis spans the whole space (``T``'s eigenvalues are ``A``'s).
        restarts: ``(row, β)`` for each restart: the last row of the block that broke down
            and the residual norm dropped there (it stays in every error bound).

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
        >>> run = LanczosProcess(lambda v: A @ v, torch.ones(3, dtype=torch.float64), 3)
        >>> while run.step():
        ...     pass
        >>> torch.linalg.eigvalsh(run.tridiagonal()).round(decimals=12)
        tensor([-2.,  1.,  3.], dtype=torch.float64)
    """

    def __init__(
        self,
        matvec: Matvec,
        start: torch.Tensor,
        max_iter: int,
        generator: torch.Generator | None = None,
        shards: VectorShards | None = None,
    ) -> None:
        self.matvec = matvec
        self.shards = shards or VectorShards.single(start.numel())
        if self.shards.local_size != start.numel():
            raise ValueError(
                f"`start` has {start.numel()} entries but this process's shard has "
                f"{self.shards.local_size}."
            )
        self.size = self.shards.size  # of the whole space
        self._length = start.numel()  # of the vectors held here
        self.max_iter = min(max_iter, self.size)
        self._blocks: list[torch.Tensor] = []
        self._stored = 0
        self._template = start
        self._store(start / self.shards.norm(start))
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[j] couples q_j and q_{j+1}; 0 after a restart
        self.residual_norm = float("nan")  # norm of the last residual before normalisation
        self.block_starts = [0]  # where each block begins: after a (near) breakdown
        self.restarts: list[tuple[int, float]] = []
        self.spanned = False
        self.rounding = 0.0  # largest deviation of Qᵀ A q_j from its exact value so far
        self.generator = generator

    @property
    def num_steps(self) -> int:
        """Products taken so far (the order of ``T``)."""
        return len(self.alphas)

    @property
    def basis(self) -> torch.Tensor:
        """The orthonormal vectors found so far, one a row (the next start included)."""
        return torch.cat(self._blocks)[: self._stored]

    def _row(self, index: int) -> torch.Tensor:
        return self._blocks[index // _BLOCK][index % _BLOCK]

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``coefficientsᵀ Q``: vectors from their coordinates in the first rows of the basis.

        Args:
            coefficients: ``(m, c)``, one column per vector, ``m`` at most the rows stored.
        """
        total = coefficients.new_zeros(coefficients.shape[1], self._length)
        for first in range(0, coefficients.shape[0], _BLOCK):
            block = self._blocks[first // _BLOCK][: coefficients.shape[0] - first]
            total += coefficients[first : first + _BLOCK].T @ block
        return total

    @property
    def scale(self) -> float:
        """An estimate of ``‖T‖`` (≤ ``‖A‖``): the largest α plus the largest β."""
        return max((abs(a) for a in self.alphas), default=0.0) + max(self.betas, default=0.0)

    def resolution(self, values: torch.Tensor) -> torch.Tensor:
        """The smallest error certifiable for each Ritz value, given the run's rounding.

        ``16·eps·|θ| + 4·ρ`` with ``ρ`` the largest deviation of ``Qᵀ A q_j`` from its exact
        value seen so far (see :meth:`_record_rounding`).
        """
        eps = torch.finfo(self._template.dtype).eps
        return _RELATIVE_ROUNDING * eps * values.abs() + _MEASURED_ROUNDING * self.rounding

    def _store(self, vector: torch.Tensor) -> None:
        if self._stored % _BLOCK == 0:
            rows = min(_BLOCK, self.max_iter + 1 - self._stored)
            self._blocks.append(self._template.new_zeros(rows, self._length))
        self._row(self._stored).copy_(vector)
        self._stored += 1

    def _orthogonalise(self, vector: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``vector`` less its projection on the first ``count`` rows, and that projection."""
        blocks = [
            block[: count - first]
            for first, block in zip(range(0, count, _BLOCK), self._blocks, strict=False)
        ]

        def project(vector: torch.Tensor) -> torch.Tensor:
            local = torch.cat([inner_products(block, vector) for block in blocks])
            return self.shards.all_sum(local)  # one collective a pass

        def subtract(vector: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
            for start, block in zip(range(0, count, _BLOCK), blocks, strict=False):
                vector = vector - block.T @ coefficients[start : start + _BLOCK].to(vector.dtype)
            return vector

        first = project(vector)
        once = subtract(vector, first)
        return subtract(once, project(once)), first  # twice is enough

    def _record_rounding(self, coefficients: torch.Tensor) -> None:
        """Note how far ``Qᵀ A q_j`` is from the exact ``(0, …, 0, β_{j-1}, α_j)``.

        For an exactly symmetric operator in exact arithmetic the coefficients of ``A q_j``
        on the older basis vectors vanish and the one on ``q_{j-1}`` equals ``β_{j-1}``; what
        is left measures the rounding of the products along the explored directions, the
        same kind of quantity (``uᵀ E v``) as the first-order eigenvalue error ``yᵀ E y``.
        """
        j = coefficients.numel() - 1
        if j == 0:
            return
        deviations = coefficients[:j].abs()
        deviations[j - 1] = (coefficients[j - 1] - self.betas[j - 1]).abs()
        self.rounding = max(self.rounding, float(deviations.max()))

    def step(self) -> bool:
        """Take one product; return ``False`` once no further step is possible."""
        j = self.num_steps
        if j >= self.max_iter or self._stored <= j:
            return False
        q = self._row(j)
        w = self.matvec(q)
        image = self.shards.norm(w)
        w, coefficients = self._orthogonalise(w, j + 1)
        alpha = float(coefficients[j])
        self._record_rounding(coefficients)
        beta = self.shards.norm(w)
        self.alphas.append(alpha)
        self.residual_norm = beta
        if j + 1 >= self.size:  # the whole space is spanned: T is exact up to rounding
            self.spanned = True
            return False
        if j + 1 >= self.max_iter:
            return False
        scale = max(self.scale, 1e-30)
        if beta > _BREAKDOWN * torch.finfo(w.dtype).eps * scale:
            if beta <= _NEARLY_INVARIANT * image:
                self.block_starts.append(j + 1)
            self.betas.append(beta)
            self._store(w / beta)
            return True
        # Breakdown: span(Q) is invariant up to rounding. Restart orthogonally, or stop.
        fresh = None if self.generator is None else self._fresh_direction(j + 1)
        if fresh is None:
            return False
        self.restarts.append((j, beta))
        self.betas.append(0.0)
        self._store(fresh)
        self.block_starts.append(j + 1)
        return True

    def _fresh_direction(self, count: int, attempts: int = 4) -> torch.Tensor | None:
        """A random unit vector orthogonal to the first ``count`` basis vectors.

        A draw that (nearly) lies in the span leaves only rounding after orthogonalisation,
        which is not orthogonal once normalised; such a draw is discarded (e.g. a generator
        seeded like the start vector redraws the start vector itself).
        """
        assert self.generator is not None
        template = self._template
        for _ in range(attempts):
            fresh = self.shards.randn(self.generator, template.dtype, template.device)
            kept, _ = self._orthogonalise(fresh, count)
            if self.shards.norm(kept) > 1e-3 * self.shards.norm(fresh):
                kept, _ = self._orthogonalise(kept / self.shards.norm(kept), count)
                return kept / self.shards.norm(kept)
        return None

    def tridiagonal(self) -> torch.Tensor:
        """The tridiagonal ``T`` (float64, on the CPU) of the steps taken so far."""
        k = self.num_steps
        t = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        off = torch.tensor(self.betas[: k - 1], dtype=torch.float64)
        return t + torch.diag(off, 1) + torch.diag(off, -1)

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values (ascending), eigenvectors of ``T``, and bounds on their residuals.

        ``‖A Q s_i − θ_i Q s_i‖ ≤ β |s_{m,i}| + Σ_b β_b |s_{b,i}|``: the last residual and
        every residual a restart dropped (``A Q = Q T + Σ r e_rowᵀ``).
        """
        values, vectors = torch.linalg.eigh(self.tridiagonal())
        residuals = (self.residual_norm * vectors[-1, :]).abs()
        for row, dropped in self.restarts:
            residuals = residuals + dropped * vectors[row, :].abs()
        return values, vectors, residuals
