r"""Gradient coherence and noise: how much the examples agree on the direction to move.

From ``m`` gradient samples ``g_1 … g_m`` — per-example gradients (``b = 1``) or gradients
of micro-batches of ``b_i`` examples each — of a loss that is a *mean* over examples:

* **m-coherence** (Chatterjee & Zielinski, "Making coherence out of nothing at all",
  arXiv:2008.01217, 2020; Chatterjee & Zielinski, "On the generalization mystery in deep
  learning", arXiv:2203.10036, 2022)::

      coherence = ‖Σ g_i‖² / Σ ‖g_i‖²

  It is ``m·α̂`` for the sample version of ``α = E[g·g'] / E[g·g]``: 1 when the samples are
  orthogonal, ``m`` when they are identical, 0 when they cancel. It is invariant to scaling
  the loss.
* **mean cosine**: the mean over pairs ``i ≠ j`` of ``cos(g_i, g_j)``, computed in ``O(m·P)``
  as ``(‖Σ ĝ_i‖² − n) / (n(n − 1))`` with ``ĝ_i = g_i/‖g_i‖`` over the ``n`` non-zero samples.
* **noise scale** ``B_simple = tr Σ / ‖G‖²`` (McCandlish, Kaplan, Amodei et al., "An
  empirical model of large-batch training", arXiv:1812.06162, 2018, §2.2 and App. A.1),
  with ``G`` the true gradient and ``Σ`` the per-example gradient covariance. Both parts use
  unbiased estimators. With ``S₁ = Σ‖g_i‖²``, ``S₂ = ‖Σ g_i‖²`` and ``H = Σ 1/b_i``::

      ‖G‖²  ≈ (S₂ − S₁) / (m(m − 1))          (the mean of g_i·g_j over pairs i ≠ j)
      tr Σ  ≈ (m·S₁ − S₂) / ((m − 1)·H)

  since ``E[g_i·g_j] = ‖G‖²`` for ``i ≠ j`` and ``E‖g_i‖² = ‖G‖² + tr Σ / b_i``. With
  equal sizes ``b`` these are exactly McCandlish's two-batch-size estimators with
  ``B_small = b`` and ``B_big = m·b``, and ``B_simple = b(m − c)/(c − 1)`` for coherence
  ``c``. Near convergence ``‖G‖²`` is small next to its noise and the estimate can be
  negative: then ``B_simple`` is meaningless, so its parts are reported too (smooth them
  separately before taking the ratio, as McCandlish et al. advise).
* **SNR** (gradient signal-to-noise ratio, Liu et al., "Understanding why neural networks
  generalize well through GSNR of parameters", ICLR 2020): the mean over parameter
  coordinates ``j`` of ``ḡ_j² / σ_j²``, with ``ḡ = Σg_i/m`` the sample mean gradient and
  ``σ_j² = (m·Σ_i g_ij² − (Σ_i g_ij)²) / ((m − 1)·H)`` the unbiased per-*example* variance
  of coordinate ``j`` (the sample variance of the ``g_ij`` times ``b`` for equal sizes; the
  ``σ_j²`` sum to ``tr Σ``). Coordinates of zero variance (up to rounding: below ``m·ε``
  of their second moment) are left out; it is NaN when none is left. The numerator is the
  plain squared sample mean, as in Liu et al., so pure noise gives about ``1/(m·b)``.

Every statistic is a function of sums over samples, so samples can be added one chunk at a
time (memory ``O(P)``) and sums from several processes or steps simply added:
:class:`GradientSums` holds them, each a tensor to reduce with ``"sum"`` (a torchmetrics
state with ``dist_reduce_fx="sum"``).

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
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_curvature.functional.batches import split_batches
from lightning_curvature.functional.hvp import LossFn
from lightning_curvature.functional.parameters import (
    ParameterLayout,
    ParameterPatterns,
    select_parameters,
)
from lightning_curvature.functional.per_example import GradientSampler
from lightning_curvature.functional.probe import BatchNormMode, probe_context, unwrap_model
from lightning_curvature.functional.warnings import CurvatureWarning, NonFiniteCurvatureError

__all__ = [
    "CoherenceMode",
    "GradientCoherence",
    "GradientSums",
    "check_coherence_arguments",
    "default_chunk_size",
    "gradient_coherence",
    "gradient_sums",
]

CoherenceMode = Literal["auto", "per_example", "micro_batch"]
AllReduceSum = Callable[[torch.Tensor], torch.Tensor]
_MODES = ("auto", "per_example", "micro_batch")
# Default vmap chunk: at most this many gradient entries at a time. On CPU a chunk whose
# gradients fit in 16 MiB is reused by the allocator; larger ones page-fault afresh (CNN of
# 95k parameters, batch 128, one thread: chunks of 32-64 cost 1.2-1.7 batch gradients, one
# chunk of 128 1.7-2.6). Accelerators, with caching allocators, take larger chunks.
_CHUNK_ENTRIES_CPU = 2**22
_CHUNK_ENTRIES = 2**25
_VECTOR_STATES = ("sum", "unit_sum", "sq_sum")
# GradientSums.add works on blocks of rows of about this many entries. On CPU a fresh k × P
# temporary (rows joined from per-parameter parts, their squares) costs more in page faults
# than the arithmetic; a block of 8 MiB is reused by the allocator. Min over repeats on a
# 2-core CPU, squares of 128 × 95k floats: 28 ms in one pass, 3 ms in blocks of 22 rows,
# 8 ms in blocks of 5 rows.
_ROW_BLOCK = 2**21


@dataclass(frozen=True)
class GradientCoherence:
    """Result of :func:`gradient_coherence`; tensors live on the model's device.

    See the module docstring for the definitions and the papers they come from.

    Attributes:
        coherence: m-coherence ``‖Σg_i‖² / Σ‖g_i‖²`` (1 orthogonal, ``m`` identical).
        mean_cosine: mean pairwise cosine of the samples over pairs ``i ≠ j``.
        noise_scale: ``B_simple = tr Σ / ‖G‖²`` in examples.
        snr: mean per-coordinate gradient signal-to-noise ratio ``ḡ_j² / σ_j²``.
        grad_norm_sq: unbiased estimate of ``‖G‖²``, the true gradient's squared norm.
        trace_sigma: unbiased estimate of ``tr Σ``, the per-example gradient covariance trace.
        num_samples: ``m``, the number of gradient samples.
        sample_size: examples per sample ``b`` (the harmonic mean when sizes differ).
        mode: where the samples came from (``"per_example"``, ``"micro_batch"``, ...).
        per_layer: block name to the m-coherence of that block (empty unless requested).

    Example:
        >>> net = nn.Linear(2, 1, bias=False)  # per-example gradient = the example
        >>> out = gradient_coherence(net, lambda m, b: m(b).mean(), torch.ones(4, 2))
        >>> out.coherence, out.mean_cosine.round(decimals=6), out.num_samples  # all equal
        (tensor(4.), tensor(1.), 4)
    """

    coherence: torch.Tensor
    mean_cosine: torch.Tensor
    noise_scale: torch.Tensor
    snr: torch.Tensor
    grad_norm_sq: torch.Tensor
    trace_sigma: torch.Tensor
    num_samples: int
    sample_size: float
    mode: str
    per_layer: dict[str, torch.Tensor] = field(default_factory=dict)


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
                <lightning_curvature.functional.parameters.ParameterLayout.groups>`).
            mode: a label reported in the result.

        Raises:
            ValueError: if ``size`` is not a positive integer or ``dtype`` not floating.
        """
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"`size` must be a positive integer, got {size!r}.")
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
        """The tensor states present, by field name (what to register as metric states)."""
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

    def merge(self, other: GradientSums) -> GradientSums:
        """New sums over the samples of both (neither is changed).

        Raises:
            ValueError: if the two do not hold the same states over the same layout.
        """
        if (set(self.states()), self.blocks, self.size) != (
            set(other.states()),
            other.blocks,
            other.size,
        ):
            raise ValueError("`other` must hold the same states, blocks and size to be merged.")
        theirs = other.states()
        return self.with_states(
            {name: value + theirs[name] for name, value in self.states().items()}
        )

    def all_reduce(self, all_reduce_sum: AllReduceSum) -> GradientSums:
        """New sums over every process's samples, with one collective call.

        Args:
            all_reduce_sum: returns the elementwise *sum* of a tensor over processes (e.g.
                ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``).
        """
        states = self.states()
        flat = all_reduce_sum(torch.cat([value.reshape(-1) for value in states.values()]))
        pieces = torch.split(flat, [value.numel() for value in states.values()])
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
        """Every statistic of the module docstring from the sums.

        Args:
            sum_sq_norm: ``‖Σ g_i‖²``, required for scalar-only sums (``vectors=False``) and
                refused otherwise.
            block_sum_sq_norm: the same for each block, for scalar-only sums with blocks.

        Raises:
            ValueError: with fewer than 2 samples, or on a missing or surplus ``sum_sq_norm``.
            NonFiniteCurvatureError: if a sum is NaN or infinite.
        """
        m = self.num_samples
        if m < 2:
            raise ValueError(f"gradient statistics need at least 2 samples, got {m}.")
        given = sum_sq_norm is not None or block_sum_sq_norm is not None
        if (self.sum is None and sum_sq_norm is None) or (self.sum is not None and given):
            raise ValueError(
                "give `sum_sq_norm` (and `block_sum_sq_norm`) exactly when the sums were made "
                "with vectors=False."
            )
        if not all(bool(torch.isfinite(value).all()) for value in self.states().values()):
            raise NonFiniteCurvatureError("a gradient sample is not finite.")
        s1 = self.sq_norm_sum
        s2 = _sq_norm(self.sum) if self.sum is not None else torch.as_tensor(sum_sq_norm).to(s1)
        grad_norm_sq = (s2 - s1) / (m * (m - 1))
        trace_sigma = (m * s1 - s2) / ((m - 1) * self.inverse_size_sum)
        nan = torch.full_like(s1, math.nan)
        return GradientCoherence(
            coherence=s2 / s1,
            mean_cosine=self._mean_cosine() if self.unit_sum is not None else nan,
            noise_scale=trace_sigma / grad_norm_sq,
            snr=self._snr() if self.sq_sum is not None else nan,
            grad_norm_sq=grad_norm_sq,
            trace_sigma=trace_sigma,
            num_samples=m,
            sample_size=m / self.inverse_size_sum.item(),
            mode=self.mode,
            per_layer=self._per_layer(block_sum_sq_norm),
        )

    def _mean_cosine(self) -> torch.Tensor:
        assert self.unit_sum is not None
        n = self.nonzero_count
        return (_sq_norm(self.unit_sum) - n) / (n * (n - 1))

    def _snr(self) -> torch.Tensor:
        assert self.sum is not None
        assert self.sq_sum is not None
        m = self.count
        second = m * self.sq_sum
        variance_num = second - self.sum * self.sum  # (m - 1)·H·σ_j²
        valid = variance_num > m * torch.finfo(second.dtype).eps * second
        # where, not boolean indexing: no host sync and no gather of a P-long vector
        ratios = (self.sum / m) ** 2 * ((m - 1) * self.inverse_size_sum) / variance_num
        return torch.where(valid, ratios, 0.0).sum() / valid.sum()

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

    def _per_layer(self, given: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if self.block_sq_norm_sum is None:
            return {}
        if self.sum is not None:
            given = self.squared_norms(self.sum)[1]
        if given is None or set(given) != set(self.blocks):
            raise ValueError(f"`block_sum_sq_norm` must have the keys {sorted(self.blocks)}.")
        return {
            name: torch.as_tensor(given[name]).to(self.sq_norm_sum) / self.block_sq_norm_sum[i]
            for i, name in enumerate(self.blocks)
        }


def _sq_norm(vector: torch.Tensor) -> torch.Tensor:
    return torch.dot(vector, vector)


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


# -- model level -------------------------------------------------------------------------
def check_coherence_arguments(
    mode: str, micro_batch_size: int | None, chunk_size: int | None, per_layer: object = False
) -> None:
    """Raise on an invalid argument of :func:`gradient_coherence`, naming it.

    Raises:
        ValueError: naming the argument, the allowed values and the value given.

    Example:
        >>> check_coherence_arguments("vmap", 8, None)
        Traceback (most recent call last):
        ...
        ValueError: `mode` must be one of ('auto', 'per_example', 'micro_batch'), got 'vmap'.
    """
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}.")
    for name, value in (("micro_batch_size", micro_batch_size), ("chunk_size", chunk_size)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
    patterns_ok = isinstance(per_layer, (bool, str)) or (
        isinstance(per_layer, Sequence) and all(isinstance(p, str) for p in per_layer)
    )
    if not patterns_ok:
        raise ValueError(
            f"`per_layer` must be a bool or glob pattern(s) of parameter names, got {per_layer!r}."
        )


def default_chunk_size(size: int, device: torch.device) -> int:
    """Examples per ``vmap`` call by default: ``2**22`` gradient entries on CPU, ``2**25`` else.

    Args:
        size: ``P``, the number of measured parameters.
        device: where the gradients are computed.

    Example:
        >>> cpu = torch.device("cpu")
        >>> default_chunk_size(95_000, cpu), default_chunk_size(10**8, cpu)
        (44, 1)
    """
    entries = _CHUNK_ENTRIES_CPU if device.type == "cpu" else _CHUNK_ENTRIES
    return max(1, entries // size)


def _choose_mode(mode: str, model: nn.Module) -> str:
    """The sample kind for ``mode`` on ``model`` as the probe has set it up."""
    coupled = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )
    if mode == "per_example" and coupled:
        raise ValueError(
            "mode='per_example' needs BatchNorm in eval mode (in train mode the examples are "
            "coupled through batch statistics): pass batch_norm='eval' or mode='micro_batch'."
        )
    return "micro_batch" if mode == "micro_batch" or coupled else "per_example"


def _accumulate(
    sums: GradientSums, samples: Iterable[tuple[list[torch.Tensor], float]], min_samples: int
) -> GradientSums:
    for gradients, size in samples:
        sums.add(gradients, size)
    if sums.num_samples < min_samples:
        raise ValueError(
            f"`batch` gives {sums.num_samples} gradient sample(s) in mode {sums.mode!r}; at least "
            "2 are needed (a larger batch or a smaller `micro_batch_size`)."
        )
    return sums


def _warn_fallback(err: Exception, micro_batch_size: int | None) -> None:
    reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    pieces = f"micro-batches of {micro_batch_size} examples" if micro_batch_size else "batches"
    warnings.warn(
        f"per-example gradients (torch.func.vmap) cannot pass through this model ({reason}); "
        f"using gradients of {pieces} instead. Pass mode='micro_batch' to choose this without "
        "a warning.",
        CurvatureWarning,
        stacklevel=3,
    )


def gradient_sums(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    mode: CoherenceMode = "auto",
    micro_batch_size: int | None = 8,
    chunk_size: int | None = None,
    per_layer: bool | str | Sequence[str] = False,
    parameters: ParameterPatterns = None,
    batch_norm: BatchNormMode = "as_is",
    min_samples: int = 2,
) -> GradientSums:
    """The :class:`GradientSums` of the gradient samples of ``loss_fn`` on ``batch``.

    Arguments as for :func:`gradient_coherence` (which is this, an optional all-reduce and
    :meth:`GradientSums.compute`); the mode actually used is the result's ``mode``.
    ``min_samples``: fewer samples raise (give 0 when the sums of several processes are
    pooled before the count is checked).

    Raises:
        ValueError: on invalid arguments, a batch that cannot be cut into examples, or fewer
            than 2 samples.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> sums = gradient_sums(net, lambda m, b: m(b).mean(), torch.eye(2))
        >>> sums.mode, sums.num_samples, sums.sq_norm_sum.item()
        ('per_example', 2, 2.0)
    """
    check_coherence_arguments(mode, micro_batch_size, chunk_size, per_layer)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable as loss_fn(model, batch), got {loss_fn!r}.")
    model = unwrap_model(model)
    named = select_parameters(model, parameters)
    layout = ParameterLayout.from_named(named)
    blocks = layout.groups(per_layer) if per_layer is not False else {}
    batches = split_batches(batch, named[0][1].device).batches
    device = named[0][1].device
    with probe_context(model, batch_norm=batch_norm):
        chosen = _choose_mode(mode, model)
        sampler = GradientSampler(model, loss_fn, named)

        def new_sums(kind: str) -> GradientSums:
            return GradientSums.zeros(
                layout.size, dtype=sampler.dtype, device=device, blocks=blocks, mode=kind
            )

        if chosen == "per_example":
            chunk = chunk_size or default_chunk_size(layout.size, device)
            try:
                samples = (s for b in batches for s in sampler.per_example(b, chunk))
                return _accumulate(new_sums("per_example"), samples, min_samples)
            except (RuntimeError, NotImplementedError) as err:
                if mode != "auto":
                    raise
                _warn_fallback(err, micro_batch_size)
        samples = (s for b in batches for s in sampler.micro_batches(b, micro_batch_size))
        return _accumulate(new_sums("micro_batch"), samples, min_samples)


def gradient_coherence(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    mode: CoherenceMode = "auto",
    micro_batch_size: int | None = 8,
    chunk_size: int | None = None,
    per_layer: bool | str | Sequence[str] = False,
    parameters: ParameterPatterns = None,
    batch_norm: BatchNormMode = "as_is",
    all_reduce_sum: AllReduceSum | None = None,
) -> GradientCoherence:
    """Gradient coherence, mean cosine, noise scale and SNR of ``loss_fn`` on ``batch``.

    Definitions and references are in the module docstring. The samples are per-example
    gradients, computed with ``torch.func.vmap(torch.func.grad(...))`` on batches of one
    example in chunks that are reduced on the fly, or gradients of consecutive micro-batches
    of ``micro_batch_size`` examples.

    ``mode="auto"`` picks per-example gradients, except that:

    * with BatchNorm in train mode (after ``batch_norm`` is applied) it uses micro-batches
      silently: the examples are coupled through the batch statistics, so per-example
      gradients are undefined, and micro-batch gradients are the meaningful samples;
    * if ``vmap`` cannot trace the model (``.item()`` or data-dependent control flow, backward
      hooks, custom autograd functions without ``setup_context``), it warns once with a
      :class:`~lightning_curvature.functional.warnings.CurvatureWarning` naming the error and
      uses micro-batches. The values then describe samples of ``b`` examples
      (``result.sample_size``): coherence and cosine change meaning, the noise scale and its
      parts do not.

    Args:
        model: the module (``torch.compile`` and DDP wrappers are looked through); it is left
            exactly as it was (parameters, buffers, ``.grad``, modes, RNG).
        loss_fn: ``loss_fn(model, batch) -> scalar``, the *mean* loss over the batch's examples.
        batch: one batch or an iterable of batches; samples from all of them are pooled.
        mode: ``"auto"``, ``"per_example"`` or ``"micro_batch"`` (see above).
        micro_batch_size: examples per micro-batch (the last of a batch may be smaller), or
            ``None`` for one sample per batch of ``batch`` (e.g. training micro-batches).
        chunk_size: examples per ``vmap`` call (memory ``chunk_size · P``); by default
            :func:`default_chunk_size`.
        per_layer: ``True`` for one coherence per module, or glob pattern(s) for one per pattern.
        parameters: glob pattern(s) selecting the measured parameters.
        batch_norm: BatchNorm mode during the probe (running statistics never change).
        all_reduce_sum: returns the *sum* of a tensor over processes (DDP), e.g.
            ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``: the result is then that
            of the union of every process's batch, the same on every rank.

    Returns:
        The statistics, with tensors on the model's device.

    Raises:
        ValueError: on invalid arguments (named in the message), ``mode="per_example"`` with
            BatchNorm in train mode, or fewer than 2 samples.
        NonFiniteCurvatureError: if a gradient is NaN or infinite.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> loss_fn = lambda m, b: m(b).mean()  # per-example gradient = the example itself
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
        >>> out = gradient_coherence(net, loss_fn, x)
        >>> out.coherence, out.mean_cosine, out.num_samples  # ‖(2, 2)‖² / 6; cosines 0, 1, 0
        (tensor(1.3333), tensor(0.3333), 3)
    """
    sums = gradient_sums(
        model,
        loss_fn,
        batch,
        mode=mode,
        micro_batch_size=micro_batch_size,
        chunk_size=chunk_size,
        per_layer=per_layer,
        parameters=parameters,
        batch_norm=batch_norm,
    )
    if all_reduce_sum is not None:
        sums = sums.all_reduce(all_reduce_sum)
    return sums.compute()
