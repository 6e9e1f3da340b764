"""The checks of a monitor's constructor arguments: loud on bad input, at construction.

Each raises a ``MisconfigurationException`` naming the argument, what it takes and what it
got, before any training: :func:`check_probe_arguments` for the arguments every monitor
shares, and :func:`refuse_unknown` for a misspelt one. The checks themselves are the
package's one set, :mod:`lightning_curvature.checks`, given Lightning's exception.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, NoReturn

from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_curvature.checks import (
    check_callable,
    check_choice,
    check_integer,
    check_patterns,
    check_seed,
    shown,
)
from lightning_curvature.functional.operator.backends import BACKENDS

__all__ = ["check_probe_arguments", "refuse_unknown"]

_PROBES = ("fixed", "current")
_BATCH_NORM = ("eval", "train")
_ERROR = MisconfigurationException


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
    check_choice("probe", probe, _PROBES, error=_ERROR)
    check_choice("batch_norm", batch_norm, _BATCH_NORM, error=_ERROR)
    check_choice("backend", backend, BACKENDS, error=_ERROR)
    check_integer("probe_batches", probe_batches, error=_ERROR)
    if probe_dataloader is not None and (
        not isinstance(probe_dataloader, Iterable) or isinstance(probe_dataloader, (str, bytes))
    ):
        raise MisconfigurationException(
            "`probe_dataloader` must be None (the training data) or an iterable of batches "
            f"such as a DataLoader, got {shown(probe_dataloader)}."
        )
    if probe == "current" and (probe_batches != 1 or probe_dataloader is not None):
        raise MisconfigurationException(
            "`probe_batches` and `probe_dataloader` apply to probe='fixed' only; "
            "got probe='current'."
        )
    check_callable("loss_fn", loss_fn, "loss_fn(module, batch)", allow_none=True, error=_ERROR)
    check_seed("seed", seed, error=_ERROR)
    check_patterns("parameters", parameters, error=_ERROR)


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
