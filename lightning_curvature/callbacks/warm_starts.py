"""The eigenvalue monitor's warm starts: one per Lanczos run, tied to their coordinates.

Each Lanczos run of a probe (the full model, each ``per_layer`` block, Adam's preconditioned
run) starts from the previous probe's top ``k + 1`` Ritz vectors of that run, ``(k + 1) × P``
values. :class:`WarmStarts` keeps them by run, with the names of the parameters they are
over: a run whose measured parameters changed (``requires_grad``, see
:mod:`~lightning_curvature.callbacks.measured`) starts cold rather than from vectors over
other coordinates.

**Checkpoints.** ``(k + 1) × P`` float32 values are twice the model's own weights for
``k = 1`` (``benchmarks/bench_checkpoint.py``: +8.0 MB on a 1.0 M-parameter model whose
checkpoint is 4.0 MB), and no smaller form fits a budget of a few percent: half precision is
``(k + 1) × 2`` bytes per parameter (100 % at ``k = 1``), and even one bit per entry (signs
only) is ``(k + 1) / 32`` of the model (6 % at ``k = 1``), for a start that would save a few
products once per resume. So by default they stay out of checkpoints
(``checkpoint=False``): a resumed run's first probe starts cold (its values agree with the
uninterrupted run's to ``tol``, not bit for bit, for the cost of a cold start measured in
``benchmarks/README.md``), and every probe after it is warm again. ``checkpoint=True`` stores
them (``weights_only``-loadable: tensors, and names as lists of strings) for a resumed run
that logs exactly what the uninterrupted one does. A checkpoint that holds them is used,
whatever ``checkpoint`` says.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch

__all__ = ["WarmStartDevice", "WarmStarts"]

WarmStartDevice = Literal["model", "cpu"]


class WarmStarts(Mapping[str, torch.Tensor]):
    """Warm-start vectors by Lanczos run, each with the parameter names it is over.

    A read-only mapping of run to vectors; :meth:`put` and :meth:`get` add and take them.

    Args:
        device: where they wait between probes: ``"model"`` (as given) or ``"cpu"``.
        checkpoint: whether :meth:`state_dict` holds them.

    Example:
        >>> starts = WarmStarts("cpu", checkpoint=True)
        >>> starts.put("full", ("w", "b"), torch.ones(2, 3))
        >>> starts.get("full", ("w", "b"), 3).shape, starts.get("full", ("w",), 3)
        (torch.Size([2, 3]), None)
        >>> sorted(starts.state_dict()), list(starts)
        (['warm_start', 'warm_start_parameters'], ['full'])
    """

    def __init__(self, device: WarmStartDevice = "model", checkpoint: bool = False) -> None:
        self.device = device
        self.checkpoint = checkpoint
        self._vectors: dict[str, torch.Tensor] = {}
        self._names: dict[str, tuple[str, ...]] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._vectors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._vectors)

    def __len__(self) -> int:
        return len(self._vectors)

    def get(  # type: ignore[override]
        self, key: str, names: Sequence[str], size: int
    ) -> torch.Tensor | None:
        """The vectors of run ``key`` if they are over ``names`` (``size`` entries here).

        ``None`` for a run never seen, or one whose parameters (or sharding) changed since:
        that run starts cold. Vectors loaded from a checkpoint without names are trusted by
        their size.
        """
        vectors = self._vectors.get(key)
        if vectors is None or vectors.shape[-1] != size:
            return None
        if self._names.get(key, tuple(names)) != tuple(names):
            return None
        return vectors

    def names(self, key: str) -> tuple[str, ...] | None:
        """The parameter names run ``key``'s vectors are over (``None``: not known)."""
        return self._names.get(key)

    def put(self, key: str, names: Sequence[str], vectors: torch.Tensor) -> None:
        """Keep ``vectors`` (detached) as run ``key``'s next start, over ``names``."""
        vectors = vectors.detach()
        self._vectors[key] = vectors.cpu() if self.device == "cpu" else vectors
        self._names[key] = tuple(names)

    def state_dict(self) -> dict[str, Any]:
        """The vectors and their names for a checkpoint, if ``checkpoint``; else nothing."""
        if not self.checkpoint:
            return {}
        return {
            "warm_start": {key: value.cpu() for key, value in self._vectors.items()},
            "warm_start_parameters": {key: list(names) for key, names in self._names.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the vectors a checkpoint holds (none: every run's next probe starts cold)."""
        self._vectors = dict(state.get("warm_start", {}))
        names = state.get("warm_start_parameters", {})
        self._names = {key: tuple(names[key]) for key in self._vectors if key in names}
