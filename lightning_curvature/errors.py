"""The project's warning and error classes for bad luck during a measurement."""

from __future__ import annotations

__all__ = [
    "CurvatureCheckError",
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


class CurvatureCheckError(ValueError):
    """The curvature products of a probe are not the derivatives autograd defines.

    Found by the operator's checks of its own products (a finite difference that crosses a
    kink at its step's scale; a double backward whose products are not symmetric) or of
    the loss's graph (a kinked op before a finite difference). No value of that probe is
    returned; the message names the cause and the way out, and a monitor skips the probe
    with one warning instead of stopping training.

    Example:
        >>> issubclass(CurvatureCheckError, ValueError)
        True
    """


class PiecewiseLinearError(CurvatureCheckError):
    """A finite difference was asked for through a kinked op (ReLU, max-pooling, clamp, ...).

    Its products would cross the kinks and differ from the Hessian autograd defines. Found
    only once a forward has run (a functional ``F.relu`` is no module), so a monitor skips
    that probe with one warning instead of stopping training.

    Example:
        >>> issubclass(PiecewiseLinearError, CurvatureCheckError)
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
        """What failed, naming the ranks when there are several processes.

        Example:
            >>> ProbeFailure({1: "the module's training_step returned None"}, 2).describe()
            "rank 1: the module's training_step returned None"
        """
        if self.world_size == 1:
            return "; ".join(self.failures.values())
        return "; ".join(_ranked(rank, what) for rank, what in self.failures.items())

    @property
    def kinds(self) -> set[str]:
        """The exception classes' names (``"ValueError"``), from each ``"Class: message"``."""
        return {what.split(":", 1)[0] for what in self.failures.values()}


def _ranked(rank: int, what: str) -> str:
    """``what`` rank ``rank`` raised (``"Class: message"``) or ran into (a reason in words)."""
    raised = what.split(":", 1)[0].isidentifier()
    return f"rank {rank} raised {what}" if raised else f"rank {rank}: {what}"
