r"""Gradient coherence and noise from sums over gradient samples: the pure accumulator.

Where the samples come from (a model's per-example or micro-batch gradients) is the job of
:mod:`~lightning_curvature.functional.coherence`; this module only adds samples up and turns
the sums into statistics.

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
  of their second moment) are left out, and so are coordinates whose gradient is zero up to
  rounding (second moment ``Σ_i g_ij²`` below ``(100·ε)²`` times its mean over coordinates,
  so below what the dtype resolves next to the other coordinates): their ratio is 0/0 made
  of rounding noise, e.g. the key biases of attention, which do not change the softmax. It
  is NaN when none is left. The numerator is the plain squared sample mean,
  as in Liu et al., so pure noise gives about ``1/(m·b)``.

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
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_curvature.errors import NonFiniteCurvatureError

__all__ = ["AllReduceSum", "GradientCoherence", "GradientSums"]

#: Returns the elementwise *sum* of a tensor over processes (e.g. DDP's ranks).
AllReduceSum = Callable[[torch.Tensor], torch.Tensor]
_VECTOR_STATES = ("sum", "unit_sum", "sq_sum")
# GradientSums.add works on blocks of rows of about this many entries. On CPU a fresh k × P
# temporary (rows joined from per-parameter parts, their squares) costs more in page faults
# than the arithmetic; a block of 8 MiB is reused by the allocator. Min over repeats on a
# 2-core CPU, squares of 128 × 95k floats: 28 ms in one pass, 3 ms in blocks of 22 rows,
# 8 ms in blocks of 5 rows.
_ROW_BLOCK = 2**21
# SNR coordinates whose root-mean-square gradient is below this many ε of the mean one are
# zero up to rounding. Attention key biases (zero gradient in exact arithmetic): 1e-18 of the
# mean in float64, about 1e-9 in float32 (Hugging Face GPT-2 and BERT).
_RESOLVED = 100.0


@dataclass(frozen=True)
class GradientCoherence:
    """The statistics of :meth:`GradientSums.compute`; tensors live on the sums' device.

    What :func:`~lightning_curvature.functional.coherence.gradient_coherence` returns.

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
        fallback: empty when the samples were made as asked; otherwise how they were made
            instead and why (a loop over examples where ``vmap`` fails: same meaning; or
            micro-batches where even that fails: a different meaning, also warned).

    Example:
        >>> sums = GradientSums.zeros(2)
        >>> sums.add(torch.ones(4, 2))  # four identical samples
        >>> out = sums.compute()
        >>> out.coherence, out.mean_cosine.round(decimals=6), out.num_samples
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
    fallback: str = ""


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

    def all_reduce(self, all_reduce_sum: AllReduceSum) -> GradientSums:
        """New sums over every process's samples, with one collective call.

        Every state is flattened into one vector, summed by ``all_reduce_sum`` and cut back
        into the states' shapes (``self`` is not changed).

        Args:
            all_reduce_sum: returns the elementwise *sum* of a tensor over processes (e.g.
                ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``).

        Example:
            >>> sums = GradientSums.zeros(2)
            >>> sums.add(torch.tensor([1.0, 0.0]))  # one sample here, the same on a twin
            >>> sums.all_reduce(lambda flat: 2 * flat).compute().coherence
            tensor(2.)
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
        if m < 2:  # checked here, after any all-reduce: one process may hold a single sample
            raise ValueError(
                f"gradient statistics need at least 2 samples, got {m}: the batch gives {m} "
                f"gradient sample(s) in mode {self.mode!r} (a larger batch, or a smaller "
                "`micro_batch_size`, gives more)."
            )
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
            fallback=self.fallback,
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
        eps = torch.finfo(second.dtype).eps
        resolved = self.sq_sum > (_RESOLVED * eps) ** 2 * self.sq_sum.mean()
        valid = (variance_num > m * eps * second) & resolved
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
