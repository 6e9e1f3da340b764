"""Agreement across processes: a probe that fails on one process is skipped by all together.

Under DDP or FSDP2 every process runs the same probe and meets the others at its
collectives (the products' all-reduce, the inner products of sharded vectors, the sums of
gradient samples). A process whose own code raises (an out-of-memory error, a non-finite
loss, any ``Exception``) stops calling them, and its peers would wait for it forever (or,
under gloo, die of a "collective mismatch"). An :class:`Agreement` keeps them in step:

1. **Every collective goes through one wrapper**, :func:`agreed`: a one-element *status*
   is summed over the processes first (0 here: all is well), then the payload. A sum above
   0 raises :class:`~lightning_curvature.errors.PeerFailure` on every process before the
   payload moves. The payload is summed in place: nothing is allocated between the status
   and the payload (an out-of-memory error there could not be agreed), and no copy of a
   gradient-sized payload is made (every caller in the package passes a tensor of its own,
   as Lightning's in-place ``strategy.reduce`` required before).
2. **A process whose own code raised sends exactly one status of 1**, from the probe's
   boundary (:meth:`Agreement.probe` catches the exception). It meets its peers' next
   status, wherever in the probe they are (mid-Lanczos included), so every process leaves
   the probe after the same collective.
3. **Every probe ends with one more status** (0), so a failure after the probe's last
   payload collective is agreed as well.
4. Every process now knows the probe failed; one more collective sends what each failed
   process raised to all (:meth:`Agreement.probe`), and
   :class:`~lightning_curvature.errors.ProbeFailure` is raised on every process, naming the
   ranks and their exceptions. ``KeyboardInterrupt`` and ``SystemExit`` are no
   ``Exception`` and pass through untouched.

A non-finite loss or product is one such failure: each process checks its own values and
raises :class:`~lightning_curvature.errors.NonFiniteCurvatureError`; the agreement does the
rest (there is no second mechanism for NaNs).

The wrapper finds the agreement of the running probe in a context variable (as autograd
finds grad mode), so collectives deep in ``linalg/`` (Lanczos's sharded inner products)
are agreed without an argument threaded through every estimator; outside a probe it sums
and checks nothing. Under FSDP2 the model's own collectives (the all-gather before each
sharded module's forward, the reduce-scatter in its backward) carry no status;
:func:`checked_forwards` and :func:`check_agreement` put one before each sharded module's
forward and before each backward, which agrees every failure raised outside FSDP's own
collectives (a ``training_step`` that raises before its forward, a loss that cannot be
checked) but not one raised inside a forward or backward between two of them.

Cost, measured with 2 gloo processes on a 2-core CPU: a status all-reduce costs what any
tiny all-reduce does (0.1-0.3 ms here). It replaces the barrier that Lightning's
``strategy.reduce`` makes before each all-reduce, which the callbacks no longer call: per
reduction, two collectives before and after. Folding the status into the payload (one
collective) cannot work: a process that failed does not know the size of its peers' next
payload, and collectives of different sizes do not meet.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_curvature.errors import PeerFailure, ProbeFailure

__all__ = [
    "DESCRIPTION_BYTES",
    "Agreement",
    "InPlaceSum",
    "agreed",
    "check_agreement",
    "checked_forwards",
    "describe_error",
]

#: Sums a tensor over the processes, in place (``torch.distributed.all_reduce``).
InPlaceSum = Callable[[torch.Tensor], Any]
#: Bytes of each failed process's description sent to all (UTF-8, cut there).
DESCRIPTION_BYTES = 1024

_ACTIVE: contextvars.ContextVar[Agreement | None] = contextvars.ContextVar(
    "lightning_curvature_agreement", default=None
)


def describe_error(error: BaseException) -> str:
    r"""``"Class: message"`` on one line, what a process tells the others it raised.

    Example:
        >>> describe_error(ValueError("bad shape\n  (3, 2)")), describe_error(KeyError())
        ('ValueError: bad shape (3, 2)', 'KeyError')
    """
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return type(error).__name__ + (f": {message}" if message else "")


def check_agreement() -> None:
    """A status collective of the running probe's agreement (nothing outside a probe).

    Raises:
        PeerFailure: if another process failed.
    """
    agreement = _ACTIVE.get()
    if agreement is not None:
        agreement.check()


def agreed(sum_in_place: InPlaceSum) -> Callable[[torch.Tensor], torch.Tensor]:
    """``sum_in_place`` as an agreed sum: a status collective first, inside a probe.

    The one wrapper of every collective a probe makes (see the module docstring). The
    returned function sums its argument in place and returns it: pass a tensor of your own.

    Example:
        >>> twice = agreed(lambda t: t.mul_(2))  # a stand-in for two equal processes
        >>> x = torch.ones(2)
        >>> twice(x) is x, x
        (True, tensor([2., 2.]))
    """

    def all_sum(tensor: torch.Tensor) -> torch.Tensor:
        check_agreement()
        sum_in_place(tensor)
        return tensor

    return all_sum


@contextlib.contextmanager
def checked_forwards(modules: Iterable[nn.Module]) -> Iterator[None]:
    """A status collective before each forward of ``modules`` (while a probe is agreeing).

    For FSDP2's sharded modules: the check runs before FSDP's own pre-forward hook (its
    all-gather), so a process that failed before that forward meets its peers there.

    Example:
        >>> net = nn.Linear(1, 1)
        >>> with checked_forwards([net]):  # no probe running: the check does nothing
        ...     _ = net(torch.ones(1))
        >>> len(net._forward_pre_hooks)
        0
    """
    handles = [m.register_forward_pre_hook(_check_hook, prepend=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_hook(module: nn.Module, args: Any) -> None:
    check_agreement()


class Agreement:
    """The processes of one probe, agreeing on its failure (see the module docstring).

    Args:
        sum_in_place: sums a tensor over the processes in place (unused with one process).
        rank: this process's rank.
        world_size: the number of processes.
        device: where the status tensors live (the collective's device: CUDA for NCCL).

    Example:
        One process: a failure of the block is raised as a ``ProbeFailure``.

        >>> try:
        ...     with Agreement().probe():
        ...         raise MemoryError("out of memory")
        ... except ProbeFailure as failure:
        ...     print(failure)
        MemoryError: out of memory
    """

    def __init__(
        self,
        sum_in_place: InPlaceSum | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
    ) -> None:
        if world_size > 1 and sum_in_place is None:
            raise ValueError(f"`sum_in_place` is needed for {world_size} processes.")
        self._sum = sum_in_place
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")

    def check(self) -> None:
        """One status collective, all is well here.

        Raises:
            PeerFailure: if another process sent a failure (on every process alike).
        """
        if self._status(0.0) > 0:
            raise PeerFailure("another process failed in this probe.")

    @contextlib.contextmanager
    def probe(self, describe: Callable[[Exception], str] = describe_error) -> Iterator[None]:
        """Run a probe whose collectives are agreed; a failure anywhere fails it everywhere.

        Inside another agreement's probe this does nothing more: the outer one covers it.

        Args:
            describe: what this process tells the others it raised.

        Raises:
            ProbeFailure: on every process, if the block raised an ``Exception`` on any.
        """
        if _ACTIVE.get() is not None:
            yield
            return
        token = _ACTIVE.set(self)
        own: Exception | None = None
        try:
            try:
                yield
                self.check()  # the closing status: a failure after the last payload
                return
            except PeerFailure:
                pass
            except Exception as error:
                own = error
                self._status(1.0)  # the one status this process sends after its failure
        finally:
            _ACTIVE.reset(token)
        try:
            text = None if own is None else describe(own)
        except Exception:
            text = describe_error(own)  # type: ignore[arg-type]
        raise ProbeFailure(self._gather(text), self.world_size) from own

    def _status(self, value: float) -> float:
        """The sum of every process's status (this one's ``value``)."""
        if self.world_size == 1:
            return value
        assert self._sum is not None
        status = torch.full((1,), value, dtype=torch.float32, device=self.device)
        self._sum(status)
        return float(status)

    def _gather(self, text: str | None) -> dict[int, str]:
        """Every failed process's description, by rank (one collective)."""
        if self.world_size == 1:
            return {} if text is None else {0: text}
        assert self._sum is not None
        rows = torch.zeros(self.world_size, DESCRIPTION_BYTES, dtype=torch.float32)
        if text is not None:
            data = list(text.encode()[:DESCRIPTION_BYTES] or b"?")
            rows[self.rank, : len(data)] = torch.tensor(data, dtype=torch.float32)
        rows = rows.to(self.device)
        self._sum(rows)
        found: dict[int, str] = {}
        for rank, row in enumerate(rows.cpu()):
            codes = [int(code) for code in row[row > 0].tolist()]
            if codes:
                found[rank] = bytes(codes).decode("utf-8", "replace")
        return found
