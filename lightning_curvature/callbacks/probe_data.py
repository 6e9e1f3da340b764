"""Where a probe's data comes from, and RNG isolation around anything a probe does.

Policies (``probe=``):

* ``"fixed"`` (default): ``probe_batches`` batches drawn once, at the start of training,
  from ``probe_dataloader`` if given, else from the trainer's training dataloader, and kept
  on the device, so values are comparable over time. The draw is made under a dedicated seed
  with every RNG saved and restored (torch CPU/CUDA, numpy, python, and the sampler's own
  generator), so it neither changes the training order nor differs after a resume.
* ``"current"``: the training batch of the step being probed.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import random
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from lightning_curvature.functional.model.batches import move_to_device

__all__ = ["ProbePolicy", "draw_batches", "isolated_rng"]

ProbePolicy = Literal["fixed", "current"]


def _sampler_generators(dataloader: Any) -> list[torch.Generator]:
    found: list[torch.Generator] = []
    for holder in (
        dataloader,
        getattr(dataloader, "sampler", None),
        getattr(dataloader, "batch_sampler", None),
    ):
        for candidate in (
            getattr(holder, "generator", None),
            getattr(getattr(holder, "sampler", None), "generator", None),
        ):
            if isinstance(candidate, torch.Generator) and all(candidate is not g for g in found):
                found.append(candidate)
    return found


@contextlib.contextmanager
def isolated_rng(device: torch.device, extra: Iterable[torch.Generator] = ()) -> Iterator[None]:
    """Restore torch (CPU and ``device``), numpy and python RNG states on exit.

    Example:
        >>> before = torch.get_rng_state()
        >>> with isolated_rng(torch.device("cpu")):
        ...     _ = torch.rand(3), random.random()
        >>> torch.equal(before, torch.get_rng_state())
        True
    """
    generators = list(extra)
    saved_generators = [g.get_state() for g in generators]
    python_state = random.getstate()
    numpy_state = None
    with contextlib.suppress(ImportError):
        import numpy as np

        numpy_state = np.random.get_state()
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python_state)
        if numpy_state is not None:
            import numpy as np

            np.random.set_state(numpy_state)
        for generator, state in zip(generators, saved_generators, strict=True):
            generator.set_state(state)


def _without_persistent_workers(dataloader: Any) -> Any:
    """``dataloader`` loading in this process if its workers persist across epochs.

    Iterating a ``persistent_workers`` loader resets its cached iterator, which then skips
    drawing the next epoch's worker seed from the global RNG: the training run that follows
    would see other dropout masks and other worker seeds. A shallow copy with
    ``num_workers=0`` shares dataset, sampler and collate function but not that iterator.
    """
    if isinstance(dataloader, DataLoader) and dataloader.persistent_workers:
        view = copy.copy(dataloader)
        view.num_workers = 0
        return view
    return dataloader


def draw_batches(
    dataloader: Iterable[Any], count: int, device: torch.device, seed: int, skip: int = 0
) -> list[Any]:
    """The first ``count`` batches of ``dataloader`` under ``seed`` (after ``skip``), on ``device``.

    Raises:
        ValueError: if the dataloader yields no batch (after the ``skip`` first).

    Example:
        >>> loader = torch.utils.data.DataLoader(torch.arange(10.0), batch_size=4, shuffle=True)
        >>> first = draw_batches(loader, 1, torch.device("cpu"), seed=0)
        >>> torch.equal(first[0], draw_batches(loader, 1, torch.device("cpu"), seed=0)[0])
        True
    """
    with isolated_rng(device, _sampler_generators(dataloader)):
        torch.manual_seed(seed)
        for generator in _sampler_generators(dataloader):
            generator.manual_seed(seed)
        source = _without_persistent_workers(dataloader)
        drawn = itertools.islice(iter(source), skip, skip + count)
        batches = [move_to_device(batch, device) for batch in drawn]
    if not batches:
        raise ValueError("the probe dataloader yielded no batch.")
    return batches
