"""Batches: one batch or many, moved to the model's device, with their sizes.

Every model-level function takes ``batch``, which is either *one* batch or an iterable of
batches. The rule that tells them apart never splits what a ``DataLoader`` yields:

* a tensor, a ``tuple`` (also a namedtuple) or a mapping (``dict``, a tokenizer's
  ``BatchEncoding``) is **one** batch;
* a ``list`` is **several** batches only if none of its items is a *field* (a tensor, a
  string, a number, ``None``, or a list or tuple of those) and all its items have the same
  structure: the same container types, lengths and keys, and tensors of the same dtype and
  number of dimensions in the same places (their sizes may differ: the last batch is
  smaller, padding lengths vary). Any other list is **one** batch. ``default_collate``
  turns a sample ``(ids, mask, label, text)`` into ``[ids, mask, labels, [text, ...]]``,
  whose items are fields: one batch. A list of batches from one loader, ``[(x1, y1), (x2,
  y2)]`` or ``list(loader)``, has items of one structure that are not fields: several;
* a :class:`BatchList`, a ``DataLoader``, a generator or any other iterable is **several**
  batches.

Several batches' losses are averaged weighted by their size. The one ambiguous case is a
single batch whose every field is itself a container of one structure (``default_collate``
of samples ``((x1, x2), (y1, y2))`` with matching dtypes, or of two dicts with the same
keys): pass it as a ``tuple`` to make it one batch, and pass a :class:`BatchList` whenever a
list must be several batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BatchList",
    "ProbeBatches",
    "batch_size",
    "map_tensors",
    "move_to_device",
    "split_batches",
]


class BatchList(list):  # type: ignore[type-arg]
    """An explicit list of batches, never mistaken for one batch that is a list.

    Example:
        >>> x = torch.zeros(4, 2)
        >>> len(split_batches(BatchList([x[:2], x[2:]]), torch.device("cpu")).batches)
        2
    """


_PLAIN = (str, bytes, int, float, complex, bool, type(None))


def _is_field(item: Any) -> bool:
    """A tensor, a plain value, or a list or tuple of plain values: part of one batch."""
    if isinstance(item, (torch.Tensor, *_PLAIN)):
        return True
    return isinstance(item, (list, tuple)) and all(isinstance(v, _PLAIN) for v in item)


def _structure(item: Any) -> Any:
    """What two batches of one loader share: containers, keys, tensor dtypes and ranks."""
    if isinstance(item, torch.Tensor):
        return (torch.Tensor, item.dtype, item.dim())
    if isinstance(item, Mapping):
        keys = sorted(item, key=repr)
        return (type(item), tuple((repr(key), _structure(item[key])) for key in keys))
    if isinstance(item, (list, tuple)) and not _is_field(item):
        return (type(item), tuple(_structure(value) for value in item))
    if _is_field(item):  # a plain value or a list of them (its length is the batch size)
        return "value"
    return type(item)


def _is_single_batch(batch: Any) -> bool:
    if isinstance(batch, BatchList):
        return False
    if isinstance(batch, (torch.Tensor, tuple, Mapping)):
        return True
    if isinstance(batch, list):  # an empty list holds no batch: it is an empty iterable
        if not batch:
            return False
        if any(_is_field(item) for item in batch):
            return True
        first = _structure(batch[0])
        return any(_structure(item) != first for item in batch[1:])
    return not isinstance(batch, Iterable) or isinstance(batch, (str, bytes))


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in ``batch``, keeping mappings, namedtuples and sequences.

    Args:
        batch: a tensor or nested containers holding tensors (other values pass through).
        fn: the function applied to each tensor.

    Example:
        >>> doubled = map_tensors({"x": [torch.ones(2)], "n": 3}, lambda t: 2 * t)
        >>> doubled["x"][0].tolist(), doubled["n"]
        ([2.0, 2.0], 3)
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({key: map_tensors(value, fn) for key, value in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(item, fn) for item in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(item, fn) for item in batch)
    return batch


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Return ``batch`` with every tensor in it moved to ``device`` (nested containers kept).

    Example:
        >>> moved = move_to_device({"x": torch.ones(2), "n": 3}, torch.device("cpu"))
        >>> moved["x"].device.type, moved["n"]
        ('cpu', 3)
    """
    # Asynchronous only towards an accelerator: a non-blocking copy *to* the CPU may be read
    # before it has landed.
    non_blocking = device.type != "cpu"
    return map_tensors(batch, lambda tensor: tensor.to(device, non_blocking=non_blocking))


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(items, (list, tuple)) or isinstance(batch, Mapping):
        for item in items:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def batch_size(batch: Any) -> int | None:
    """Number of examples in one batch: the leading dimension of its first tensor.

    Returns ``None`` when the batch holds no tensor with a leading dimension.

    Example:
        >>> batch_size((torch.zeros(8, 3), torch.zeros(8)))
        8
    """
    tensor = _first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        return None
    return int(tensor.shape[0])


@dataclass(frozen=True)
class ProbeBatches:
    """Batches on the model's device and the weight of each in the averaged loss.

    Attributes:
        batches: the batches, already on the device.
        weights: one weight per batch, summing to 1 (sizes over the total size, or equal
            weights when a size is unknown).
        size: the number of examples in all of them (``None`` when a size is unknown): this
            process's weight in the union batch of several processes.
    """

    batches: tuple[Any, ...]
    weights: tuple[float, ...]
    size: int | None = None


def split_batches(batch: Any, device: torch.device) -> ProbeBatches:
    """Turn ``batch`` (one batch or an iterable of batches) into :class:`ProbeBatches`.

    Args:
        batch: one batch, or an iterable of batches (see the module docstring for the rule).
        device: where every tensor is moved.

    Raises:
        ValueError: if ``batch`` is ``None``, an empty iterable, or holds a batch of no
            examples.

    Example:
        >>> x = torch.zeros(6, 2)
        >>> probe = split_batches([(x[:2],), (x[2:],)], torch.device("cpu"))
        >>> probe.weights, probe.size
        ((0.3333333333333333, 0.6666666666666666), 6)
    """
    if batch is None:
        raise ValueError("`batch` must be one batch or an iterable of batches, got None.")
    items = [batch] if _is_single_batch(batch) else list(batch)
    if not items:
        raise ValueError("`batch` is an empty iterable: give one batch or at least one batch.")
    moved = tuple(move_to_device(item, device) for item in items)
    sizes = [batch_size(item) for item in moved]
    if any(item is None or size == 0 for item, size in zip(moved, sizes, strict=True)):
        raise ValueError(
            "`batch` must hold examples: it is or contains a batch of 0 examples (or None), "
            f"got sizes {sizes}."
        )
    if any(size is None for size in sizes) or sum(sizes) == 0:  # type: ignore[arg-type]
        weights = tuple(1.0 / len(moved) for _ in moved)
        return ProbeBatches(batches=moved, weights=weights)
    total = sum(sizes)  # type: ignore[arg-type]
    weights = tuple(size / float(total) for size in sizes)  # type: ignore[operator]
    return ProbeBatches(batches=moved, weights=weights, size=total)
