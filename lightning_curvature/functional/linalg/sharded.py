"""Flat vectors split across processes: each holds its shard, reductions are summed.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a ``DTensor`` sharded
along its first dimension, and each process holds one piece of it. The estimators then work
on *sharded vectors*: a process holds the concatenation of its local pieces of every measured
parameter (length ``P_local``), and every inner product or norm is its local part summed
across the processes (:class:`VectorShards`). Nothing gathers the full vector, so a Lanczos
basis of ``m`` vectors costs ``m·P_local`` entries per process.

Random vectors are well defined globally: for each vector one seed is drawn from the shared
generator (the same on every process, so the streams stay in step) and process ``r`` draws
its shard from a generator seeded with ``seed + r``. The global vector is then a function of
the generator's state, the number of processes and the layout; its entries are independent
(Rademacher or Gaussian) as the estimators need. A single process (``num_shards == 1``)
draws directly from the generator, as the unsharded code always did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lightning_curvature.functional.distributed.agreement import agreed
from lightning_curvature.functional.linalg import reductions
from lightning_curvature.functional.linalg.sampling import rademacher

__all__ = ["SUM_NOTHING", "AllSum", "VectorShards", "fsdp_shards", "local_tensor"]

AllSum = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


SUM_NOTHING: AllSum = _identity  # one process: the local sum is the sum


@dataclass(frozen=True)
class VectorShards:
    """How the flat vectors of an estimator are split across processes.

    Attributes:
        size: length of the global vector (``P``).
        local_size: length of this process's shard (``P_local``).
        all_sum: sums a tensor over the processes (identity on one process); every process
            must call it at the same points, with tensors of the same shape. FSDP2's is
            agreed (:func:`~lightning_curvature.functional.distributed.agreement.agreed`)
            and sums in place: the estimators pass tensors of their own.
        shard: this process's index.
        num_shards: number of processes holding pieces.

    Example:
        >>> whole = VectorShards.single(3)
        >>> whole.norm(torch.tensor([3.0, 0.0, 4.0]))
        5.0
    """

    size: int
    local_size: int
    all_sum: AllSum = SUM_NOTHING
    shard: int = 0
    num_shards: int = 1

    @classmethod
    def single(cls, size: int) -> VectorShards:
        """The whole vector on this process."""
        return cls(size=size, local_size=size)

    @property
    def sharded(self) -> bool:
        """Whether the vectors are split (more than one shard)."""
        return self.num_shards > 1

    def inner_products(self, rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """Global ``rows @ vector``, a float64 tensor (see :func:`~.reductions.inner_products`)."""
        return self.all_sum(reductions.inner_products(rows, vector))

    def norm(self, vector: torch.Tensor) -> float:
        """Global Euclidean norm (slices summed in float64, see :mod:`~.reductions`)."""
        return float(self.inner_products(vector, vector).sqrt())

    def norm_of(self, tensors: Sequence[torch.Tensor]) -> float:
        """Global norm of several tensors together (each a piece of one vector)."""
        local = torch.stack([t.double().square().sum() for t in tensors]).sum()
        return float(self.all_sum(local).sqrt())

    def max_of(self, values: Sequence[torch.Tensor], device: torch.device) -> float:
        """The largest of ``values`` over every process (0 where none has any).

        Sharded, each process puts its maximum in its own slot of a vector that is summed,
        so ``all_sum`` is the only collective needed.

        Example:
            >>> values = [torch.tensor(1.0), torch.tensor(3.0)]
            >>> VectorShards.single(2).max_of(values, torch.device("cpu"))
            3.0
        """
        local = float(torch.stack(list(values)).max()) if values else 0.0
        if not self.sharded:
            return local
        slots = torch.zeros(self.num_shards, dtype=torch.float64, device=device)
        slots[self.shard] = local
        return float(self.all_sum(slots).max())

    def check_vector(
        self,
        name: str,
        vector: torch.Tensor,
        device: torch.device,
        *,
        nonnegative: bool = False,
        nonzero: bool = False,
    ) -> None:
        """Refuse argument ``name``, a vector over the measured parameters, on every process.

        Its shape must be ``(local_size,)``, its entries finite (``>= 0`` with
        ``nonnegative``) and, with ``nonzero``, not all zero over the processes. The verdict
        takes one ``all_sum``, so every process raises together and none waits alone.

        Raises:
            ValueError: naming ``name``, what it must be, and where it is not.

        Example:
            >>> VectorShards.single(2).check_vector("direction", torch.zeros(2), torch.device(
            ...     "cpu"), nonzero=True)
            Traceback (most recent call last):
            ...
            ValueError: `direction` must not be zero everywhere, got only zeros.
        """
        shaped = tuple(vector.shape) == (self.local_size,)
        finite = shaped and bool(torch.isfinite(vector).all())
        signed = finite and not (nonnegative and bool((vector < 0).any()))
        moved = float((vector != 0).sum()) if shaped else 1.0
        local = (not shaped, not finite, not signed)
        flags = torch.tensor([*local, moved], dtype=torch.float64, device=device)
        total = self.all_sum(flags).tolist()
        shard = " (this process's shard)" if self.sharded else ""
        problems = (
            (
                f"have shape ({self.local_size},) over the measured parameters{shard}",
                f"got {tuple(vector.shape)}",
            ),
            ("be finite", "got NaN or infinite entries"),
            ("have entries >= 0", "got a negative one"),
        )
        for failed, mine, (rule, got) in zip(total[:3], local, problems, strict=True):
            if failed:
                raise ValueError(
                    f"`{name}` must {rule}, {got if mine else 'not on another process'}."
                )
        if nonzero and total[3] == 0:
            raise ValueError(f"`{name}` must not be zero everywhere, got only zeros.")

    def any_true(self, flag: bool | torch.Tensor, device: torch.device) -> bool:
        """Whether ``flag`` holds on any process (every process gets the same answer)."""
        value = torch.as_tensor(flag, dtype=torch.float64, device=device).reshape(()).clone()
        return bool(self.all_sum(value) > 0)

    def _generator(self, generator: torch.Generator) -> torch.Generator:
        if not self.sharded:
            return generator
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        local = torch.Generator(device=generator.device)
        local.manual_seed(seed + self.shard)
        return local

    def randn(
        self, generator: torch.Generator, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """This process's shard of a standard Gaussian vector (see the module docstring)."""
        return torch.randn(
            self.local_size, generator=self._generator(generator), dtype=dtype, device=device
        )

    def rademacher(
        self, generator: torch.Generator, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """This process's shard of a Rademacher (±1) vector."""
        return rademacher((self.local_size,), self._generator(generator), dtype, device)

    def orthonormal_columns(self, columns: torch.Tensor) -> torch.Tensor:
        """An orthonormal basis of the span of ``columns`` (``(n, s)``, this shard's rows).

        One process: Householder QR. Sharded: classical Gram-Schmidt run twice ("twice is
        enough") with globally summed inner products; a column with nothing left after the
        projection (a rank-deficient sketch) becomes zero.
        """
        if not self.sharded:
            q: torch.Tensor = torch.linalg.qr(columns)[0]
            return q
        basis: list[torch.Tensor] = []
        for column in columns.T:
            original = self.norm(column)
            for _ in range(2):
                if basis:
                    stacked = torch.stack(basis)
                    column = column - stacked.T @ self.inner_products(stacked, column).to(
                        column.dtype
                    )
            length = self.norm(column)
            keep = length > 16 * torch.finfo(column.dtype).eps * max(original, 1e-300)
            basis.append(column / length if keep else torch.zeros_like(column))
        return torch.stack(basis, dim=1)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's piece of a ``DTensor`` (an alias of its storage), else ``tensor``.

    Example:
        >>> t = torch.ones(2)
        >>> local_tensor(t) is t
        True
    """
    to_local = getattr(tensor, "to_local", None)
    if to_local is None or not _is_dtensor(tensor):
        return tensor
    with torch.no_grad():
        return to_local()  # type: ignore[no-any-return]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def fsdp_shards(tensors: Sequence[torch.Tensor]) -> VectorShards | None:
    """The sharding of FSDP2 parameters (``DTensor`` shards), or ``None`` for plain tensors.

    Raises:
        ValueError: if only some are ``DTensor``s, or they are not sharded along their first
            dimension over one one-dimensional device mesh (FSDP2 without tensor parallelism).

    Example:
        >>> fsdp_shards([torch.zeros(3)]) is None
        True
    """
    distributed = [_is_dtensor(t) for t in tensors]
    if not any(distributed):
        return None
    if not all(distributed):
        raise ValueError(
            "the measured parameters mix DTensor shards and plain tensors; measure either "
            "the sharded (fully_shard) parameters or the others, with `parameters=`."
        )
    from torch.distributed.tensor import Shard

    first = tensors[0].device_mesh  # type: ignore[attr-defined]
    same_mesh = all(t.device_mesh == first for t in tensors)  # type: ignore[attr-defined]
    layouts = {tuple(t.placements) for t in tensors}  # type: ignore[attr-defined]
    if not same_mesh or first.ndim != 1 or layouts != {(Shard(0),)}:
        raise ValueError(
            "curvature over DTensor parameters needs FSDP2's layout: every parameter sharded "
            "along dim 0 on one 1-D device mesh (fully_shard without tensor parallelism); got "
            f"placements {sorted(map(str, layouts))}"
            f"{'' if same_mesh else ' on several device meshes'}."
        )
    import torch.distributed as dist

    group = first.get_group()
    # agreed: inside a probe, a status collective first (a failure on one process is all's)
    all_sum = agreed(lambda total: dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group))
    local = sum(local_tensor(t).numel() for t in tensors)
    return VectorShards(
        size=sum(t.numel() for t in tensors),
        local_size=local,
        all_sum=all_sum,
        shard=dist.get_rank(group),
        num_shards=dist.get_world_size(group),
    )
