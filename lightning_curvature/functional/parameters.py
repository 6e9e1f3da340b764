"""Which parameters a curvature measurement covers, and their layout as one flat vector.

Curvature is measured over the *trainable* parameters (``requires_grad=True``) of a module,
optionally narrowed to those whose names match glob patterns (``"encoder.*"``). Shared
parameters count once. All vectors of the math layer are flat 1-D tensors in this layout;
:class:`ParameterLayout` converts between them and per-parameter tensors.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ParameterLayout", "module_blocks", "select_parameters"]

ParameterPatterns = str | Sequence[str] | None


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
        ValueError: if nothing is trainable, ``parameters`` is an empty list, or a pattern
            matches no trainable parameter.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> [name for name, _ in select_parameters(net, "1.*")]
        ['1.weight', '1.bias']
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no trainable parameters "
            "(all have requires_grad=False): there is no Hessian to measure."
        )
    patterns = _as_patterns(parameters)
    if patterns is None:
        return trainable
    if not patterns:
        raise ValueError(
            "`parameters` is an empty list of patterns: give None (all trainable "
            "parameters) or at least one glob pattern."
        )
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

    @property
    def numels(self) -> tuple[int, ...]:
        """Number of entries of each parameter."""
        return tuple(int(torch.Size(shape).numel()) for shape in self.shapes)

    @property
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

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def groups(self, per_layer: bool | Sequence[str]) -> dict[str, list[slice]]:
        """Slices of the flat vector grouped into blocks.

        Args:
            per_layer: ``True`` groups parameters by their module (the name up to the last
                dot, e.g. ``"encoder.0"``); a list of glob patterns gives one block per
                pattern, named by the pattern.

        Raises:
            ValueError: if a pattern matches none of the parameters.
        """
        slices = self.slices
        if per_layer is True:
            return {
                module: [slices[name] for name in names]
                for module, names in module_blocks(self.names).items()
            }
        blocks: dict[str, list[slice]] = {}
        for pattern in _as_patterns(per_layer) or []:  # type: ignore[arg-type]
            matched = [slices[n] for n in self.names if fnmatch.fnmatch(n, pattern)]
            if not matched:
                raise ValueError(
                    f"`per_layer` pattern {pattern!r} matches none of the measured "
                    f"parameters {list(self.names)}."
                )
            blocks[pattern] = matched
        return blocks
