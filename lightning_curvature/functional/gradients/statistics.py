r"""The gradient statistics computed from sums over gradient samples, and their definitions.

The sums are those of
:class:`~lightning_curvature.functional.gradients.accumulator.GradientSums`, whose
:meth:`~lightning_curvature.functional.gradients.accumulator.GradientSums.compute` calls
:func:`coherence_statistics`; this module only turns them into statistics.

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lightning_curvature.errors import NonFiniteCurvatureError

__all__ = ["GradientCoherence", "coherence_statistics"]

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
        noise_scale: ``B_simple = tr Σ / ‖G‖²`` in examples; ``nan`` where the estimate of
            ``‖G‖²`` is not positive (see ``noise_scale_defined``).
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
        noise_scale_defined: whether the unbiased estimate of ``‖G‖²`` is positive. Where it
            is not (the gradient's signal is below its noise, near a minimum, or too few
            samples) ``tr Σ / ‖G‖²`` would be negative or infinite, and has no meaning: the
            noise scale is ``nan``, its parts are kept.

    Example:
        >>> from lightning_curvature.functional.gradients.accumulator import GradientSums
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
    noise_scale_defined: bool = True


class Sums(Protocol):
    """What the statistics read of the sums.

    The fields and methods of
    :class:`~lightning_curvature.functional.gradients.accumulator.GradientSums`, which calls
    this module, so they are described here instead of imported.
    """

    count: torch.Tensor
    inverse_size_sum: torch.Tensor
    sq_norm_sum: torch.Tensor
    nonzero_count: torch.Tensor
    sum: torch.Tensor | None
    unit_sum: torch.Tensor | None
    sq_sum: torch.Tensor | None
    block_sq_norm_sum: torch.Tensor | None
    blocks: dict[str, list[slice]]
    mode: str
    fallback: str

    @property
    def num_samples(self) -> int: ...

    def states(self) -> dict[str, torch.Tensor]: ...

    def squared_norms(
        self, vector: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def coherence_statistics(
    sums: Sums,
    *,
    sum_sq_norm: torch.Tensor | None = None,
    block_sum_sq_norm: Mapping[str, torch.Tensor] | None = None,
) -> GradientCoherence:
    """Every statistic of the module docstring from ``sums``.

    What :meth:`GradientSums.compute
    <lightning_curvature.functional.gradients.accumulator.GradientSums.compute>` returns; its
    arguments and errors are documented there.

    Example:
        >>> from lightning_curvature.functional.gradients.accumulator import GradientSums
        >>> sums = GradientSums.zeros(2)
        >>> sums.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # two orthogonal samples
        >>> coherence_statistics(sums).coherence
        tensor(1.)
    """
    m = sums.num_samples
    if m < 2:  # checked here, after any all-reduce: one process may hold a single sample
        raise ValueError(
            f"gradient statistics need at least 2 samples, got {m}: the batch gives {m} "
            f"gradient sample(s) in mode {sums.mode!r} (a larger batch, or a smaller "
            "`micro_batch_size`, gives more)."
        )
    given = sum_sq_norm is not None or block_sum_sq_norm is not None
    if (sums.sum is None and sum_sq_norm is None) or (sums.sum is not None and given):
        raise ValueError(
            "give `sum_sq_norm` (and `block_sum_sq_norm`) exactly when the sums were made "
            "with vectors=False."
        )
    if not all(bool(torch.isfinite(value).all()) for value in sums.states().values()):
        raise NonFiniteCurvatureError("a gradient sample is not finite.")
    s1 = sums.sq_norm_sum
    s2 = _sq_norm(sums.sum) if sums.sum is not None else torch.as_tensor(sum_sq_norm).to(s1)
    grad_norm_sq = (s2 - s1) / (m * (m - 1))
    trace_sigma = (m * s1 - s2) / ((m - 1) * sums.inverse_size_sum)
    nan = torch.full_like(s1, math.nan)
    defined = bool(grad_norm_sq > 0)  # else tr Σ / ‖G‖² is negative or infinite: no scale
    return GradientCoherence(
        coherence=s2 / s1,
        mean_cosine=_mean_cosine(sums) if sums.unit_sum is not None else nan,
        noise_scale=trace_sigma / grad_norm_sq if defined else nan,
        snr=_snr(sums) if sums.sq_sum is not None else nan,
        grad_norm_sq=grad_norm_sq,
        trace_sigma=trace_sigma,
        num_samples=m,
        sample_size=m / sums.inverse_size_sum.item(),
        mode=sums.mode,
        per_layer=_per_layer(sums, block_sum_sq_norm),
        fallback=sums.fallback,
        noise_scale_defined=defined,
    )


def _mean_cosine(sums: Sums) -> torch.Tensor:
    assert sums.unit_sum is not None
    n = sums.nonzero_count
    return (_sq_norm(sums.unit_sum) - n) / (n * (n - 1))


def _snr(sums: Sums) -> torch.Tensor:
    assert sums.sum is not None
    assert sums.sq_sum is not None
    m = sums.count
    second = m * sums.sq_sum
    variance_num = second - sums.sum * sums.sum  # (m - 1)·H·σ_j²
    eps = torch.finfo(second.dtype).eps
    resolved = sums.sq_sum > (_RESOLVED * eps) ** 2 * sums.sq_sum.mean()
    valid = (variance_num > m * eps * second) & resolved
    # where, not boolean indexing: no host sync and no gather of a P-long vector
    ratios = (sums.sum / m) ** 2 * ((m - 1) * sums.inverse_size_sum) / variance_num
    return torch.where(valid, ratios, 0.0).sum() / valid.sum()


def _per_layer(sums: Sums, given: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if sums.block_sq_norm_sum is None:
        return {}
    if sums.sum is not None:
        given = sums.squared_norms(sums.sum)[1]
    if given is None or set(given) != set(sums.blocks):
        raise ValueError(f"`block_sum_sq_norm` must have the keys {sorted(sums.blocks)}.")
    return {
        name: torch.as_tensor(given[name]).to(sums.sq_norm_sum) / sums.block_sq_norm_sum[i]
        for i, name in enumerate(sums.blocks)
    }


def _sq_norm(vector: torch.Tensor) -> torch.Tensor:
    return torch.dot(vector, vector)
