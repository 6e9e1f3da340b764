"""Gradient coherence of a model's loss: where the gradient samples come from.

The model-level API over the accumulator of
:mod:`~lightning_curvature.functional.gradients.accumulator` (definitions and references are
in :mod:`~lightning_curvature.functional.gradients.statistics`): which samples to take
(per-example gradients, or micro-batch gradients where per-example ones are undefined or
cannot be computed), in chunks of how many examples, grouped into which blocks, and the
warning when they change meaning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch
from torch import nn
from typing_extensions import TypedDict, Unpack

from lightning_curvature.checks import check_callable, check_choice, check_integer
from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.gradients.accumulator import GradientSums
from lightning_curvature.functional.gradients.per_example import GradientSampler
from lightning_curvature.functional.gradients.statistics import GradientCoherence
from lightning_curvature.functional.linalg.sharded import AllSum
from lightning_curvature.functional.model.batches import split_batches
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.parameters import (
    ParameterLayout,
    ParameterPatterns,
    PerLayer,
    layer_blocks,
    select_parameters,
)
from lightning_curvature.functional.model.probe import BatchNormMode, probe_context, unwrap_model

__all__ = [
    "CoherenceMode",
    "SampleKeywords",
    "check_coherence_arguments",
    "default_chunk_size",
    "gradient_coherence",
    "gradient_sums",
]

CoherenceMode = Literal["auto", "per_example", "micro_batch"]
_MODES = get_args(CoherenceMode)
# Default vmap chunk: at most this many gradient entries at a time. On CPU a chunk whose
# gradients fit in 16 MiB is reused by the allocator; larger ones page-fault afresh (CNN of
# 95k parameters, batch 128, one thread: chunks of 32-64 cost 1.2-1.7 batch gradients, one
# chunk of 128 1.7-2.6). Accelerators, with caching allocators, take larger chunks.
_CHUNK_ENTRIES_CPU = 2**22
_CHUNK_ENTRIES = 2**25


class SampleKeywords(TypedDict, total=False):
    """The keyword arguments of :func:`gradient_sums`, which :func:`gradient_coherence` passes on.

    Example:
        >>> sampling: SampleKeywords = {"mode": "micro_batch", "micro_batch_size": 4}
        >>> net = nn.Linear(2, 1)
        >>> gradient_coherence(net, lambda m, b: m(b).mean(), torch.ones(8, 2), **sampling).mode
        'micro_batch'
    """

    mode: CoherenceMode
    micro_batch_size: int | None
    chunk_size: int | None
    per_layer: PerLayer
    parameters: ParameterPatterns
    batch_norm: BatchNormMode


def check_coherence_arguments(
    mode: str, micro_batch_size: int | None, chunk_size: int | None, per_layer: PerLayer = False
) -> None:
    """Raise on an invalid argument of :func:`gradient_sums`, naming it.

    Raises:
        ValueError: naming the argument, the allowed values and the value given.

    Example:
        >>> check_coherence_arguments("vmap", 8, None)
        Traceback (most recent call last):
        ...
        ValueError: `mode` must be one of ('auto', 'per_example', 'micro_batch'), got 'vmap'.
    """
    check_choice("mode", mode, _MODES)
    check_integer("micro_batch_size", micro_batch_size, allow_none=True)
    check_integer("chunk_size", chunk_size, allow_none=True)
    layer_blocks(per_layer)


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
    sums: GradientSums, samples: Iterable[tuple[list[torch.Tensor], float]]
) -> GradientSums:
    for gradients, size in samples:
        sums.add(gradients, size)
    return sums


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _fallback_note(err: Exception, sampler: GradientSampler, size: int | None) -> str:
    """The result's ``fallback`` note: why micro-batches replace per-example gradients."""
    vmap = f"vmap ({_first_line(sampler.vmap_error)}) nor " if sampler.vmap_error else ""
    pieces = f"micro-batches of {size} examples" if size else "whole batches"
    return (
        f"{pieces} instead of per-example gradients: neither {vmap}a loop over single "
        f"examples ({_first_line(err)}) runs on this model"
    )


def _warn_micro_batches(note: str, size: int | None) -> None:
    """Warn that the samples changed meaning (once the micro-batches have been taken)."""
    warnings.warn(
        f"gradient statistics from {note}. Coherence, mean cosine and SNR now describe samples "
        f"of {size or 'a batch of'} examples, not single examples (the noise scale keeps its "
        "meaning; see result.mode and result.sample_size). Pass mode='micro_batch' to choose "
        "this without a warning.",
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
    per_layer: PerLayer = False,
    parameters: ParameterPatterns = None,
    batch_norm: BatchNormMode = "as_is",
) -> GradientSums:
    """The :class:`GradientSums` of the gradient samples of ``loss_fn`` on ``batch``.

    The samples are per-example gradients, computed with
    ``torch.func.vmap(torch.func.grad(...))`` on batches of one example in chunks that are
    added on the fly, or gradients of consecutive micro-batches of ``micro_batch_size``
    examples. ``mode="auto"`` picks per-example gradients, except that:

    * with BatchNorm in train mode (after ``batch_norm`` is applied) it uses micro-batches
      silently: the examples are coupled through the batch statistics, so per-example
      gradients are undefined, and micro-batch gradients are the meaningful samples;
    * if ``vmap`` cannot trace the model (``.item()`` or data-dependent control flow as in
      Hugging Face attention masks, ``nn.LSTM``, backward hooks, custom autograd functions
      without ``setup_context``), the per-example gradients come from a loop over the
      examples instead: the same samples, slower, no warning (``fallback`` says so;
      ``mode="per_example"`` does the same);
    * if even a batch of one example fails, it warns once with a
      :class:`~lightning_curvature.errors.CurvatureWarning` naming the errors
      and uses micro-batches. The values then describe samples of ``b`` examples
      (``mode``, and the result's ``sample_size`` and ``fallback``): coherence and cosine
      change meaning, the noise scale and its parts do not.

    Fewer than 2 samples are not an error here (the sums of several processes may still be
    enough): :meth:`GradientSums.compute` checks.

    Args:
        model: the module (``torch.compile`` and DDP wrappers are looked through); it is left
            exactly as it was (parameters, buffers, ``.grad``, modes, RNG).
        loss_fn: ``loss_fn(model, batch) -> scalar``, the *mean* loss over the batch's examples.
        batch: one batch or an iterable of batches; samples from all of them are pooled.
        mode: ``"auto"``, ``"per_example"`` or ``"micro_batch"`` (see above).
        micro_batch_size: examples per micro-batch (the last of a batch may be smaller), or
            ``None`` for one sample per batch of ``batch`` (e.g. training micro-batches).
        chunk_size: examples per ``vmap`` call, or per chunk of the loop that replaces it
            (memory ``chunk_size · P``); by default :func:`default_chunk_size`.
        per_layer: blocks with a coherence of their own (``True``: one per module; a list of
            patterns: one per pattern; a dict: block name to pattern(s); see
            :func:`~lightning_curvature.functional.model.parameters.layer_blocks`).
        parameters: glob pattern(s) selecting the measured parameters.
        batch_norm: BatchNorm mode during the probe (running statistics never change).

    Raises:
        ValueError: on invalid arguments (named in the message), ``mode="per_example"`` with
            BatchNorm in train mode, or a batch that cannot be cut into examples.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> sums = gradient_sums(net, lambda m, b: m(b).mean(), torch.eye(2))
        >>> sums.mode, sums.num_samples, sums.sq_norm_sum.item()
        ('per_example', 2, 2.0)
    """
    check_coherence_arguments(mode, micro_batch_size, chunk_size, per_layer)
    check_callable("loss_fn", loss_fn, "loss_fn(model, batch)")
    model = unwrap_model(model)
    named = select_parameters(model, parameters)
    layout = ParameterLayout.from_named(named)
    blocks = layout.groups(per_layer)
    device = named[0][1].device
    batches = split_batches(batch, device).batches
    fallback = ""
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
                sums = _accumulate(new_sums("per_example"), samples)
            except (RuntimeError, NotImplementedError) as err:
                if mode != "auto":
                    raise
                fallback = _fallback_note(err, sampler, micro_batch_size)
            else:
                if sampler.vmap_error is not None:
                    sums.fallback = (
                        "a loop over single examples instead of vmap (same samples), which "
                        f"cannot trace this model: {_first_line(sampler.vmap_error)}"
                    )
                return sums
        samples = (s for b in batches for s in sampler.micro_batches(b, micro_batch_size))
        sums = _accumulate(new_sums("micro_batch"), samples)  # (raises: no fallback to warn of)
        if fallback:
            _warn_micro_batches(fallback, micro_batch_size)
        sums.fallback = fallback
        return sums


def gradient_coherence(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    all_sum: AllSum | None = None,
    **sampling: Unpack[SampleKeywords],
) -> GradientCoherence:
    """Gradient coherence, mean cosine, noise scale and SNR of ``loss_fn`` on ``batch``.

    :func:`gradient_sums` of the samples, summed over processes if asked, and
    :meth:`GradientSums.compute
    <lightning_curvature.functional.gradients.accumulator.GradientSums.compute>`. Definitions
    and references are in :mod:`~lightning_curvature.functional.gradients.statistics`.

    Args:
        model: the module (``torch.compile`` and DDP wrappers are looked through); it is left
            exactly as it was (parameters, buffers, ``.grad``, modes, RNG).
        loss_fn: ``loss_fn(model, batch) -> scalar``, the *mean* loss over the batch's examples.
        batch: one batch or an iterable of batches; samples from all of them are pooled.
        all_sum: returns the *sum* of a tensor over processes (DDP), e.g.
            ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``: the result is then that
            of the union of every process's batch, the same on every rank.
        **sampling: which samples, of which parameters, in which blocks (:class:`SampleKeywords`):
            ``mode`` (``"auto"``: per-example gradients where they are defined and computable,
            else micro-batches with one warning; ``"per_example"``; ``"micro_batch"``),
            ``micro_batch_size`` (8), ``chunk_size``, ``per_layer``, ``parameters`` and
            ``batch_norm`` (``"as_is"``), as :func:`gradient_sums` documents them.

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
    check_callable("all_sum", all_sum, "all_sum(tensor) -> tensor", allow_none=True)
    sums = gradient_sums(model, loss_fn, batch, **sampling)
    if all_sum is not None:
        sums = sums.all_reduce(all_sum)
    return sums.compute()
