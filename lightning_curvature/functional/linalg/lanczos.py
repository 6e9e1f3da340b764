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

A run that needs Ritz vectors (the top k > 1, eigenvectors for a warm start) may instead hold
at most ``rows`` basis vectors (``thick``; Wu & Simon 2000, "Thick-restart Lanczos method
for large symmetric eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2)):
when the basis is full it is replaced, in place, by the Ritz vectors of the extreme Ritz
values and the next Lanczos vector, and the run goes on from there. Its projection ``QᵀAQ``
is then a diagonal of the kept Ritz values bordered by their couplings to the next vector
(``A y_i = θ_i y_i + β s_{m,i} q_{m+1}``), continued by a tridiagonal; reorthogonalisation
stays full (against every row held), so no ghost appears. The kept space is the Krylov
space of ``ψ(A) b`` (``b`` the start, ``ψ`` the polynomial whose roots are the Ritz values
dropped), which is what lets a random start's miss bound go on across restarts
(:mod:`~lightning_curvature.functional.linalg.missed`). Such a run stops at a breakdown too:
a fresh direction would have to be orthogonal to the dropped vectors as well.

This module is the process alone; its rows live in
:mod:`~lightning_curvature.functional.linalg.basis` (which also decides how many a run may
hold), and what is read from it lives beside it:
:mod:`~lightning_curvature.functional.linalg.eigenpairs` certifies the extreme eigenpairs and
decides when to stop, :mod:`~lightning_curvature.functional.linalg.quadrature` gives the Gauss
quadrature of stochastic Lanczos quadrature.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lightning_curvature.functional.linalg.basis import KrylovBasis, ThickRestart
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
        thick: hold at most ``thick.rows`` basis vectors, restarting from the extreme Ritz
            vectors when full (see the module docstring); not with ``keep``.

    Attributes:
        dtype: the vectors' dtype (``start``'s); ``device`` likewise.
        spanned: the basis spans the whole space (``T``'s eigenvalues are ``A``'s).
        restarts: ``(row, β)`` for each restart: the last row of the block that broke down
            and the residual norm dropped there (it stays in every error bound).
        alphas, betas: the tridiagonal part of ``T`` (since the last thick restart).
        dropped: the Ritz values thick restarts dropped, all of them.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
        >>> run = LanczosProcess(lambda v: A @ v, torch.ones(3, dtype=torch.float64), 3)
        >>> while run.step():
        ...     pass
        >>> torch.linalg.eigvalsh(run.projection()).round(decimals=12)
        tensor([-2.,  1.,  3.], dtype=torch.float64)
        >>> short = LanczosProcess(lambda v: A @ v, torch.ones(3, dtype=torch.float64), 3, keep=2)
        >>> while short.step():
        ...     pass
        >>> torch.linalg.eigvalsh(short.projection()).round(decimals=12)
        tensor([-2.,  1.,  3.], dtype=torch.float64)
        >>> big = torch.diag(torch.linspace(0.0, 1.0, 50, dtype=torch.float64))
        >>> held = LanczosProcess(lambda v: big @ v, torch.ones(50, dtype=torch.float64), 40,
        ...                       thick=ThickRestart(rows=6, top=2))
        >>> while held.step():
        ...     pass
        >>> held.num_steps, held.order, len(held.basis)  # 40 products, never over 6 rows
        (40, 4, 4)
        >>> round(float(torch.linalg.eigvalsh(held.projection())[-1]), 6)
        1.0
    """

    def __init__(
        self,
        matvec: Matvec,
        start: torch.Tensor,
        max_iter: int,
        generator: torch.Generator | None = None,
        shards: VectorShards | None = None,
        keep: int | None = None,
        thick: ThickRestart | None = None,
    ) -> None:
        if keep is not None and keep < 2:
            raise ValueError(f"`keep` must be None or >= 2 (the recurrence's rows), got {keep}.")
        if keep is not None and thick is not None:
            raise ValueError("`keep` and `thick` bound the basis two ways: give one.")
        self.matvec = matvec
        self.keep = keep
        self.thick = thick
        self.shards = shards or VectorShards.single(start.numel())
        if self.shards.local_size != start.numel():
            raise ValueError(
                f"`start` has {start.numel()} entries but this process's shard has "
                f"{self.shards.local_size}."
            )
        self.size = self.shards.size  # of the whole space
        self.max_iter = min(max_iter, self.size)
        capacity = self.max_iter + 1 if thick is None else min(thick.rows, self.max_iter + 1)
        self.dtype, self.device = start.dtype, start.device  # `start` itself is not kept
        self._basis = KrylovBasis(
            start.numel(), capacity, self.dtype, self.device, self.shards, keep
        )
        start = start.detach()  # the run deals in numbers: its rows are no graph's nodes
        self._basis.append(start, self.shards.norm(start))
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[j] couples q_j and q_{j+1}; 0 after a restart
        self._locked: list[float] = []  # after a thick restart: the kept Ritz values …
        self._couplings: list[float] = []  # … and their couplings to the row after them
        self.dropped: list[float] = []
        self._restarted_log_norms = 0.0  # Σ log β of the rows before the last thick restart
        self._products = 0
        self._largest = 0.0  # the largest |α|, |θ| or coupling seen: with β, ‖T‖'s estimate
        self.residual_norm = float("nan")  # norm of the last residual before normalisation
        self.block_starts = [0]  # where each block begins: after a (near) breakdown
        self.restarts: list[tuple[int, float]] = []
        self.spanned = False
        self.rounding = 0.0  # largest deviation of Qᵀ A q_j from its exact value so far
        # no restart without the whole basis: a fresh direction must be orthogonal to all of it
        self.generator = generator if keep is None and thick is None else None

    @property
    def num_steps(self) -> int:
        """Products taken so far (the order of ``T`` unless a thick restart dropped rows)."""
        return self._products

    @property
    def order(self) -> int:
        """The order of ``T``: the basis vectors multiplied so far and still held."""
        return len(self._locked) + len(self.alphas)

    @property
    def basis(self) -> torch.Tensor:
        """The orthonormal vectors found so far, one a row (the next start included).

        Raises:
            ValueError: if the run keeps only its last rows (``keep``).
        """
        return self._basis.whole()

    @property
    def allocated_rows(self) -> int:
        """Basis rows allocated on the device: the run's memory beyond its products."""
        return self._basis.allocated

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``coefficientsᵀ Q``: vectors from their coordinates in the first rows of the basis.

        Args:
            coefficients: ``(m, c)``, one column per vector, ``m`` at most the rows stored.

        Raises:
            ValueError: if the run keeps only its last rows (``keep``).
        """
        return self._basis.combine(coefficients)

    @property
    def scale(self) -> float:
        """An estimate of ``‖T‖`` (≤ ``‖A‖``): the largest α (or kept θ) plus the largest β."""
        return self._largest + max(self.betas, default=0.0)

    def resolution(self, values: torch.Tensor) -> torch.Tensor:
        """The smallest error certifiable for each Ritz value, given the run's rounding.

        ``16·eps·|θ| + 4·ρ`` with ``ρ`` the largest deviation of ``Qᵀ A q_j`` from its exact
        value seen so far (see :meth:`_record_rounding`).
        """
        eps = torch.finfo(self.dtype).eps
        return _RELATIVE_ROUNDING * eps * values.abs() + _MEASURED_ROUNDING * self.rounding

    def _record_rounding(self, coefficients: torch.Tensor) -> None:
        """Note how far ``Qᵀ A q_j`` is from the exact ``(0, …, 0, β_{j-1}, α_j)``.

        For an exactly symmetric operator in exact arithmetic the coefficients of ``A q_j``
        on the older basis vectors vanish and the one on ``q_{j-1}`` equals ``β_{j-1}``; what
        is left measures the rounding of the products along the explored directions, the
        same kind of quantity (``uᵀ E v``) as the first-order eigenvalue error ``yᵀ E y``.
        """
        j = self.order  # the coefficients are on the rows j + 1 − len … j
        if j == 0:
            return
        deviations = coefficients[:-1].abs()
        if self.alphas:  # q_{j−1} is a Lanczos vector
            deviations[-1] = (coefficients[-2] - self.betas[-1]).abs()
        else:  # q_j follows a thick restart: the kept Ritz vectors couple to it
            couplings = torch.tensor(self._couplings, dtype=coefficients.dtype)
            kept = coefficients[-1 - len(couplings) : -1]
            deviations[-len(couplings) :] = (kept - couplings).abs()
        self.rounding = max(self.rounding, float(deviations.max()))

    def next_vector(self) -> torch.Tensor | None:
        """The basis vector the next step multiplies (``None`` once no step is possible).

        A full thick-restarted basis restarts here first. Several runs can then multiply
        their next vectors in one batched call and each take its own with ``step(product)``.
        """
        if self.num_steps >= self.max_iter or self._basis.stored <= self.order:
            return None
        if self._basis.stored == self._basis.capacity and self.thick is not None:
            self._thick_restart(self.thick)
        return self._basis.row(self.order)

    def step(self, product: torch.Tensor | None = None) -> bool:
        """Take one product; return ``False`` once no further step is possible.

        ``product``: ``A`` times :meth:`next_vector`, taken elsewhere; ``None``: ``matvec``'s.
        """
        q = self.next_vector()
        if q is None:
            return False
        j = self.order
        image = self.matvec(q) if product is None else product
        w, coefficients, beta, image_norm = self._basis.orthogonalise(image, j + 1)
        self._products += 1
        alpha = float(coefficients[-1])
        self._record_rounding(coefficients)
        self.alphas.append(alpha)
        self._largest = max(self._largest, abs(alpha))
        self.residual_norm = beta
        if j + 1 >= self.size:  # the whole space is spanned: T is exact up to rounding
            self.spanned = True
            return False
        if self.num_steps >= self.max_iter:
            return False
        scale = max(self.scale, 1e-30)
        if beta > _BREAKDOWN * torch.finfo(w.dtype).eps * scale:
            if beta <= _NEARLY_INVARIANT * image_norm:
                self.block_starts.append(j + 1)
            self.betas.append(beta)
            self._basis.append(w, beta)  # normalised as it is stored
            return True
        # Breakdown: span(Q) is invariant up to rounding. Restart orthogonally, or stop.
        fresh = None if self.generator is None else self._fresh_direction(j + 1)
        if fresh is None:
            return False
        self.restarts.append((j, beta))
        self.betas.append(0.0)
        self._basis.append(fresh)
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
            kept, _, remaining, length = self._basis.orthogonalise(fresh, count)
            if remaining > 1e-3 * length:
                kept, _, remaining, _ = self._basis.orthogonalise(kept / remaining, count)
                return kept / remaining
        return None

    def projection(self) -> torch.Tensor:
        """``T = QᵀAQ`` (float64, on the CPU) over the rows multiplied so far.

        Tridiagonal; after a thick restart, the kept Ritz values on the diagonal, bordered by
        their couplings to the row after them, and the tridiagonal from there.
        """
        head = len(self._locked)
        diagonal = torch.tensor([*self._locked, *self.alphas], dtype=torch.float64)
        off = torch.tensor(self.betas[: len(self.alphas) - 1], dtype=torch.float64)
        t = torch.diag(diagonal)
        t[head:, head:] += torch.diag(off, 1) + torch.diag(off, -1)
        if head and self.alphas:
            couplings = torch.tensor(self._couplings, dtype=torch.float64)
            t[:head, head] = couplings
            t[head, :head] = couplings
        return t

    def log_norm(self) -> float:
        """``Σ log β`` over every product of the run, the last one's residual norm included.

        ``log ‖p(A) b‖`` for the unit start ``b`` and ``p`` the monic polynomial whose roots
        are the Ritz values and :attr:`dropped` (``β₁⋯β_m`` without a thick restart; see
        :mod:`~lightning_curvature.functional.linalg.missed`). ``-inf`` after a breakdown.
        """
        if not self.residual_norm > 0.0:
            return -math.inf
        kept = self.betas[: len(self.alphas) - 1]
        return self._restarted_log_norms + sum(map(math.log, kept)) + math.log(self.residual_norm)

    def _thick_restart(self, thick: ThickRestart) -> None:
        """Replace the basis by the extreme Ritz vectors and the next Lanczos vector.

        In place, a slice of columns at a time: the basis never needs a second copy. The
        dropped Ritz values join :attr:`dropped`, the roots of the filter polynomial ``ψ``
        that the kept space is the Krylov space of (``ψ(A) b``).
        """
        values, vectors = torch.linalg.eigh(self.projection())
        n = values.numel()
        # rows >= top + bottom + 3 leaves at least one value to drop
        kept = [*range(thick.bottom), *range(n - thick.top, n)]
        self.dropped += values[[i for i in range(n) if i not in kept]].tolist()
        coefficients = vectors[:, kept].to(dtype=self.dtype, device=self.device)
        self._basis.rotate(coefficients, n)
        self._locked = values[kept].tolist()
        self._couplings = (self.residual_norm * vectors[n - 1, kept]).tolist()
        self._largest = max([self._largest, *map(abs, self._locked), *map(abs, self._couplings)])
        self._restarted_log_norms += sum(map(math.log, self.betas))
        self.alphas, self.betas = [], []
        # A block begun by a near breakdown lives on in the rows after the kept ones.
        self.block_starts = [0] if len(self.block_starts) == 1 else [0, len(kept)]

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values (ascending), eigenvectors of ``T``, and bounds on their residuals.

        ``‖A Q s_i − θ_i Q s_i‖ ≤ β |s_{m,i}| + Σ_b β_b |s_{b,i}|``: the last residual and
        every residual a restart dropped (``A Q = Q T + Σ r e_rowᵀ``).
        """
        values, vectors = torch.linalg.eigh(self.projection())
        residuals = (self.residual_norm * vectors[-1, :]).abs()
        for row, dropped in self.restarts:
            residuals = residuals + dropped * vectors[row, :].abs()
        return values, vectors, residuals
