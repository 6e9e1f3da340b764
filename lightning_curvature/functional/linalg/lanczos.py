"""Lanczos with full reorthogonalisation over any symmetric ``matvec``, honest in float32.

:class:`LanczosProcess` builds the orthonormal Krylov basis ``Q`` and the tridiagonal
``T = Qᵀ A Q`` one product at a time, reorthogonalising every new vector against the whole
basis twice ("twice is enough", Parlett 1998). Inner products and norms sum slices of 2¹⁶
entries in float64 (:mod:`~lightning_curvature.functional.linalg.reductions`), and ``α`` is
corrected by the second pass, so a float32 run over 10⁸ parameters keeps the accuracy its
flags promise.

Breakdown is declared only when nothing but rounding is left of the new residual
(``β ≤ 16·eps·‖T‖``): a small residual is not an invariant subspace. In float32 the residual
of a bulk of eigenvalues 10⁻⁴ below an outlier is exactly that small, and treating it as a
breakdown threw the bulk away (the run returned wrong eigenvalues marked converged). After a
true breakdown the run may restart from a fresh random vector orthogonal to the basis, which
is how repeated eigenvalues are found; the residual dropped there still enters the error
bound of every Ritz value (``Σ β_b |s_{b,i}|``), so a restart never certifies anything.

A run that needs no Ritz vector may keep only the last ``keep`` basis vectors (``keep=2``:
``q_{j−1}`` and ``q_j``, the rows of the three-term recurrence), reorthogonalising each new
vector against them alone (local reorthogonalisation). Its memory is then a few vectors
whatever the number of steps (at ``P = 10⁷`` a default λ₁ probe kept 32 rows, 20x a
gradient). Without the older rows, orthogonality is lost once a Ritz value converges (Paige
1980): a converged value may get a copy (a "ghost") in ``T``; every Ritz value still lies
within its residual bound plus rounding of an eigenvalue, and a ghost only narrows the gaps
of the ``r²/δ`` bound. Such a run does not restart after a breakdown (a fresh direction
must be orthogonal to the whole basis): it stops there, like a run without a generator.

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
    """Incremental Lanczos process with full (or, with ``keep``, local) reorthogonalisation.

    Args:
        matvec: the symmetric linear map.
        start: starting vector (normalised here).
        max_iter: most products this process may take (bounds the basis memory).
        generator: random source for restarts after a breakdown; ``None`` stops there.
        shards: how the vectors are split across processes (default: whole here); each
            process then holds its shard of ``start`` and of every basis vector, and the
            inner products are summed across processes
            (:class:`~lightning_curvature.functional.linalg.sharded.VectorShards`).
        keep: keep only the last ``keep`` (at least 2) basis vectors and reorthogonalise
            against them alone (see the module docstring); ``None``: the whole basis.

    Attributes:
        dtype: the vectors' dtype (``start``'s); ``device`` likewise.
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
        >>> short = LanczosProcess(lambda v: A @ v, torch.ones(3, dtype=torch.float64), 3, keep=2)
        >>> while short.step():
        ...     pass
        >>> torch.linalg.eigvalsh(short.tridiagonal()).round(decimals=12)
        tensor([-2.,  1.,  3.], dtype=torch.float64)
    """

    def __init__(
        self,
        matvec: Matvec,
        start: torch.Tensor,
        max_iter: int,
        generator: torch.Generator | None = None,
        shards: VectorShards | None = None,
        keep: int | None = None,
    ) -> None:
        if keep is not None and keep < 2:
            raise ValueError(f"`keep` must be None or >= 2 (the recurrence's rows), got {keep}.")
        self.matvec = matvec
        self.keep = keep
        self.shards = shards or VectorShards.single(start.numel())
        if self.shards.local_size != start.numel():
            raise ValueError(
                f"`start` has {start.numel()} entries but this process's shard has "
                f"{self.shards.local_size}."
            )
        self.size = self.shards.size  # of the whole space
        self._length = start.numel()  # of the vectors held here
        self.max_iter = min(max_iter, self.size)
        self._blocks: list[torch.Tensor] = []  # the whole basis, in blocks of _BLOCK rows
        self._window: list[torch.Tensor] = []  # with `keep`: the last rows, oldest first
        self._stored = 0
        self.dtype, self.device = start.dtype, start.device  # `start` itself is not kept
        self._store(start / self.shards.norm(start))
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[j] couples q_j and q_{j+1}; 0 after a restart
        self.residual_norm = float("nan")  # norm of the last residual before normalisation
        self.block_starts = [0]  # where each block begins: after a (near) breakdown
        self.restarts: list[tuple[int, float]] = []
        self.spanned = False
        self.rounding = 0.0  # largest deviation of Qᵀ A q_j from its exact value so far
        self.generator = generator if keep is None else None  # no restart without the basis

    @property
    def num_steps(self) -> int:
        """Products taken so far (the order of ``T``)."""
        return len(self.alphas)

    @property
    def basis(self) -> torch.Tensor:
        """The orthonormal vectors found so far, one a row (the next start included).

        Raises:
            ValueError: if the run keeps only its last rows (``keep``).
        """
        self._whole()
        return torch.cat(self._blocks)[: self._stored]

    def _whole(self) -> None:
        if self.keep is not None:
            raise ValueError(f"this run keeps only its last {self.keep} basis vectors (`keep`).")

    def _first_kept(self, count: int) -> int:
        """The first of the rows ``0 … count − 1`` still held."""
        return 0 if self.keep is None else max(count - self.keep, self._stored - self.keep, 0)

    def _row(self, index: int) -> torch.Tensor:
        if self.keep is not None:
            return self._window[index - (self._stored - len(self._window))]
        return self._blocks[index // _BLOCK][index % _BLOCK]

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``coefficientsᵀ Q``: vectors from their coordinates in the first rows of the basis.

        Args:
            coefficients: ``(m, c)``, one column per vector, ``m`` at most the rows stored.

        Raises:
            ValueError: if the run keeps only its last rows (``keep``).
        """
        self._whole()
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
        eps = torch.finfo(self.dtype).eps
        return _RELATIVE_ROUNDING * eps * values.abs() + _MEASURED_ROUNDING * self.rounding

    def _store(self, vector: torch.Tensor) -> None:
        if self.keep is not None:  # the new row itself, the oldest one dropped
            self._window = [*self._window[1 - self.keep :], vector]
            self._stored += 1
            return
        if self._stored % _BLOCK == 0:
            rows = min(_BLOCK, self.max_iter + 1 - self._stored)
            self._blocks.append(
                torch.zeros(rows, self._length, dtype=self.dtype, device=self.device)
            )
        self._row(self._stored).copy_(vector)
        self._stored += 1

    def _orthogonalise(
        self, vector: torch.Tensor, count: int
    ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """``vector`` less its projection on the first ``count`` rows.

        Returns the residual, the projection's coefficients, the residual's norm and
        ``vector``'s, ``√(‖c‖² + ‖r‖²)`` (the rows are orthonormal: no reduction of its own).
        Classical Gram–Schmidt, twice ("twice is enough"): the second pass corrects the
        first's coefficients, whose float32 slice sums are off by up to 10⁻⁶ of ``‖vector‖``
        where the terms share a sign (``α = qᵀAq`` of a positive curvature), so the
        coefficients returned are both passes' sum and ``α`` is the coefficient of the
        residual actually left (Daniel, Gragg, Kaufman & Stewart 1976). A single pass left
        ``q_{j+1}`` 10⁻⁵ off orthogonal to ``q_j`` within 12 steps at ``P = 10⁶`` (float32), and the
        measured rounding, the certificate's floor, 60 times larger. With ``keep``, on the
        rows ``_first_kept(count) … count − 1`` alone. ``vector`` is left as it was (a product
        the operator's self-check still holds): the residual is a vector of its own. (Not the
        row the window dropped: held until the next step, it would add a vector to the
        product's peak, the probe's largest moment.)
        """
        rows = self._rows(count)
        coefficients = self._project(rows, vector)
        residual = self._subtract(rows, coefficients, vector, in_place=False)
        correction = self._project(rows, residual)
        self._subtract(rows, correction, residual, in_place=True)
        coefficients = coefficients + correction  # twice is enough
        remaining = self.shards.norm(residual)
        length = (float(coefficients.square().sum()) + remaining**2) ** 0.5
        return residual, coefficients, remaining, length

    def _rows(self, count: int) -> list[torch.Tensor]:
        """The rows ``0 … count − 1`` still held: one a tensor, or blocks of :data:`_BLOCK`."""
        if self.keep is not None:
            return [self._row(i) for i in range(self._first_kept(count), count)]
        return [
            block[: count - first]
            for first, block in zip(range(0, count, _BLOCK), self._blocks, strict=False)
        ]

    def _project(self, rows: list[torch.Tensor], vector: torch.Tensor) -> torch.Tensor:
        """The coefficients of ``vector`` on ``rows``, summed over processes in one collective."""
        local = torch.cat([inner_products(row, vector).reshape(-1) for row in rows])
        return self.shards.all_sum(local)

    @staticmethod
    def _subtract(
        rows: list[torch.Tensor], coefficients: torch.Tensor, vector: torch.Tensor, in_place: bool
    ) -> torch.Tensor:
        """``vector − coefficientsᵀ rows``, in ``vector`` itself or in a new vector.

        New on the first pass: its ``vector`` is a product the operator's self-check holds.
        """
        result = vector if in_place else None
        start = 0
        for row in rows:  # one row (a window's): an axpy; a block of rows: one gemv
            count = 1 if row.dim() == 1 else row.shape[0]
            c = coefficients[start : start + count].to(vector.dtype)
            start += count
            if result is None:  # the first update makes the result
                result = (
                    torch.sub(vector, row, alpha=float(c))
                    if row.dim() == 1
                    else torch.addmv(vector, row.T, c, alpha=-1)
                )
            elif row.dim() == 1:
                result.sub_(row, alpha=float(c))
            else:
                result.addmv_(row.T, c, alpha=-1)
        assert result is not None
        return result

    def _record_rounding(self, coefficients: torch.Tensor) -> None:
        """Note how far ``Qᵀ A q_j`` is from the exact ``(0, …, 0, β_{j-1}, α_j)``.

        For an exactly symmetric operator in exact arithmetic the coefficients of ``A q_j``
        on the older basis vectors vanish and the one on ``q_{j-1}`` equals ``β_{j-1}``; what
        is left measures the rounding of the products along the explored directions, the
        same kind of quantity (``uᵀ E v``) as the first-order eigenvalue error ``yᵀ E y``.
        """
        j = self.num_steps  # the coefficients are on the rows j + 1 − len … j
        if j == 0:
            return
        deviations = coefficients[:-1].abs()
        deviations[-1] = (coefficients[-2] - self.betas[j - 1]).abs()
        self.rounding = max(self.rounding, float(deviations.max()))

    def step(self) -> bool:
        """Take one product; return ``False`` once no further step is possible."""
        j = self.num_steps
        if j >= self.max_iter or self._stored <= j:
            return False
        q = self._row(j)
        w, coefficients, beta, image = self._orthogonalise(self.matvec(q), j + 1)
        alpha = float(coefficients[-1])
        self._record_rounding(coefficients)
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
            self._store(w.div_(beta))  # w is the orthogonalisation's own vector
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
        for _ in range(attempts):
            fresh = self.shards.randn(self.generator, self.dtype, self.device)
            kept, _, remaining, length = self._orthogonalise(fresh, count)
            if remaining > 1e-3 * length:
                kept, _, remaining, _ = self._orthogonalise(kept / remaining, count)
                return kept / remaining
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
