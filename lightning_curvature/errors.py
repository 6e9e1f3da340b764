"""The project's warning and error classes for bad luck during a measurement."""

from __future__ import annotations

import math

__all__ = [
    "CurvatureWarning",
    "NonFiniteCurvatureError",
    "PeerFailure",
    "PiecewiseLinearError",
    "ProbeFailure",
]


class CurvatureWarning(UserWarning):
    """Something went wrong in a measurement, but nothing the user trains was affected.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("Lanczos did not converge", CurvatureWarning)
        >>> caught[0].category.__name__
        'CurvatureWarning'
    """


class NonFiniteCurvatureError(ArithmeticError):
    """A loss or Hessian-vector product in a measurement was NaN or infinite.

    The model-level functions raise it so that a caller (a monitor) can skip that one
    measurement; the model is left untouched either way.

    Example:
        >>> issubclass(NonFiniteCurvatureError, ArithmeticError)
        True
    """

    @classmethod
    def agreed(cls, quantity: str, local: float) -> NonFiniteCurvatureError:
        """The error for ``quantity`` found not finite on some process, and agreed by all.

        ``local`` is this process's value. Every process raises together (none is left
        waiting in a collective), so on a process whose own value is finite the message
        says that another's was not, instead of quoting a finite value as not finite; the
        processes agree by a mean of 0/1 flags, which says that one failed, not which.

        Example:
            >>> str(NonFiniteCurvatureError.agreed("the probe loss", 0.5))
            'the probe loss is not finite on another process (here, it is 0.5).'
            >>> str(NonFiniteCurvatureError.agreed("the probe loss", float("nan")))
            'the probe loss is not finite (nan).'
        """
        rank = _rank()
        here = "" if rank is None else f" on rank {rank}"
        if math.isfinite(local):
            return cls(
                f"{quantity} is not finite on another process (here{here}, it is {local:.6g})."
            )
        return cls(f"{quantity} is not finite ({local}){here}.")


def _rank() -> int | None:
    """This process's rank under ``torch.distributed``, if it runs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return None


class PiecewiseLinearError(ValueError):
    """A finite difference was asked for through a piecewise-linear op (ReLU, max-pooling).

    Its products would cross the kinks and differ from the Hessian autograd defines. Found
    only once a forward has run (a functional ``F.relu`` is no module), so a monitor skips
    that probe with one warning instead of stopping training.

    Example:
        >>> issubclass(PiecewiseLinearError, ValueError)
        True
    """


class PeerFailure(Exception):
    """Another process failed in the probe this process is running.

    Raised at a status collective of an
    :class:`~lightning_curvature.functional.distributed.agreement.Agreement`, on every process
    at once, before the payload of that collective moves. It is no ``RuntimeError`` (nor any
    class a probe catches to fall back), so nothing between the collective and the probe's
    boundary swallows it.

    Example:
        >>> issubclass(PeerFailure, RuntimeError)
        False
    """


class ProbeFailure(Exception):
    """A probe failed on at least one process; raised on every process, after they agreed.

    Args:
        failures: what each failed process raised, by rank (``"ValueError: ..."``).
        world_size: the number of processes that ran the probe.

    Attributes:
        failures: as given.
        world_size: as given.

    Example:
        >>> str(ProbeFailure({1: "RuntimeError: out of memory"}, world_size=2))
        'rank 1 raised RuntimeError: out of memory'
        >>> str(ProbeFailure({0: "ValueError: bad"}, world_size=1))
        'ValueError: bad'
    """

    def __init__(self, failures: dict[int, str], world_size: int = 1) -> None:
        self.failures = dict(sorted(failures.items()))
        self.world_size = world_size
        super().__init__(self.describe())

    def describe(self) -> str:
        """What failed, naming the ranks when there are several processes."""
        if self.world_size == 1:
            return "; ".join(self.failures.values())
        return "; ".join(f"rank {rank} raised {what}" for rank, what in self.failures.items())

    @property
    def kinds(self) -> set[str]:
        """The exception classes' names (``"ValueError"``), from each ``"Class: message"``."""
        return {what.split(":", 1)[0] for what in self.failures.values()}
