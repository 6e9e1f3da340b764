"""The argument checks every public function and every callback share: one message per kind.

Every argument a user passes is checked here, so every message reads the same: the
argument in backticks, the allowed values and the value given. Counts
(:func:`check_integer`, and :func:`check_budget` for counts of work, which refuses absurd
ones), real numbers in a range (:func:`check_real`), flags (:func:`check_flag`), choices
among strings (:func:`check_choice`), callables, modules, seeds, tensors and parameter
patterns. The functions raise ``ValueError`` (``TypeError`` for a callable that is not);
the callbacks pass Lightning's ``MisconfigurationException`` as ``error``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "MAX_BUDGET",
    "check_budget",
    "check_callable",
    "check_choice",
    "check_flag",
    "check_integer",
    "check_module",
    "check_path",
    "check_patterns",
    "check_real",
    "check_seed",
    "check_tensor",
    "shown",
]

#: The most Hessian-vector products (Lanczos steps, probes, grid points) one argument may ask
#: for. A million products is days of work on a model worth measuring; beyond that a budget
#: is a typo (``10**12`` would run for years), and it is refused instead of run.
MAX_BUDGET = 10**6
_MIN_SEED, _MAX_SEED = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


def shown(value: Any) -> str:
    """``value`` as a message quotes it: ``repr``, or a tensor's shape and dtype.

    Example:
        >>> shown(0.5), shown(torch.zeros(2, 3))
        ('0.5', 'a tensor of shape (2, 3) and dtype torch.float32')
    """
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_integer(
    name: str,
    value: Any,
    minimum: int = 1,
    *,
    maximum: int | None = None,
    allow_none: bool = False,
    minimum_text: str | None = None,
    maximum_text: str | None = None,
    why: str = "",
    error: type[Exception] = ValueError,
) -> None:
    """Raise unless ``value`` is an integer (not a bool) in ``[minimum, maximum]`` (or ``None``).

    Args:
        name: the argument's name, as the user typed it.
        value: what was given.
        minimum: the smallest allowed value.
        maximum: the largest allowed value (``None``: no bound).
        allow_none: whether ``None`` is allowed too.
        minimum_text: how the message names the minimum (default: the number).
        maximum_text: how the message names the maximum (default: the number).
        why: a reason appended to the allowed values, e.g. ``" for 'hutch++'"``.
        error: the exception class to raise.

    Raises:
        ValueError: (or ``error``) ``"`<name>` must be an integer >= <minimum>[ and <=
            <maximum>][<why>][ or None], got <value>."``

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
    if not _is_integer(value) or value < minimum or (maximum is not None and value > maximum):
        bound = minimum_text if minimum_text is not None else str(minimum)
        top = maximum_text if maximum_text is not None else str(maximum)
        upper = f" and <= {top}" if maximum is not None else ""
        alternative = " or None" if allow_none else ""
        raise error(
            f"`{name}` must be an integer >= {bound}{upper}{why}{alternative}, got {shown(value)}."
        )


def check_budget(
    name: str,
    value: Any,
    minimum: int = 1,
    *,
    allow_none: bool = False,
    minimum_text: str | None = None,
    why: str = "",
    error: type[Exception] = ValueError,
) -> None:
    """:func:`check_integer` for a count of work: at most :data:`MAX_BUDGET`.

    Example:
        >>> check_budget("num_hvps", 10**12)
        Traceback (most recent call last):
        ...
        ValueError: `num_hvps` must be an integer >= 1 and <= 1000000, got 1000000000000.
    """
    check_integer(
        name,
        value,
        minimum,
        maximum=MAX_BUDGET,
        allow_none=allow_none,
        minimum_text=minimum_text,
        why=why,
        error=error,
    )


def check_real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    error: type[Exception] = ValueError,
) -> None:
    """Raise unless ``value`` is a finite real number (not a bool) in the range given.

    Args:
        name: the argument's name.
        value: what was given.
        low: the lower end (``None``: none).
        high: the upper end (``None``: none).
        low_open: whether ``low`` itself is refused.
        high_open: whether ``high`` itself is refused.
        allow_none: whether ``None`` is allowed too.
        error: the exception class to raise.

    Example:
        >>> check_real("rho", 0.05, 0, low_open=True)
        >>> check_real("rho", 0.0, 0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: `rho` must be a finite number > 0, got 0.0.
        >>> check_real("tol", float("inf"), 0, 1, low_open=True, high_open=True)
        Traceback (most recent call last):
        ...
        ValueError: `tol` must be a finite number in (0, 1), got inf.
    """
    if value is None and allow_none:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = (
        number
        and math.isfinite(value)
        and (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high))
    )
    if not fits:
        if low is not None and high is not None:
            where = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            where = f" {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            where = f" {'<' if high_open else '<='} {high:g}"
        else:
            where = ""
        alternative = " or None" if allow_none else ""
        raise error(f"`{name}` must be a finite number{where}{alternative}, got {shown(value)}.")


def check_flag(name: str, value: Any, *, error: type[Exception] = ValueError) -> None:
    """Raise unless ``value`` is ``True`` or ``False`` (a truthy ``"no"`` is not).

    Example:
        >>> check_flag("smallest", "yes")
        Traceback (most recent call last):
        ...
        ValueError: `smallest` must be True or False, got 'yes'.
    """
    if not isinstance(value, bool):
        raise error(f"`{name}` must be True or False, got {shown(value)}.")


def check_path(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is a path: a ``str`` or an ``os.PathLike``.

    Example:
        >>> check_path("path", 3)
        Traceback (most recent call last):
        ...
        TypeError: `path` must be a path (a str or an os.PathLike), got 3.
    """
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a path (a str or an os.PathLike), got {shown(value)}.")


def check_choice(
    name: str,
    value: Any,
    allowed: Sequence[Any],
    *,
    allow_none: bool = False,
    error: type[Exception] = ValueError,
) -> None:
    """Raise unless ``value`` is one of ``allowed`` (compared by type and value).

    Example:
        >>> check_choice("probe", "current", ("fixed", "current"))
        >>> check_choice("probe", "all", ("fixed", "current"))
        Traceback (most recent call last):
        ...
        ValueError: `probe` must be one of ('fixed', 'current'), got 'all'.
    """
    if value is None and allow_none:
        return
    if not any(type(value) is type(option) and value == option for option in allowed):
        alternative = " or None" if allow_none else ""
        raise error(f"`{name}` must be one of {tuple(allowed)}{alternative}, got {shown(value)}.")


def check_callable(
    name: str,
    value: Any,
    usage: str = "",
    *,
    allow_none: bool = False,
    error: type[Exception] = TypeError,
) -> None:
    """Raise unless ``value`` is callable (``usage``: how it is called, for the message).

    Example:
        >>> check_callable("loss_fn", "mse", "loss_fn(model, batch)")
        Traceback (most recent call last):
        ...
        TypeError: `loss_fn` must be callable as loss_fn(model, batch), got 'mse'.
    """
    if value is None and allow_none:
        return
    if not callable(value):
        as_ = f" as {usage}" if usage else ""
        alternative = " or None" if allow_none else ""
        raise error(f"`{name}` must be callable{as_}{alternative}, got {shown(value)}.")


def check_module(name: str, value: Any, *, error: type[Exception] = TypeError) -> None:
    """Raise unless ``value`` is a ``torch.nn.Module``.

    Example:
        >>> check_module("model", None)
        Traceback (most recent call last):
        ...
        TypeError: `model` must be a torch.nn.Module, got None.
    """
    if not isinstance(value, nn.Module):
        raise error(f"`{name}` must be a torch.nn.Module, got {shown(value)}.")


def check_seed(name: str, value: Any, *, error: type[Exception] = ValueError) -> None:
    """Raise unless ``value`` is a seed ``torch.Generator.manual_seed`` takes.

    That is an integer in ``[-2**63, 2**64 - 1]`` (a negative one is read modulo ``2**64``).

    Example:
        >>> check_seed("seed", -3)
        >>> check_seed("seed", 2**64)
        Traceback (most recent call last):
        ...
        ValueError: `seed` must be an integer >= -2**63 and <= 2**64 - 1, got 18446744073709551616.
    """
    check_integer(
        name,
        value,
        _MIN_SEED,
        maximum=_MAX_SEED,
        minimum_text="-2**63",
        maximum_text="2**64 - 1",
        error=error,
    )


def check_tensor(
    name: str,
    value: Any,
    *,
    shape: tuple[int, ...] | None = None,
    values: bool = True,
    sign: Literal["", "positive", "nonnegative"] = "",
    nonzero: bool = False,
    allow_none: bool = False,
    error: type[Exception] = ValueError,
) -> None:
    """Raise unless ``value`` is a non-empty real tensor (of ``shape``, with such entries).

    Args:
        name: the argument's name.
        value: what was given.
        shape: the shape it must have (``None``: any).
        values: whether to check its entries (``False``: only that it is a real tensor, of
            any size; for a tensor checked later where its processes agree).
        sign: ``"positive"`` or ``"nonnegative"`` entries (``""``: any sign).
        nonzero: whether it must have an entry that is not zero.
        allow_none: whether ``None`` is allowed too.
        error: the exception class to raise.

    Example:
        >>> check_tensor("weights", torch.tensor([0.5, -0.5]), sign="nonnegative")
        Traceback (most recent call last):
        ...
        ValueError: `weights` must have entries >= 0, got one of -0.5.
    """
    if value is None and allow_none:
        return
    empty = values and isinstance(value, torch.Tensor) and value.numel() == 0
    if not isinstance(value, torch.Tensor) or value.is_complex() or empty:
        wanted = f" of shape {shape}" if shape is not None else ""
        alternative = " or None" if allow_none else ""
        raise error(
            f"`{name}` must be a non-empty real tensor{wanted}{alternative}, got {shown(value)}."
        )
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise error(f"`{name}` must have shape {tuple(shape)}, got {tuple(value.shape)}.")
    if not values:
        return
    if not bool(torch.isfinite(value).all()):
        raise error(f"`{name}` must be finite, got NaN or infinite entries.")
    if sign and not bool((value > 0).all() if sign == "positive" else (value >= 0).all()):
        bound = "> 0" if sign == "positive" else ">= 0"
        raise error(f"`{name}` must have entries {bound}, got one of {float(value.min()):g}.")
    if nonzero and not bool((value != 0).any()):
        raise error(f"`{name}` must not be zero everywhere, got only zeros.")


def check_patterns(name: str, value: Any, *, error: type[Exception] = ValueError) -> None:
    """Raise unless ``value`` is ``None``, a glob pattern or a non-empty list of them.

    Example:
        >>> check_patterns("parameters", ["encoder.*", "head.bias"])
        >>> check_patterns("parameters", 3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `parameters` must be None (every trainable parameter), a glob pattern ...
    """
    if value is None or (isinstance(value, str) and value):
        return
    if not (
        isinstance(value, (list, tuple)) and value and all(isinstance(p, str) and p for p in value)
    ):
        raise error(
            f"`{name}` must be None (every trainable parameter), a glob pattern of parameter "
            f"names or a non-empty list of them, got {shown(value)}."
        )
