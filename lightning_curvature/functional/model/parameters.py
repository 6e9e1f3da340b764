"""Which parameters a curvature measurement covers, and their layout as one flat vector.

Curvature is measured over the *trainable* parameters (``requires_grad=True``) of a module,
optionally narrowed to those whose names match glob patterns (``"encoder.*"``). Shared
parameters count once. All vectors of the math layer are flat 1-D tensors in this layout;
:class:`ParameterLayout` converts between them and per-parameter tensors.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NoReturn

import torch
from torch import nn

from lightning_curvature.checks import check_module, check_patterns

__all__ = [
    "ParameterLayout",
    "PerLayer",
    "layer_blocks",
    "layer_parameters",
    "module_blocks",
    "select_parameters",
]

ParameterPatterns = str | Sequence[str] | None
#: ``per_layer`` of every model-level function and monitor (see :func:`layer_blocks`).
PerLayer = bool | Sequence[str] | Mapping[str, str | Sequence[str]] | None


def _as_patterns(patterns: ParameterPatterns) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def select_parameters(
    model: nn.Module, parameters: ParameterPatterns = None
) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters of ``model``, optionally only those matching name patterns.

    Args:
        model: the module.
        parameters: ``None`` for all trainable parameters, or one glob pattern or a list of
            them matched against ``model.named_parameters()`` names (``"0.*"``, ``"*.bias"``).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if nothing is trainable, ``parameters`` is not patterns (an empty list
            included), or a pattern matches no trainable parameter.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> [name for name, _ in select_parameters(net, "1.*")]
        ['1.weight', '1.bias']
    """
    check_module("model", model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no trainable parameters "
            "(all have requires_grad=False): there is no Hessian to measure."
        )
    check_patterns("parameters", parameters)
    patterns = _as_patterns(parameters)
    if patterns is None:
        return trainable
    names = [name for name, _ in trainable]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(
                f"`parameters` pattern {pattern!r} matches no trainable parameter; "
                f"trainable names are {names}."
            )
    return [(name, p) for name, p in trainable if any(fnmatch.fnmatch(name, q) for q in patterns)]


def module_blocks(names: Sequence[str]) -> dict[str, list[str]]:
    """Parameter names grouped by the module that holds them (the name up to the last dot).

    Example:
        >>> module_blocks(["0.weight", "0.bias", "2.weight"])
        {'0': ['0.weight', '0.bias'], '2': ['2.weight']}
    """
    blocks: dict[str, list[str]] = {}
    for name in names:
        blocks.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return blocks


def layer_blocks(per_layer: PerLayer) -> Literal[True] | dict[str, tuple[str, ...]]:
    """Parse ``per_layer``, the one grammar of blocks of parameters (``True`` or name to patterns).

    * ``False`` or ``None``: no blocks (``{}``);
    * ``True``: one block per module (:func:`module_blocks`), returned as ``True`` since the
      modules depend on the parameters (:func:`layer_parameters` resolves them);
    * a list (or tuple) of glob patterns of parameter names: one block per pattern, named
      by the pattern;
    * a dict of block name to one pattern or a non-empty list of them: one block per name,
      holding the parameters that match any of its patterns.

    A bare string is refused (one pattern goes in a list), so that ``"encoder.*"`` is never
    read as its characters.

    Raises:
        ValueError: naming ``per_layer`` and the grammar, on anything else.

    Example:
        >>> layer_blocks(["0.*", "*.bias"])
        {'0.*': ('0.*',), '*.bias': ('*.bias',)}
        >>> layer_blocks({"head": ["2.*", "3.*"], "body": "0.*"}), layer_blocks(True)
        ({'head': ('2.*', '3.*'), 'body': ('0.*',)}, True)
    """
    if per_layer is None or per_layer is False:
        return {}
    if per_layer is True:
        return True
    blocks: dict[str, tuple[str, ...]] = {}
    if isinstance(per_layer, Mapping):
        for name, value in per_layer.items():
            patterns = (value,) if isinstance(value, str) else value
            if not isinstance(name, str) or not _is_patterns(patterns):
                _refuse_layers(per_layer)
            blocks[name] = tuple(patterns)
        return blocks
    if isinstance(per_layer, str) or not _is_patterns(per_layer, empty=True):
        _refuse_layers(per_layer)
    return {pattern: (pattern,) for pattern in per_layer}


def _is_patterns(value: object, empty: bool = False) -> bool:
    """A list or tuple of strings (non-empty unless ``empty``)."""
    return (
        isinstance(value, (list, tuple))
        and (empty or bool(value))
        and all(isinstance(pattern, str) for pattern in value)
    )


def _refuse_layers(per_layer: object) -> NoReturn:
    hint = f" (one pattern goes in a list: [{per_layer!r}])" if isinstance(per_layer, str) else ""
    raise ValueError(
        "`per_layer` must be a bool or glob patterns of parameter names: True (one block per "
        "module), a list of patterns, or a dict of block name to a pattern or a list of them; "
        f"got {per_layer!r}{hint}."
    )


def layer_parameters(per_layer: PerLayer, names: Sequence[str]) -> dict[str, list[str]]:
    """The parameter names of each block of ``per_layer`` (:func:`layer_blocks`) among ``names``.

    Raises:
        ValueError: on a ``per_layer`` outside the grammar, or a pattern that matches none
            of ``names``.

    Example:
        >>> names = ["0.weight", "0.bias", "2.weight"]
        >>> layer_parameters({"biases": "*.bias", "all": ["0.*", "2.*"]}, names)
        {'biases': ['0.bias'], 'all': ['0.weight', '0.bias', '2.weight']}
        >>> layer_parameters(True, names)
        {'0': ['0.weight', '0.bias'], '2': ['2.weight']}
    """
    blocks = layer_blocks(per_layer)
    if blocks is True:
        return module_blocks(names)
    for pattern in dict.fromkeys(p for patterns in blocks.values() for p in patterns):
        if not fnmatch.filter(names, pattern):
            raise ValueError(
                f"`per_layer` pattern {pattern!r} matches none of the measured parameters "
                f"{list(names)}."
            )
    return {
        block: [name for name in names if any(fnmatch.fnmatch(name, p) for p in patterns)]
        for block, patterns in blocks.items()
    }


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of the selected parameters inside one flat vector.

    Example:
        >>> layout = ParameterLayout.from_named([("w", torch.zeros(2, 3)), ("b", torch.zeros(3))])
        >>> layout.size, layout.slices["b"]
        (9, slice(6, 9, None))
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_named(cls, named: Sequence[tuple[str, torch.Tensor]]) -> ParameterLayout:
        """Layout of the given ``(name, tensor)`` pairs, in order."""
        return cls(names=tuple(n for n, _ in named), shapes=tuple(t.shape for _, t in named))

    @cached_property
    def numels(self) -> tuple[int, ...]:
        """Number of entries of each parameter."""
        return tuple(int(torch.Size(shape).numel()) for shape in self.shapes)

    @cached_property
    def size(self) -> int:
        """Length of the flat vector."""
        return sum(self.numels)

    @property
    def slices(self) -> dict[str, slice]:
        """Slice of the flat vector that belongs to each parameter name."""
        out, start = {}, 0
        for name, numel in zip(self.names, self.numels, strict=True):
            out[name] = slice(start, start + numel)
            start += numel
        return out

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like each parameter (no copy)."""
        return [
            chunk.view(shape)
            for chunk, shape in zip(torch.split(flat, list(self.numels)), self.shapes, strict=True)
        ]

    @staticmethod
    def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def groups(self, per_layer: PerLayer) -> dict[str, list[slice]]:
        """Slices of the flat vector grouped into the blocks of ``per_layer``.

        Args:
            per_layer: the blocks, in the grammar of :func:`layer_blocks`.

        Raises:
            ValueError: on a ``per_layer`` outside that grammar, or a pattern that matches
                none of the parameters.

        Example:
            >>> named = [("0.w", torch.zeros(2)), ("1.w", torch.zeros(3))]
            >>> layout = ParameterLayout.from_named(named)
            >>> layout.groups(True)
            {'0': [slice(0, 2, None)], '1': [slice(2, 5, None)]}
            >>> layout.groups({"all": "*.w"})
            {'all': [slice(0, 2, None), slice(2, 5, None)]}
        """
        slices = self.slices
        return {
            block: [slices[name] for name in names]
            for block, names in layer_parameters(per_layer, self.names).items()
        }
