"""The checks of a monitor's constructor arguments: loud on bad input, at construction.

Each raises a ``MisconfigurationException`` naming the argument, what it takes and what it
got, before any training: :func:`check_probe_arguments` for the arguments every monitor
shares, :func:`check_choice` and :func:`check_flag` for a subclass's own, and
:func:`refuse_unknown` for a misspelt one.
"""

from __future__ import annotations

import inspect
from typing import Any, NoReturn

from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_curvature.checks import check_integer
from lightning_curvature.functional.operator.backends import BACKENDS

__all__ = ["check_choice", "check_flag", "check_probe_arguments", "refuse_unknown"]

_PROBES = ("fixed", "current")
_BATCH_NORM = ("eval", "train")


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Refuse ``value`` of argument ``name`` unless it is one of ``allowed``.

    Example:
        >>> check_choice("probe", "current", ("fixed", "current"))
        >>> check_choice("probe", "all", ("fixed", "current"))
        Traceback (most recent call last):
        ...
        lightning.fabric.utilities.exceptions.MisconfigurationException: `probe` must be one of ('fixed', 'current'), got 'all'.
    """  # noqa: E501
    if value not in allowed:
        raise MisconfigurationException(f"`{name}` must be one of {allowed}, got {value!r}.")


def check_flag(name: str, value: Any) -> None:
    """Refuse ``value`` of argument ``name`` unless it is ``True`` or ``False``.

    Example:
        >>> check_flag("checkpoint_warm_start", 1)
        Traceback (most recent call last):
        ...
        lightning.fabric.utilities.exceptions.MisconfigurationException: `checkpoint_warm_start` must be True or False, got 1.
    """  # noqa: E501
    if not isinstance(value, bool):
        raise MisconfigurationException(f"`{name}` must be True or False, got {value!r}.")


def _check_patterns(parameters: Any) -> None:
    """``parameters`` is None, a glob pattern, or a non-empty list of them."""
    if parameters is None or isinstance(parameters, str):
        return
    if (
        not isinstance(parameters, (list, tuple))
        or not parameters
        or not all(isinstance(p, str) for p in parameters)
    ):
        raise MisconfigurationException(
            "`parameters` must be None (every trainable parameter), a glob pattern of "
            f"parameter names or a non-empty list of them, got {parameters!r}."
        )


def check_probe_arguments(
    *,
    probe: Any,
    batch_norm: Any,
    backend: Any,
    probe_batches: Any,
    probe_dataloader: Any,
    loss_fn: Any,
    seed: Any,
    parameters: Any,
) -> None:
    """Refuse the arguments every monitor takes (see ``CurvatureMonitor``) that do not fit.

    Example:
        >>> check_probe_arguments(probe="fixed", batch_norm="eval", backend="auto",
        ...     probe_batches=2, probe_dataloader=None, loss_fn=None, seed=0, parameters="0.*")
    """
    check_choice("probe", probe, _PROBES)
    check_choice("batch_norm", batch_norm, _BATCH_NORM)
    check_choice("backend", backend, BACKENDS)
    check_integer("probe_batches", probe_batches, error=MisconfigurationException)
    if probe == "current" and (probe_batches != 1 or probe_dataloader is not None):
        raise MisconfigurationException(
            "`probe_batches` and `probe_dataloader` apply to probe='fixed' only; "
            "got probe='current'."
        )
    if loss_fn is not None and not callable(loss_fn):
        raise MisconfigurationException(
            f"`loss_fn` must be callable as loss_fn(module, batch), got {loss_fn!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MisconfigurationException(f"`seed` must be an integer, got {seed!r}.")
    _check_patterns(parameters)


def refuse_unknown(monitor: type[Callback], unknown: dict[str, Any]) -> NoReturn:
    """A misspelt argument names the monitor the user built and every argument it takes.

    The arguments are those of the ``__init__`` of ``monitor`` and of its bases, down to
    Lightning's ``Callback``.

    Raises:
        MisconfigurationException: always.
    """
    allowed: list[str] = []
    for cls in monitor.__mro__:
        if cls is Callback:
            break
        for name, param in inspect.signature(cls.__init__).parameters.items():  # type: ignore[misc]
            variadic = param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
            if name != "self" and not variadic and name not in allowed:
                allowed.append(name)
    raise MisconfigurationException(
        f"`{monitor.__name__}` got unexpected argument(s) "
        f"{', '.join(f'`{n}`' for n in unknown)}; it takes {', '.join(allowed)}."
    )
