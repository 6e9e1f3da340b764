"""The one scheduler of the project: when a periodic callback acts.

Steps are *optimizer* steps (``trainer.global_step``), so gradient accumulation gives one
probe per step. With ``max_overhead`` the interval adapts after every probe so that probe
time stays under that fraction of the training time (what the probes add to a run without
them): after a probe of ``c`` seconds with training steps of ``s`` seconds, the next comes
``c / (f s)`` steps later (never sooner than ``every_n_steps`` if the user gave one, else
as soon as the next step); monitors that share one budget each use a share ``f`` of it.
``every_n_epochs`` acts at the end of every n-th epoch, as Lightning's own callbacks do. The
decision is computed on rank zero and broadcast, so every process probes at the same steps
(a mismatch would deadlock the all-reduced products).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["EveryNSteps", "ProbeSchedule", "resolve_every_n_steps"]

#: ``every_n_steps`` as a monitor takes it: ``"auto"`` is the monitor's own default cadence.
EveryNSteps = int | None | Literal["auto"]


def _check_positive_int(name: str, value: int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer or None" if allow_none else "a positive integer"
        raise MisconfigurationException(f"`{name}` must be {allowed}, got {value!r}.")


def resolve_every_n_steps(
    every_n_steps: EveryNSteps,
    default: int,
    every_n_epochs: int | None = None,
    max_overhead: float | None = None,
) -> int | None:
    """The step interval a monitor uses: ``"auto"`` means ``default`` unless another trigger is set.

    With ``every_n_epochs`` or ``max_overhead`` given, ``"auto"`` adds no step cadence of its
    own: epochs alone, or the budget alone with no floor (it may probe at every step if the
    probes are that cheap). A number or ``None`` is kept as given.

    Example:
        >>> resolve_every_n_steps("auto", 500)
        500
        >>> resolve_every_n_steps("auto", 500, max_overhead=0.05) is None  # budget only
        True
        >>> resolve_every_n_steps(20, 500, max_overhead=0.05)  # the user's floor
        20
    """
    if every_n_steps != "auto":
        return every_n_steps
    if every_n_epochs is not None or max_overhead is not None:
        return None
    return default


class ProbeSchedule:
    """Decides at which optimizer steps (and epochs) a callback acts.

    Args:
        every_n_steps: act when ``global_step`` is a multiple of it (step 0 included).
        every_n_epochs: act at the end of every n-th epoch (:meth:`is_due_at_epoch_end`;
            :meth:`is_due` tells a caller that can only act on a step the first step of one).
        on_train_end: also act once when training ends.
        max_overhead: time the probes may add, as a fraction of the training time (e.g.
            ``0.05``); the interval then adapts, with ``every_n_steps`` (default 1) as the
            shortest one.

    Raises:
        MisconfigurationException: on invalid values, or when no trigger is given.

    Example:
        >>> schedule = ProbeSchedule(every_n_steps=10)
        >>> [step for step in range(25) if schedule.is_due(step, epoch=0, epoch_start=False)]
        [0, 10, 20]
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        on_train_end: bool = False,
        max_overhead: float | None = None,
    ) -> None:
        _check_positive_int("every_n_steps", every_n_steps)
        _check_positive_int("every_n_epochs", every_n_epochs)
        if max_overhead is not None and not (
            isinstance(max_overhead, (int, float)) and 0 < max_overhead < 1
        ):
            raise MisconfigurationException(
                "`max_overhead` must be a fraction in (0, 1) such as 0.05, or None; "
                f"got {max_overhead!r}."
            )
        if (
            every_n_steps is None
            and every_n_epochs is None
            and max_overhead is None
            and not on_train_end
        ):
            raise MisconfigurationException(
                "Give at least one of `every_n_steps`, `every_n_epochs`, `max_overhead` or "
                "`on_train_end=True`: otherwise the callback never acts."
            )
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.on_train_end = on_train_end
        self.max_overhead = max_overhead
        self.next_step = 0  # adaptive mode only
        self.last_step = -1

    def is_due(self, global_step: int, epoch: int, epoch_start: bool) -> bool:
        """Whether to act at the start of optimizer step ``global_step``."""
        if global_step == self.last_step:
            return False  # already acted at this step (e.g. another micro-batch of it)
        if self.max_overhead is not None:
            return global_step >= self.next_step
        if self.every_n_steps is not None and global_step % self.every_n_steps == 0:
            return True
        return bool(
            epoch_start and self.every_n_epochs is not None and epoch % self.every_n_epochs == 0
        )

    def is_due_at_epoch_end(self, global_step: int, epoch: int) -> bool:
        """Whether to act at the end of epoch ``epoch`` (``global_step`` optimizer steps done).

        Example:
            >>> schedule = ProbeSchedule(every_n_epochs=2)
            >>> [epoch for epoch in range(5) if schedule.is_due_at_epoch_end(4 * epoch, epoch)]
            [1, 3]
        """
        if global_step == self.last_step or self.every_n_epochs is None:
            return False
        return (epoch + 1) % self.every_n_epochs == 0

    def next_interval(
        self, probe_seconds: float, step_seconds: float, budget: float | None = None
    ) -> int:
        """Steps until the next probe under the budget (rank zero computes it).

        Args:
            probe_seconds: what the last probe took.
            step_seconds: a training step's time (without any probe).
            budget: the fraction of time the probes may take (default ``max_overhead``; a
                share of it when several monitors split one budget).
        """
        assert self.max_overhead is not None
        shortest = self.every_n_steps or 1
        if not step_seconds > 0 or not math.isfinite(probe_seconds):
            return shortest
        f = self.max_overhead if budget is None else budget
        return max(shortest, math.ceil(probe_seconds / (f * step_seconds)))

    def record(self, global_step: int, interval: int | None = None) -> None:
        """Note that the callback acted at ``global_step`` (and the adaptive interval)."""
        self.last_step = global_step
        if interval is not None:
            self.next_step = global_step + interval

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state for checkpoints."""
        return {"next_step": self.next_step, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys keep their defaults)."""
        self.next_step = int(state.get("next_step", self.next_step))
        self.last_step = int(state.get("last_step", self.last_step))
