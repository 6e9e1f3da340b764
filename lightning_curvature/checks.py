"""The one integer-argument check, shared by the model-level functions and the monitors.

Every count a user passes (``k``, ``num_hvps``, ``every_n_steps``, ``micro_batch_size``, …)
is checked here, so every such message reads the same: the argument, the allowed values and
the value given. The functions raise ``ValueError``; the callbacks pass Lightning's
``MisconfigurationException`` as ``error``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_integer"]


def check_integer(
    name: str,
    value: Any,
    minimum: int = 1,
    *,
    allow_none: bool = False,
    minimum_text: str | None = None,
    why: str = "",
    error: type[Exception] = ValueError,
) -> None:
    """Raise unless ``value`` is an integer (not a bool) at least ``minimum`` (or ``None``).

    Args:
        name: the argument's name, as the user typed it.
        value: what was given.
        minimum: the smallest allowed value.
        allow_none: whether ``None`` is allowed too.
        minimum_text: how the message names the minimum (default: the number).
        why: a reason appended to the allowed values, e.g. ``" for 'hutch++'"``.
        error: the exception class to raise.

    Raises:
        ValueError: (or ``error``) ``"`<name>` must be an integer >= <minimum>[<why>][ or
            None], got <value>."``

    Example:
        >>> check_integer("num_runs", 2, 1)
        >>> check_integer("num_runs", 2.0, 1)
        Traceback (most recent call last):
        ...
        ValueError: `num_runs` must be an integer >= 1, got 2.0.
        >>> check_integer("chunk_size", None, allow_none=True)
        >>> check_integer("chunk_size", 0, allow_none=True)
        Traceback (most recent call last):
        ...
        ValueError: `chunk_size` must be an integer >= 1 or None, got 0.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = minimum_text if minimum_text is not None else str(minimum)
        alternative = " or None" if allow_none else ""
        raise error(f"`{name}` must be an integer >= {bound}{why}{alternative}, got {value!r}.")
