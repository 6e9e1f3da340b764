"""Argument checks shared by the model-level functions and the monitors that call them."""

from __future__ import annotations

from typing import Any

__all__ = ["check_integer"]


def check_integer(name: str, value: Any, minimum: int) -> None:
    """Raise unless ``value`` is an integer (not a bool) at least ``minimum``.

    Raises:
        ValueError: ``"`<name>` must be an integer >= <minimum>, got <value>."``

    Example:
        >>> check_integer("num_runs", 2, 1)
        >>> check_integer("num_runs", 2.0, 1)
        Traceback (most recent call last):
        ...
        ValueError: `num_runs` must be an integer >= 1, got 2.0.
    """
    if type(value) is not int or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
