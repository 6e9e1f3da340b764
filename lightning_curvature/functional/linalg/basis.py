"""Where a Lanczos basis lives, and how much of it: the rows, their memory, their budget.

:class:`KrylovBasis` holds the orthonormal rows of a
:class:`~lightning_curvature.functional.linalg.lanczos.LanczosProcess` on the vectors'
device, in one of three ways:

* the whole basis, in blocks of :data:`_BLOCK` rows allocated as the run goes (memory
  follows the steps taken, nothing is ever copied);
* a window of the last ``keep`` rows (local reorthogonalisation: a few vectors whatever the
  steps, for runs that need no Ritz vector), in one ``(keep, P)`` tensor written row by row
  in turn, so that both Gram–Schmidt passes read the rows together (one ``gemv`` each);
* at most ``capacity`` rows, which a thick restart rewrites in place (:meth:`rotate`; the
  policy is :class:`ThickRestart` and :func:`thick_restart`).

Which one a run gets is decided by the size of its whole basis against
:data:`FULL_BASIS_ENTRIES`. Against the rows held, :meth:`KrylovBasis.orthogonalise` runs
classical Gram–Schmidt twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_curvature.functional.linalg.reductions import inner_products
from lightning_curvature.functional.linalg.sharded import VectorShards

__all__ = [
    "FULL_BASIS_ENTRIES",
    "THICK_ROOM",
    "KrylovBasis",
    "ThickRestart",
    "basis_layout",
    "thick_restart",
]

#: A run keeps its whole basis only while its ``max_iter + 1`` rows hold at most this many
#: entries (64 MiB in float32: ``P ≈ 1.3·10⁶`` at ``max_iter = 50``); above, a run that needs
#: no Ritz vector keeps the recurrence's last two rows, and one that does at most
#: :func:`thick_restart`'s rows, so its memory no longer grows with its steps
#: (``benchmarks/bench_probe_memory.py``).
FULL_BASIS_ENTRIES = 1 << 24

#: Rows a thick-restarted run holds beyond twice the Ritz vectors it must keep, at least: a
#: cold λ₁ with eigenvectors at 10⁸ parameters took 62 products at 8 rows, 54 at 10, where a
#: two-row λ₁ took 47 (``benchmarks/bench_probe_memory.py``).
THICK_ROOM = 6

_BLOCK = 8  # basis rows allocated at a time
_COLUMNS = 1 << 16  # entries of each row a thick restart rewrites at a time


@dataclass(frozen=True)
class ThickRestart:
    """How a Lanczos run bounded to ``rows`` basis vectors restarts when full.

    Attributes:
        rows: the most basis vectors held (the next Lanczos vector included).
        top: Ritz vectors of the largest Ritz values kept at a restart.
        bottom: Ritz vectors of the smallest ones kept (for the smallest eigenvalue).

    Raises:
        ValueError: unless ``top >= 1``, ``bottom >= 0`` and ``rows >= top + bottom + 3``
            (the kept vectors, the next one, and room for two products before the next
            restart).

    Example:
        >>> ThickRestart(rows=8, top=3)
        ThickRestart(rows=8, top=3, bottom=0)
        >>> ThickRestart(rows=4, top=2)
        Traceback (most recent call last):
        ...
        ValueError: `rows` must be >= top + bottom + 3 (5), got 4.
    """

    rows: int
    top: int
    bottom: int = 0

    def __post_init__(self) -> None:
        if self.top < 1 or self.bottom < 0:
            raise ValueError(
                f"`top` must be >= 1 and `bottom` >= 0, got {self.top}, {self.bottom}."
            )
        least = self.top + self.bottom + 3
        if self.rows < least:
            raise ValueError(f"`rows` must be >= top + bottom + 3 ({least}), got {self.rows}.")


def thick_restart(k: int, smallest: bool, size: int, rows: int | None = None) -> ThickRestart:
    """How a run after the top ``k`` (and the smallest) holds at most ``rows`` basis vectors.

    ``rows`` defaults to what :data:`FULL_BASIS_ENTRIES` holds, at least
    ``2(k + 1 + smallest) +`` :data:`THICK_ROOM`. A restart keeps the Ritz vectors of half
    the rows: of the largest values (at least ``k + 1``: the one below the top k is the warm
    start's and the guard's), and with ``smallest`` a quarter of the rows' (at least one) of
    the smallest. Cold at the edge of stability, keeping only ``k + 1`` of 10 rows took 35
    products where the whole basis took 23; keeping 5 took 24. Keeping one at the bottom of
    10 left a smallest eigenvalue at the end of a dense spectrum uncertified after 200
    products (the dropped Ritz values crowd there, and the miss bound counts each); keeping
    three of 12 certified it in 144, the whole basis in 84
    (``benchmarks/bench_thick_restart.py``).

    Example:
        >>> thick_restart(1, False, size=10**7)
        ThickRestart(rows=10, top=5, bottom=0)
        >>> thick_restart(3, True, size=10**6)
        ThickRestart(rows=16, top=4, bottom=4)
    """
    if rows is None:
        rows = max(FULL_BASIS_ENTRIES // size, 2 * (k + 1 + int(smallest)) + THICK_ROOM)
    bottom = max(rows // 4, 1) if smallest else 0
    top = max(k + 1, min(rows // 2 - bottom, rows - bottom - 3))
    return ThickRestart(rows=rows, top=top, bottom=bottom)


def basis_layout(
    size: int,
    max_iter: int,
    k: int = 1,
    smallest: bool = False,
    eigenvectors: bool = False,
    bounded: bool | None = None,
    rows: int | None = None,
) -> tuple[int | None, ThickRestart | None]:
    """How a run over ``size`` entries holds its basis: ``(keep, thick)`` for the process.

    The whole basis while its ``max_iter + 1`` rows fit in :data:`FULL_BASIS_ENTRIES`;
    above, two rows (``keep=2``) for a run after the top one alone and no Ritz vector (or
    with ``bounded=True``), else at most :func:`thick_restart`'s rows (or ``rows``).

    Raises:
        ValueError: if ``bounded`` is ``True`` with ``k > 1``, ``eigenvectors`` or ``rows``.

    Example:
        >>> basis_layout(10**3, 50), basis_layout(10**7, 50)
        ((None, None), (2, None))
        >>> basis_layout(10**7, 50, eigenvectors=True)
        (None, ThickRestart(rows=10, top=5, bottom=0))
    """
    large = size * (min(max_iter, size) + 1) > FULL_BASIS_ENTRIES
    if bounded is None:
        bounded = large and k == 1 and not eigenvectors
    if bounded and (k > 1 or eigenvectors):
        raise ValueError(
            "`bounded=True` certifies only k=1 and keeps no basis to return eigenvectors "
            f"from; got k={k}, return_eigenvectors={eigenvectors}."
        )
    if bounded and rows is not None:
        raise ValueError("`bounded=True` keeps two rows: `rows` must then be None.")
    if bounded:
        return 2, None
    if rows is not None or large:
        return None, thick_restart(k, smallest, size, rows)
    return None, None


class KrylovBasis:
    """The orthonormal rows of a Lanczos basis, on the vectors' device (see the module).

    Args:
        length: entries of each row held here (this process's shard).
        capacity: the most rows ever held (blocks stop there).
        dtype, device: the rows'.
        shards: how the vectors are split across processes (inner products are summed).
        keep: hold only the last ``keep`` rows; ``None``: all of them, up to ``capacity``.

    Example:
        >>> rows = KrylovBasis(3, 3, torch.float64, torch.device("cpu"), VectorShards.single(3))
        >>> rows.append(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
        >>> residual, coefficients, norm, length = rows.orthogonalise(
        ...     torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64), 1)
        >>> residual.tolist(), coefficients.tolist(), norm, length
        ([0.0, 4.0, 0.0], [3.0], 4.0, 5.0)
    """

    def __init__(
        self,
        length: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        shards: VectorShards,
        keep: int | None = None,
    ) -> None:
        self.length, self.capacity, self.keep, self.shards = length, capacity, keep, shards
        self.dtype, self.device = dtype, device
        self._blocks: list[torch.Tensor] = []  # the whole basis, in blocks of _BLOCK rows
        self._ring: torch.Tensor | None = None  # with `keep`: one (keep, length) tensor, …
        self._window: list[torch.Tensor] = []  # … its rows as tensors of their own, oldest first
        self._slots: list[int] = []  # … and where each lies in the ring
        self.stored = 0

    @property
    def allocated(self) -> int:
        """Rows allocated on the device: what the basis costs in memory, in vectors."""
        ring = 0 if self._ring is None else self._ring.shape[0]
        return ring + sum(block.shape[0] for block in self._blocks)

    def whole(self) -> torch.Tensor:
        """All the rows stored, one a row (a new tensor).

        Raises:
            ValueError: if only the last rows are held (``keep``).
        """
        self._check_whole()
        return torch.cat(self._blocks)[: self.stored]

    def _check_whole(self) -> None:
        if self.keep is not None:
            raise ValueError(f"this run keeps only its last {self.keep} basis vectors (`keep`).")

    def row(self, index: int) -> torch.Tensor:
        """Row ``index`` (a view; it must still be held)."""
        if self.keep is not None:
            return self._window[index - (self.stored - len(self._window))]
        return self._blocks[index // _BLOCK][index % _BLOCK]

    def append(self, vector: torch.Tensor, divisor: float = 1.0) -> None:
        """Store ``vector / divisor`` as the next row (with ``keep``, over the oldest one).

        The division writes the row itself: normalising costs no pass of its own. The row
        is a number, not a node of a graph (``vector`` is detached).
        """
        if self.keep is not None:
            self._window.append(self._next_window_row())
            self.stored += 1
        else:
            if self.stored // _BLOCK == len(self._blocks):  # a thick restart reuses its blocks
                rows = min(_BLOCK, self.capacity - self.stored)
                self._blocks.append(
                    torch.zeros(rows, self.length, dtype=self.dtype, device=self.device)
                )
            self.stored += 1
        torch.div(vector.detach(), divisor, out=self.row(self.stored - 1))

    def _next_window_row(self) -> torch.Tensor:
        """The window's row for the next vector: a free one, else the oldest's.

        Each row is a tensor of its own over the ring's memory (``set_``, not a view), so
        that writing one changes the version counter of that row alone: the operator's
        self-check holds the newest row by reference, and a write to another row must not
        make it skip its comparison (nor must a view of the ring be copied every product).
        """
        rows = min(self.keep or 0, self.capacity)
        if self._ring is None:
            self._ring = torch.zeros(rows, self.length, dtype=self.dtype, device=self.device)
        if len(self._window) == rows:
            self._slots.append(self._slots.pop(0))
            return self._window.pop(0)
        ring, slot = self._ring, len(self._window)
        self._slots.append(slot)
        offset = ring.storage_offset() + slot * self.length
        return ring.new_empty(0).set_(ring.untyped_storage(), offset, (self.length,), (1,))

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``coefficientsᵀ Q``: vectors from their coordinates in the first rows.

        Args:
            coefficients: ``(m, c)``, one column per vector, ``m`` at most the rows stored.

        Raises:
            ValueError: if only the last rows are held (``keep``).
        """
        self._check_whole()
        total = coefficients.new_zeros(coefficients.shape[1], self.length)
        for first in range(0, coefficients.shape[0], _BLOCK):
            block = self._blocks[first // _BLOCK][: coefficients.shape[0] - first]
            total += coefficients[first : first + _BLOCK].T @ block
        return total

    def rotate(self, coefficients: torch.Tensor, count: int) -> None:
        """Rows ``0 … c − 1`` ← ``coefficientsᵀ`` rows ``0 … count − 1``; row ``count`` next.

        In place, :data:`_COLUMNS` entries of every row at a time (no second basis), for a
        thick restart: ``coefficients`` ``(count, c)`` the kept Ritz vectors' coordinates.
        """
        kept = coefficients.shape[1]
        held = self.rows(count)
        for first in range(0, self.length, _COLUMNS):
            columns = slice(first, first + _COLUMNS)
            rotated = coefficients.T @ torch.cat([block[:, columns] for block in held])
            for i, values in enumerate(rotated):
                self.row(i)[columns].copy_(values)
        self.row(kept).copy_(self.row(count))
        self.stored = kept + 1

    def rows(self, count: int) -> list[torch.Tensor]:
        """The rows ``0 … count − 1`` still held: one a tensor, or blocks of :data:`_BLOCK`."""
        if self.keep is not None:
            first = max(count - self.keep, self.stored - self.keep, 0)
            return [self.row(i) for i in range(first, count)]
        return [
            block[: count - first]
            for first, block in zip(range(0, count, _BLOCK), self._blocks, strict=False)
        ]

    def orthogonalise(
        self, vector: torch.Tensor, count: int
    ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """``vector`` less its projection on the first ``count`` rows (those still held).

        Returns the residual, the projection's coefficients, the residual's norm and
        ``vector``'s, ``√(‖c‖² + ‖r‖²)`` (the rows are orthonormal: no reduction of its own).
        Classical Gram–Schmidt, twice ("twice is enough"): the second pass corrects the
        first's coefficients, whose float32 slice sums are off by up to 10⁻⁶ of ``‖vector‖``
        where the terms share a sign (``α = qᵀAq`` of a positive curvature), so the
        coefficients returned are both passes' sum and ``α`` is the coefficient of the
        residual actually left (Daniel, Gragg, Kaufman & Stewart 1976). A single pass left
        ``q_{j+1}`` 10⁻⁵ off orthogonal to ``q_j`` within 12 steps at ``P = 10⁶`` (float32),
        and the measured rounding, the certificate's floor, 60 times larger. ``vector`` is
        left as it was (a product the operator's self-check still holds): the residual is a
        vector of its own, freed once stored (:meth:`append` divides it into its row). Kept
        for the next step instead, it saved its allocation but held one vector more through
        the next product, the probe's peak (``benchmarks/bench_probe_memory.py``). A
        ``vector`` that requires grad (a matvec through weights that do) is taken detached.
        """
        vector = vector.detach()
        rows, order = self._held(count)
        coefficients = self._project(rows, vector)
        residual = self._subtract(rows, coefficients, vector, torch.empty_like(vector))
        correction = self._project(rows, residual)
        self._subtract(rows, correction, residual, residual)
        coefficients = coefficients + correction  # twice is enough
        if order is not None:  # the ring's slots of the window's rows, oldest first
            coefficients = coefficients[order]
        remaining = self.shards.norm(residual)
        length = (float(coefficients.square().sum()) + remaining**2) ** 0.5
        return residual, coefficients, remaining, length

    def _held(self, count: int) -> tuple[list[torch.Tensor], list[int] | None]:
        """The rows ``0 … count − 1`` still held, and the order that sorts them by index.

        A window's rows, all held, are its ring (one matrix, so each Gram–Schmidt pass reads
        them together), in the ring's order; elsewhere :meth:`rows`, in order (``None``).
        """
        if self._ring is None or count != self.stored:
            return self.rows(count), None
        return [self._ring[: len(self._window)]], list(self._slots)

    def _project(self, rows: list[torch.Tensor], vector: torch.Tensor) -> torch.Tensor:
        """The coefficients of ``vector`` on ``rows``, summed over processes in one collective."""
        local = torch.cat([inner_products(row, vector).reshape(-1) for row in rows])
        return self.shards.all_sum(local)

    @staticmethod
    def _subtract(
        rows: list[torch.Tensor],
        coefficients: torch.Tensor,
        vector: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """``out ← vector − coefficientsᵀ rows`` (``out`` may be ``vector`` itself)."""
        source, start = vector, 0
        for row in rows:  # one row (a window's): an axpy; a block of rows: one gemv
            count = 1 if row.dim() == 1 else row.shape[0]
            c = coefficients[start : start + count].to(vector.dtype)
            start += count
            if row.dim() == 1:
                torch.sub(source, row, alpha=float(c), out=out)
            elif source is out:
                out.addmv_(row.T, c, alpha=-1)
            else:
                torch.addmv(source, row.T, c, alpha=-1, out=out)
            source = out
        return out
