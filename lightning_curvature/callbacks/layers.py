"""The ``per_layer`` argument of the monitors: which blocks of parameters get their own tag.

Two kinds of monitors take it:

* those that run one measurement per block (``HessianEigenvalueMonitor``): ``per_layer`` is
  ``True`` (one block per module,
  :func:`~lightning_curvature.functional.parameters.module_blocks`), a list of patterns or a dict of
  tag name to pattern(s), see :func:`layer_patterns`;
* those whose blocks come for free from one measurement over all parameters (traces,
  gradient coherence): ``per_layer`` may also be ``True`` (one block per module), see
  :class:`LayerBlocks`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["LayerBlocks", "LayerSpec", "layer_patterns"]

LayerSpec = Sequence[str] | Mapping[str, str | Sequence[str]] | None
BlockSpec = bool | Sequence[str] | Mapping[str, str]


def layer_patterns(per_layer: LayerSpec) -> dict[str, str | Sequence[str]]:
    """Tag name to parameter pattern(s): ``["encoder.*"]`` gives ``{"encoder": "encoder.*"}``.

    Raises:
        MisconfigurationException: unless ``per_layer`` is ``None``, a list of patterns or a
            dict of tag name to one pattern or a list of them (strings each).

    Example:
        >>> layer_patterns(["0.*", "head*"])
        {'0': '0.*', 'head': 'head*'}
    """
    if per_layer is None:
        return {}
    values = list(per_layer.values()) if isinstance(per_layer, Mapping) else per_layer
    if isinstance(per_layer, str) or not isinstance(values, (list, tuple)):
        _refuse(per_layer)
    for value in values:
        several = isinstance(per_layer, Mapping) and isinstance(value, (list, tuple)) and value
        if not (isinstance(value, str) or (several and all(isinstance(p, str) for p in value))):
            _refuse(per_layer)
    if isinstance(per_layer, Mapping):
        return dict(per_layer)
    return {
        pattern.removesuffix("*").removesuffix(".") or pattern: pattern for pattern in per_layer
    }


def _refuse(per_layer: object) -> NoReturn:
    raise MisconfigurationException(
        "`per_layer` must be True/False, a list of parameter-name patterns or a dict of tag "
        f"name to pattern(s) (strings each), got {per_layer!r}."
    )


@dataclass(frozen=True)
class LayerBlocks:
    """Blocks measured together with the whole: ``True``, patterns, or tag name to pattern.

    Attributes:
        everything: one block per module (``per_layer=True``).
        tags: tag name to the one glob pattern of each block (empty with ``everything``).

    Example:
        >>> blocks = LayerBlocks.of({"head": "2.*"})
        >>> blocks.patterns, blocks.tag("2.*")
        (['2.*'], 'head')
        >>> LayerBlocks.of(True).patterns, LayerBlocks.of(True).tag("0")
        (True, '0')
    """

    everything: bool = False
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, per_layer: BlockSpec) -> LayerBlocks:
        """Check ``per_layer`` and build the blocks.

        Raises:
            MisconfigurationException: unless ``per_layer`` is a bool, a list of patterns or
                a dict of tag name to one pattern (a string each).
        """
        if isinstance(per_layer, bool):
            return cls(everything=per_layer)
        values = per_layer.values() if isinstance(per_layer, Mapping) else per_layer
        if (
            isinstance(per_layer, str)
            or not isinstance(per_layer, (list, tuple, Mapping))
            or not all(isinstance(p, str) for p in values)
        ):
            _refuse(per_layer)
        return cls(tags={name: str(p) for name, p in layer_patterns(per_layer).items()})

    @property
    def patterns(self) -> bool | list[str]:
        """What the model-level functions take as ``per_layer``."""
        return self.everything or list(self.tags.values())

    @property
    def spec(self) -> bool | dict[str, str]:
        """A plain value for ``state_key``."""
        return self.everything or dict(self.tags)

    def check(self, names: Sequence[str]) -> None:
        """Refuse patterns that match none of the measured parameter ``names``.

        Raises:
            MisconfigurationException: naming the pattern and the measured names.

        Example:
            >>> LayerBlocks.of(["body.*"]).check(["body.weight"])  # fine
            >>> try:
            ...     LayerBlocks.of(["head.*"]).check(["body.weight"])
            ... except MisconfigurationException as err:
            ...     print(err)
            `per_layer` pattern 'head.*' matches none of the measured parameters ['body.weight'].
        """
        for pattern in self.tags.values():
            if not fnmatch.filter(names, pattern):
                raise MisconfigurationException(
                    f"`per_layer` pattern {pattern!r} matches none of the measured parameters "
                    f"{list(names)}."
                )

    def tag(self, block: str) -> str:
        """The tag name of a block the model-level function reported."""
        return {pattern: name for name, pattern in self.tags.items()}.get(block, block)
