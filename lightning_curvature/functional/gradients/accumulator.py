r"""Sums over gradient samples: the pure accumulator every gradient statistic is computed from.

Where the samples come from (a model's per-example or micro-batch gradients) is the job of
:mod:`~lightning_curvature.functional.coherence`; the statistics, with their definitions and
references, are computed from the sums in
:mod:`~lightning_curvature.functional.gradients.statistics`; this module only adds samples up
(``m`` samples ``g_i`` of ``b_i`` examples each; ``S₁ = Σ‖g_i‖²``, ``S₂ = ‖Σ g_i‖²``,
``H = Σ 1/b_i``).

Every statistic is a function of sums over samples, so samples can be added one chunk at a
time (memory ``O(P)``) and sums from several processes or steps simply added:
:class:`GradientSums` holds them, each a tensor that reduces with ``"sum"``;
:meth:`GradientSums.all_reduce` sums all of them over processes in one collective.

**What scalar all-reduces alone give (each DDP rank's local gradient as one sample).** With
``g_r`` the local gradient of rank ``r`` before DDP's all-reduce and ``ḡ`` the averaged
gradient after it (known on every rank): ``S₁``, ``m`` and ``H`` are sums of per-rank scalars
and ``S₂ = m²‖ḡ‖²`` is local, so coherence, ``‖G‖²``, ``tr Σ`` and the noise scale (also per
layer) need only scalar all-reduces: build the sums with ``vectors=False`` and pass ``S₂`` to
:meth:`GradientSums.compute`. The mean cosine needs ``Σ ĝ_r`` and the SNR needs ``Σ g_r²``
per coordinate: both are vectors (one more gradient-sized all-reduce each), so they are NaN
in that mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_curvature.checks import check_integer
from lightning_curvature.functional.gradients.statistics import (
    GradientCoherence,
    coherence_statistics,
)
from lightning_curvature.functional.linalg.sharded import AllSum

#: The kinds of samples (``mode``) that processes summing their sums must agree on.
_SAMPLE_KINDS = ("per_example", "micro_batch")

__all__ = ["GradientSums"]

#: Returns the elementwise *sum* of a tensor over processes (e.g. DDP's ranks).
_VECTOR_STATES = ("sum", "unit_sum", "sq_sum")
# GradientSums.add works on blocks of rows of about this many entries. On CPU a fresh k × P
# temporary (rows joined from per-parameter parts, their squares) costs more in page faults
# than the arithmetic; a block of 8 MiB is reused by the allocator. Min over repeats on a
# 2-core CPU, squares of 128 × 95k floats: 28 ms in one pass, 3 ms in blocks of 22 rows,
# 8 ms in blocks of 5 rows.
_ROW_BLOCK = 2**21


@dataclass
class GradientSums:
    """Additive sums over gradient samples, from which :meth:`compute` gives every statistic.

    Each tensor field is a *state*: the sums of two sets of samples are their elementwise
    sums, so they reduce across processes with ``"sum"`` and accumulate across steps.
    ``blocks``, ``size`` and ``mode`` are static descriptions, not states.

    Attributes:
        count: ``m``, the number of samples.
        inverse_size_sum: ``H = Σ 1/b_i`` over the samples' sizes ``b_i``.
        sq_norm_sum: ``S₁ = Σ‖g_i‖²``.
        nonzero_count: the number of samples that are not exactly zero.
        sum: ``Σ g_i`` (length ``P``), ``None`` for scalar-only sums.
        unit_sum: ``Σ g_i/‖g_i‖`` over the non-zero samples, ``None`` for scalar-only sums.
        sq_sum: ``Σ g_i ⊙ g_i`` per coordinate, ``None`` for scalar-only sums.
        block_sq_norm_sum: ``S₁`` of each block, ``None`` without blocks.
        blocks: block name to its slices of the flat gradient.
        size: ``P``, the length of a gradient sample.
        mode: a label for where the samples come from.
        fallback: how the samples were made instead of as asked, and why (empty if as asked).

    Example:
        >>> sums = GradientSums.zeros(2, dtype=torch.float64)
        >>> sums.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # two orthogonal samples
        >>> sums.add(torch.tensor([3.0, 3.0]))  # and one more
        >>> out = sums.compute()
        >>> out.num_samples, out.coherence.item(), round(out.mean_cosine.item(), 4)
        (3, 1.6, 0.4714)
    """

    count: torch.Tensor
    inverse_size_sum: torch.Tensor
    sq_norm_sum: torch.Tensor
    nonzero_count: torch.Tensor
    sum: torch.Tensor | None = None
    unit_sum: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    block_sq_norm_sum: torch.Tensor | None = None
    blocks: dict[str, list[slice]] = field(default_factory=dict)
    size: int = 0
    mode: str = "samples"
    fallback: str = ""

    @classmethod
    def zeros(
        cls,
        size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        vectors: bool = True,
        blocks: Mapping[str, Sequence[slice]] | None = None,
        mode: str = "samples",
    ) -> GradientSums:
        """Empty sums for samples of length ``size``.

        Args:
            size: ``P``, the length of each gradient sample.
            dtype: floating dtype of the states.
            device: device of the states.
            vectors: keep the ``P``-long sums (needed for the mean cosine and the SNR, and
                for ``‖Σg_i‖²`` unless it is given to :meth:`compute`).
            blocks: block name to slices of the flat gradient, for per-layer coherence
                (:meth:`ParameterLayout.groups
                <lightning_curvature.functional.model.parameters.ParameterLayout.groups>`).
            mode: a label reported in the result.

        Raises:
            ValueError: if ``size`` is not a positive integer or ``dtype`` not floating.
        """
        check_integer("size", size)
        if not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating dtype, got {dtype}.")

        def new(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        listed = {name: list(slices) for name, slices in (blocks or {}).items()}
        return cls(
            count=new(),
            inverse_size_sum=new(),
            sq_norm_sum=new(),
            nonzero_count=new(),
            sum=new(size) if vectors else None,
            unit_sum=new(size) if vectors else None,
            sq_sum=new(size) if vectors else None,
            block_sq_norm_sum=new(len(listed)) if listed else None,
            blocks=listed,
            size=size,
            mode=mode,
        )

    # -- states ----------------------------------------------------------------------------
    def states(self) -> dict[str, torch.Tensor]:
        """The tensor states present, by field name (each one reduces with ``"sum"``)."""
        names = ("count", "inverse_size_sum", "sq_norm_sum", "nonzero_count", *_VECTOR_STATES)
        states = {name: getattr(self, name) for name in (*names, "block_sq_norm_sum")}
        return {name: value for name, value in states.items() if value is not None}

    def with_states(self, states: Mapping[str, torch.Tensor]) -> GradientSums:
        """A copy with the given states replaced (e.g. by their all-reduced values).

        Raises:
            ValueError: if the names are not exactly :meth:`states`' names.
        """
        if set(states) != set(self.states()):
            raise ValueError(
                f"`states` must have the keys {sorted(self.states())}, got {sorted(states)}."
            )
        replaced: dict[str, Any] = dict(states)
        return dataclasses.replace(self, **replaced)

    @property
    def num_samples(self) -> int:
        """``m``, the number of samples added so far."""
        return round(self.count.item())

    # -- accumulation ----------------------------------------------------------------------
    def add(
        self, gradients: torch.Tensor | Sequence[torch.Tensor], sample_size: float = 1.0
    ) -> None:
        """Add samples in place.

        Args:
            gradients: one flat gradient ``(P,)``, rows ``(k, P)``, or the rows cut by
                parameter: a sequence of ``(k, *shape)`` tensors whose flattened widths add up
                to ``P`` (what ``vmap`` of ``grad`` returns; no ``k × P`` copy is made). Each
                sample is the gradient of the mean loss over ``sample_size`` examples.
            sample_size: examples per sample (1 for per-example gradients).

        Raises:
            ValueError: on shapes that are not ``k`` samples of length ``P``, or a size ``<= 0``.
        """
        parts = _as_parts(gradients, self.size)
        if not sample_size > 0:
            raise ValueError(f"`sample_size` must be > 0, got {sample_size!r}.")
        k = parts[0].shape[0]
        self.count.add_(k)
        self.inverse_size_sum.add_(k / sample_size)
        step = max(1, _ROW_BLOCK // self.size)  # a temporary the allocator reuses (see _ROW_BLOCK)
        for start in range(0, k, step):
            pieces = [part[start : start + step] for part in parts]
            rows = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
            self._add_rows(rows.detach().to(device=self.count.device, dtype=self.count.dtype))

    def _add_rows(self, rows: torch.Tensor) -> None:
        squares = rows * rows
        norms_sq = squares.sum(dim=1)
        nonzero = norms_sq > 0
        self.sq_norm_sum.add_(norms_sq.sum())
        self.nonzero_count.add_(nonzero.sum())
        if self.sum is not None and self.unit_sum is not None and self.sq_sum is not None:
            inverse_norms = torch.where(nonzero, norms_sq.rsqrt(), torch.zeros_like(norms_sq))
            self.sum.add_(rows.sum(dim=0))
            self.unit_sum.add_(rows.T @ inverse_norms)
            self.sq_sum.add_(squares.sum(dim=0))
        if self.block_sq_norm_sum is not None:
            per_block = [_block_total(squares, slices) for slices in self.blocks.values()]
            self.block_sq_norm_sum.add_(torch.stack(per_block))

    def all_reduce(self, all_sum: AllSum) -> GradientSums:
        """New sums over every process's samples, with one collective call.

        Every state is flattened into one vector, summed by ``all_sum`` and cut back
        into the states' shapes (``self`` is not changed). The vector also counts the
        processes whose samples are per-example gradients and those whose are micro-batch
        gradients: a process that fell back to micro-batches alone (a transient error in its
        loop over single examples) would mix samples of two meanings.

        Args:
            all_sum: returns the elementwise *sum* of a tensor over processes (e.g.
                ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``).

        Raises:
            ValueError: on every process alike, if the processes took samples of different
                kinds.

        Example:
            >>> sums = GradientSums.zeros(2)
            >>> sums.add(torch.tensor([1.0, 0.0]))  # one sample here, the same on a twin
            >>> sums.all_reduce(lambda flat: 2 * flat).compute().coherence
            tensor(2.)
        """
        states = self.states()
        kinds = [1.0, *(float(self.mode == kind) for kind in _SAMPLE_KINDS)]
        local = [*(value.reshape(-1) for value in states.values()), self.count.new_tensor(kinds)]
        flat = all_sum(torch.cat(local))
        *pieces, counted = torch.split(flat, [value.numel() for value in local])
        processes, *of_kind = counted.tolist()
        if any(0 < n < processes for n in of_kind):
            pairs = zip(_SAMPLE_KINDS, of_kind, strict=True)
            found = ", ".join(f"{n:g} of {processes:g} {kind}" for kind, n in pairs)
            raise ValueError(f"the processes took gradient samples of different kinds ({found}).")
        return self.with_states(
            {
                name: piece.view_as(value)
                for (name, value), piece in zip(states.items(), pieces, strict=True)
            }
        )

    # -- statistics ------------------------------------------------------------------------
    def compute(
        self,
        *,
        sum_sq_norm: torch.Tensor | None = None,
        block_sum_sq_norm: Mapping[str, torch.Tensor] | None = None,
    ) -> GradientCoherence:
        """Every statistic of :func:`coherence_statistics` (definitions there) from the sums.

        Args:
            sum_sq_norm: ``‖Σ g_i‖²``, required for scalar-only sums (``vectors=False``) and
                refused otherwise.
            block_sum_sq_norm: the same for each block, for scalar-only sums with blocks.

        Raises:
            ValueError: with fewer than 2 samples, or on a missing or surplus ``sum_sq_norm``.
            NonFiniteCurvatureError: if a sum is NaN or infinite.
        """
        return coherence_statistics(
            self, sum_sq_norm=sum_sq_norm, block_sum_sq_norm=block_sum_sq_norm
        )

    def squared_norms(self, vector: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``‖v‖²`` and each block's ``‖v_B‖²`` of a flat vector in this layout.

        For scalar-only sums, ``v = Σ g_i`` gives :meth:`compute`'s ``sum_sq_norm`` and
        ``block_sum_sq_norm`` (e.g. ``m`` times DDP's averaged gradient).

        Example:
            >>> sums = GradientSums.zeros(3, vectors=False, blocks={"a": [slice(0, 1)]})
            >>> sums.squared_norms(torch.tensor([1.0, 2.0, 2.0]))
            (tensor(9.), {'a': tensor(1.)})
        """
        squares = vector * vector
        blocks = {name: _block_total(squares, slices) for name, slices in self.blocks.items()}
        return squares.sum(), blocks


def _as_parts(gradients: torch.Tensor | Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
    """``gradients`` as a list of ``(k, width)`` tensors whose widths add up to ``size``."""
    if isinstance(gradients, torch.Tensor):
        parts = [gradients.reshape(1, -1) if gradients.dim() == 1 else gradients]
        ok = gradients.dim() in (1, 2) and gradients.shape[-1] == size
    else:
        parts = [g.reshape(g.shape[0], -1) if g.dim() else g for g in gradients]
        ok = bool(parts) and all(g.dim() == 2 and g.shape[0] == parts[0].shape[0] for g in parts)
        ok = ok and sum(g.shape[1] for g in parts) == size
    if not ok:
        shapes = (
            tuple(gradients.shape)
            if isinstance(gradients, torch.Tensor)
            else [tuple(g.shape) for g in gradients]
        )
        raise ValueError(
            f"`gradients` must be k samples of length {size}: shape ({size},) or (k, {size}), or "
            f"per-parameter (k, ...) tensors of {size} entries per row in all; got {shapes}."
        )
    return parts


def _block_total(values: torch.Tensor, slices: Sequence[slice]) -> torch.Tensor:
    """Sum of ``values`` over the block's slices of the last dimension."""
    return torch.stack([values[..., s].sum() for s in slices]).sum()
