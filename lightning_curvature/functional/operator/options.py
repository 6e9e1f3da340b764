"""The operator's settings as one value, and the one way the estimators open the operator.

:func:`~lightning_curvature.functional.eigenvalues.hessian_eigenvalues`,
:func:`~lightning_curvature.functional.trace.hessian_trace` and
:func:`~lightning_curvature.functional.density.spectral_density` take the operator's
settings either as keywords (``parameters=``, ``backend=``, ``batch_norm=``,
``curvature=``, ``all_reduce=``) or together as ``options=OperatorOptions(...)`` (handy to
pass one configuration to several calls); giving both is refused. They all measure through
:func:`open_operator`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from lightning_curvature.functional.linalg.sampling import check_generator
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.parameters import ParameterPatterns
from lightning_curvature.functional.model.probe import BatchNormMode
from lightning_curvature.functional.operator.backends import AllReduce, HVPBackend, check_settings
from lightning_curvature.functional.operator.ggn import Curvature
from lightning_curvature.functional.operator.operator import HessianOperator

__all__ = ["OperatorOptions", "open_operator"]


@dataclass(frozen=True)
class OperatorOptions:
    """How :class:`~lightning_curvature.functional.operator.operator.HessianOperator` is built.

    Attributes:
        parameters: glob pattern(s) selecting the measured parameters (all trainable ones
            by default).
        backend: the product strategy (see ``HessianOperator``).
        batch_norm: BatchNorm mode during the probe (running statistics never change).
        dropout: keep dropout on during the probe (default off): one set of masks per probe,
            the same for every product (see ``HessianOperator``).
        curvature: ``"hessian"`` or ``"ggn"`` (the generalized Gauss–Newton matrix, for a
            ``loss_fn`` that is an
            :class:`~lightning_curvature.functional.operator.ggn.OutputLoss`).
        all_reduce: averages a tensor across processes (DDP).

    Raises:
        ValueError: naming a setting of the wrong kind (``TypeError``: ``all_reduce`` not
            callable).

    Example:
        >>> options = OperatorOptions(parameters="0.*", batch_norm="eval")
        >>> OperatorOptions.of(options) is options, OperatorOptions.of(None, "0.*").parameters
        (True, '0.*')
    """

    parameters: ParameterPatterns = None
    backend: HVPBackend = "auto"
    batch_norm: BatchNormMode = "as_is"
    dropout: bool = False
    curvature: Curvature = "hessian"
    all_reduce: AllReduce | None = None

    def __post_init__(self) -> None:
        check_settings(**{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def of(
        cls,
        options: OperatorOptions | None,
        parameters: ParameterPatterns = None,
        backend: HVPBackend = "auto",
        batch_norm: BatchNormMode = "as_is",
        curvature: Curvature = "hessian",
        all_reduce: AllReduce | None = None,
    ) -> OperatorOptions:
        """``options``, or the options the keywords of a model-level function give.

        A keyword left at its default does not count as given; ``options`` with a keyword
        that is given is refused (which would win is not obvious).

        Raises:
            ValueError: if ``options`` is given with another setting, or is not an
                ``OperatorOptions``.
        """
        given = cls(
            parameters=parameters,
            backend=backend,
            batch_norm=batch_norm,
            curvature=curvature,
            all_reduce=all_reduce,
        )
        if options is None:
            return given
        if not isinstance(options, cls):
            raise ValueError(f"`options` must be an OperatorOptions or None, got {options!r}.")
        named = [f.name for f in fields(cls) if getattr(given, f.name) != f.default]
        if named:
            raise ValueError(
                "give the operator's settings either as `options` or as keywords, not both; "
                f"got `options` and {', '.join(f'`{name}`' for name in named)}."
            )
        return options

    def operator(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> HessianOperator:
        """The operator of ``loss_fn(model, batch)`` with these settings (not yet entered)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self)}
        return HessianOperator(model, loss_fn, batch, **settings)


@contextlib.contextmanager
def open_operator(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    options: OperatorOptions,
    generator: torch.Generator | None,
) -> Iterator[tuple[HessianOperator, torch.Generator]]:
    """Enter the operator and check the generator against its device.

    Yields:
        The open operator and the generator (default: seeded with 0 on the model's device).

    Raises:
        ValueError: on invalid settings, or a generator on another device than the model.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> with open_operator(net, lambda m, x: m(x).pow(2).mean(), torch.eye(2),
        ...                    OperatorOptions(), None) as (H, generator):
        ...     H.matvec(torch.ones(2)), generator.device
        (tensor([1., 1.]), device(type='cpu'))
    """
    with options.operator(model, loss_fn, batch) as operator:
        yield operator, check_generator(generator, operator.device)
