"""The ``per_layer`` argument of every monitor: which blocks of parameters get their own tag.

One grammar for every monitor that takes it, parsed by the functional layer's one parser
(:func:`~lightning_curvature.functional.model.parameters.layer_blocks`):

* ``True``: one block per module (the parameter name up to its last dot), tagged by the
  module's name;
* a list of glob patterns of parameter names: one block per pattern, tagged by the pattern
  without its trailing ``.*`` or ``*`` (``"encoder.*"`` gives the tag ``encoder``);
* a dict of tag name to one pattern or a list of them: one block per tag, holding the
  parameters that match any of its patterns;
* ``False`` or ``None``: no blocks.

Every block is made of *measured* parameters (``parameters=`` of the monitor). A monitor
whose blocks come for free from one measurement over all parameters (traces, gradient
coherence) passes :attr:`LayerBlocks.functional` to its model-level function, whose result
is then keyed by tag; one that measures each block on its own (the top eigenvalue of each
block) asks :meth:`PerLayerMonitor.block_parameters` for each block's parameter names.
Every such monitor is a :class:`PerLayerMonitor`, which parses ``per_layer`` at
construction, checks its patterns against the measured parameters at ``setup``, and at each
probe measures the blocks that still have trainable parameters
(:attr:`PerLayerMonitor.measured_blocks`; see :mod:`~lightning_curvature.callbacks.measured`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_curvature.callbacks.monitor import CurvatureMonitor
from lightning_curvature.functional.model.parameters import (
    ParameterPatterns,
    PerLayer,
    layer_blocks,
    layer_parameters,
    select_parameters,
)
from lightning_curvature.functional.model.probe import unwrap_model

__all__ = ["LayerBlocks", "PerLayerMonitor"]


def _tag(pattern: str) -> str:
    """The tag of a listed pattern: ``"encoder.*"`` gives ``"encoder"``."""
    return pattern.removesuffix("*").removesuffix(".") or pattern


@dataclass(frozen=True)
class LayerBlocks:
    """A monitor's ``per_layer``, checked at construction.

    Attributes:
        modules: one block per module (``per_layer=True``).
        tags: tag name to the glob patterns of its block (empty with ``modules``).

    Example:
        >>> blocks = LayerBlocks.of(["0.*", "head*"])
        >>> blocks.tags, blocks.spec
        ({'0': ('0.*',), 'head': ('head*',)}, {'0': '0.*', 'head': 'head*'})
        >>> blocks.parameters(["0.weight", "0.bias", "head.weight"])
        {'0': ['0.weight', '0.bias'], 'head': ['head.weight']}
        >>> LayerBlocks.of(True).parameters(["0.weight", "2.weight"])
        {'0': ['0.weight'], '2': ['2.weight']}
    """

    modules: bool = False
    tags: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, per_layer: PerLayer) -> LayerBlocks:
        """Check ``per_layer`` and build the blocks.

        Raises:
            MisconfigurationException: unless ``per_layer`` is in the grammar of the module
                docstring, or when two listed patterns give the same tag.
        """
        try:
            blocks = layer_blocks(per_layer)
        except ValueError:
            raise MisconfigurationException(
                "`per_layer` must be True/False, a list of parameter-name patterns or a dict "
                f"of tag name to pattern(s) (strings each), got {per_layer!r}."
            ) from None
        if blocks is True:
            return cls(modules=True)
        if isinstance(per_layer, Mapping):
            return cls(tags=blocks)
        tags = {_tag(pattern): patterns for pattern, patterns in blocks.items()}
        if len(tags) < len(blocks):
            raise MisconfigurationException(
                f"`per_layer` patterns {list(blocks)} give the same tag name twice (a listed "
                "pattern is tagged without its trailing '.*'): name the blocks in a dict of "
                "tag name to pattern(s)."
            )
        return cls(tags=tags)

    @property
    def requested(self) -> bool:
        """Whether there is any block."""
        return self.modules or bool(self.tags)

    @property
    def functional(self) -> PerLayer:
        """What the model-level functions take as ``per_layer``: their blocks keyed by tag."""
        return True if self.modules else dict(self.tags)

    @property
    def spec(self) -> bool | dict[str, str | list[str]]:
        """A plain value, the monitors' ``per_layer`` attribute and state key entry.

        ``True``/``False``, or tag name to its pattern (a list where there are several).
        """
        if self.modules:
            return True
        plain = {tag: p[0] if len(p) == 1 else list(p) for tag, p in self.tags.items()}
        return plain or False

    def parameters(self, names: Sequence[str]) -> dict[str, list[str]]:
        """Tag name to the parameter names of its block, among the measured ``names``.

        Raises:
            ValueError: naming a pattern that matches none of ``names`` (raised at setup as
                a ``MisconfigurationException`` naming the monitor).
        """
        return layer_parameters(self.functional, names)

    def of_module(self, module: nn.Module, parameters: ParameterPatterns) -> dict[str, list[str]]:
        """:meth:`parameters` among the parameters of ``module`` a monitor measures.

        Args:
            module: the (possibly wrapped) module.
            parameters: the monitor's ``parameters=`` pattern(s).

        Raises:
            ValueError: as :meth:`parameters`, or if ``parameters`` match nothing.
        """
        named = select_parameters(unwrap_model(module), parameters)
        return self.parameters([name for name, _ in named])


class PerLayerMonitor(CurvatureMonitor):
    """A monitor with a ``per_layer`` argument: parsed at construction, checked at ``setup``.

    Args:
        per_layer: the blocks, in the grammar of the module docstring.
        **kwargs: see ``CurvatureMonitor``.

    Attributes:
        per_layer: ``True``/``False`` or tag name to pattern(s) (:attr:`LayerBlocks.spec`).

    Example:
        >>> class BlockNorms(PerLayerMonitor):
        ...     def measure(self, trainer, pl_module, batches):
        ...         blocks = self.block_parameters(pl_module)
        ...         params = dict(pl_module.named_parameters())
        ...         norms = {
        ...             f"norm/{tag}": sum(float(params[n].norm()) ** 2 for n in names) ** 0.5
        ...             for tag, names in blocks.items()
        ...         }
        ...         return norms, None
        >>> BlockNorms(per_layer={"head": "2.*"}, every_n_steps=10).per_layer
        {'head': '2.*'}
    """

    def __init__(self, *, per_layer: PerLayer = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.blocks = LayerBlocks.of(per_layer)
        self.per_layer = self.blocks.spec

    @override
    def check_model(self, pl_module: pl.LightningModule) -> None:
        super().check_model(pl_module)
        self.blocks.of_module(pl_module, self.parameters)

    @override
    def layer_spec(self) -> PerLayer:
        return self.blocks.functional

    @property
    def measured_blocks(self) -> PerLayer:
        """The blocks with measured parameters now, as the model-level functions take them.

        Those none of whose parameters is trainable any more are left out (one warning,
        :meth:`resolve_parameters`).
        """
        return self.blocks.functional if self._resolved is None else self._resolved.per_layer

    def block_parameters(self, pl_module: pl.LightningModule) -> dict[str, list[str]]:
        """Tag name to the parameter names of each block measured now."""
        names = [name for name, _ in self.measured_tensors(pl_module)]
        return layer_parameters(self.measured_blocks, names)
