"""``GradientCoherenceMonitor``: how much the examples agree on the direction to move.

Three sources of gradient samples (``source=``), read by two kinds of monitor:

* ``"probe"`` (default; this module): per-example gradients (``torch.func.vmap``) of the
  probe batch, or micro-batch gradients where vmap cannot go (BatchNorm in train mode,
  models it cannot trace); the probe batch is fixed by default, so values are comparable
  over time.
* ``"accumulation"`` and ``"ddp"``: free, read from the backward passes training runs anyway
  (:class:`~lightning_curvature.callbacks.training_coherence.TrainingGradientCoherenceMonitor`):
  each micro-batch gradient of a step under gradient accumulation, or each process's own
  gradient of the step under DDP, is one sample.

**Why two classes behind one constructor.** The two kinds read different things, so they
take different arguments: a probe monitor reads probe batches (``probe``, ``probe_batches``,
``loss_fn``, ``batch_norm``, ``mode``, ``chunk_size`` ... apply), a free one reads training's
gradients through hooks (none of those apply, and it refuses them, except at their neutral
values, which LightningCLI passes for every argument). What they share — the statistics and
their tags, the charts, the ``per_layer`` blocks, the sum over processes, the checkpoint
key — is this class, which the free kind subclasses. ``GradientCoherenceMonitor(source=...)``
builds the kind its source needs, much as ``pathlib.Path()`` built a ``PosixPath``, so the
public constructor, ``isinstance`` checks, LightningCLI's ``class_path`` and checkpoints
keyed ``GradientCoherenceMonitor{...}`` work for every source. A function returning either
class would lose the last three; one class for every source would mix the two sets of
arguments and of hooks again.

**How the class is picked** (:class:`_BuiltBySource`, the base of this class). Each kind
names the sources it reads in its class statement (``sources=``, handed to
``__init_subclass__``), and ``__new__`` builds the kind registered for ``source`` before
``__init__`` runs. So this module does not import the free kind's module (no import circle:
the free kind registers itself when :mod:`lightning_curvature.callbacks` imports it, which
any import of this module does first). ``__new__`` sits on the base, not on this class,
because ``inspect.signature`` (so ``help``) and jsonargparse (so LightningCLI) read a class's
own ``__new__`` in preference to its ``__init__``, and an inherited one not at all: both show
each kind's real ``__init__``. Not chosen: a metaclass ``__call__`` (what this used before:
every signature reader then saw ``(*args, **kwargs)``), and one class that delegates to a
source object chosen in ``__init__`` (cleaner, but every source would then build the same
class, while the public ``TrainingGradientCoherenceMonitor`` is what the free sources build
and what a ``class_path`` or an ``isinstance`` check may name).

Under DDP every process logs the statistics of the union of all processes' samples: the
sums of :class:`~lightning_curvature.functional.gradients.accumulator.GradientSums` are added
over processes with one collective
(:meth:`~lightning_curvature.functional.gradients.accumulator.GradientSums.all_reduce`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_curvature.callbacks.agreement import process_sum
from lightning_curvature.callbacks.layers import PerLayerMonitor
from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.reporting.dashboard import (
    COST_CATEGORY,
    Charts,
    exact,
    family,
    layout,
    multiline,
)
from lightning_curvature.callbacks.schedule import EveryNSteps
from lightning_curvature.functional.coherence import (
    CoherenceMode,
    check_coherence_arguments,
    gradient_sums,
)
from lightning_curvature.functional.gradients.accumulator import GradientSums
from lightning_curvature.functional.gradients.statistics import GradientCoherence
from lightning_curvature.functional.model.batches import BatchList
from lightning_curvature.functional.model.parameters import PerLayer

__all__ = ["CoherenceSource", "GradientCoherenceMonitor"]

CoherenceSource = Literal["probe", "accumulation", "ddp"]
_SOURCES = get_args(CoherenceSource)
_STATISTICS = ("coherence", "mean_cosine", "noise_scale", "snr", "grad_norm_sq", "trace_sigma")


class _BuiltBySource:
    """``GradientCoherenceMonitor(source=...)`` builds the kind of monitor ``source`` reads.

    A kind registers the sources it reads with ``sources=`` in its class statement; see the
    module docstring for why ``__new__`` is here and not on ``GradientCoherenceMonitor``.
    """

    _kinds: ClassVar[dict[str, type[_BuiltBySource]]] = {}

    def __init_subclass__(cls, sources: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for source in sources:
            _BuiltBySource._kinds[source] = cls

    def __new__(cls, *args: Any, **kwargs: Any) -> _BuiltBySource:
        kind: type[_BuiltBySource] = cls
        if cls is GradientCoherenceMonitor:
            source = args[0] if args else kwargs.get("source", "probe")
            if source not in _SOURCES:
                raise MisconfigurationException(
                    f"`source` must be one of {_SOURCES}, got {source!r}."
                )
            kind = _BuiltBySource._kinds[source]
        return super().__new__(kind)


class GradientCoherenceMonitor(_BuiltBySource, PerLayerMonitor, sources=("probe",)):
    r"""Gradient coherence, mean cosine, noise scale and SNR of training's gradient samples.

    From ``m`` gradient samples ``g_i`` of ``b`` examples each (definitions and references in
    :mod:`~lightning_curvature.functional.gradients.statistics`):

    * ``gradient/coherence``: m-coherence ``‖Σg_i‖² / Σ‖g_i‖²`` (Chatterjee & Zielinski 2020,
      2022): 1 when the samples are orthogonal, ``m`` when identical. Real labels give
      high coherence early in training, shuffled labels about 1.
    * ``gradient/mean_cosine``: mean pairwise cosine over ``i ≠ j``.
    * ``gradient/noise_scale``: ``B_simple = tr Σ / ‖G‖²`` in examples (McCandlish et al.
      2018): the batch size beyond which larger batches stop paying. Its parts are logged too,
      because near convergence ``‖G‖²`` is small next to its noise and the ratio is
      meaningless: it is not logged where the unbiased ``‖G‖²`` is ``≤ 0``. Smooth the parts
      before dividing.
    * ``gradient/snr``: mean over coordinates of ``ḡ_j² / σ_j²`` (Liu et al. 2020).

    Args:
        source: ``"probe"`` (default), ``"accumulation"`` or ``"ddp"``; see the module
            docstring. The free sources need ``accumulate_grad_batches ≥ 2`` (or DDP) and
            DDP respectively, and automatic optimization; they build a
            :class:`~lightning_curvature.callbacks.training_coherence.TrainingGradientCoherenceMonitor`,
            which takes none of the probe options.
        mode: for ``source="probe"``: ``"auto"`` (per-example, falling back to micro-batches
            with one warning), ``"per_example"`` or ``"micro_batch"``.
        micro_batch_size: for ``source="probe"``: examples per micro-batch sample where
            micro-batches are used (``None``: one sample per probe batch).
        chunk_size: for ``source="probe"``: examples per ``vmap`` call (memory
            ``chunk_size × P``); default about 16 MiB of gradients on CPU.
        per_layer: blocks with a coherence of their own: ``True`` (one per module), a list
            of parameter-name patterns, or a dict of tag name to pattern(s); see
            :mod:`~lightning_curvature.callbacks.layers`.
        every_n_steps: measure every this many optimizer steps (``"auto"``: 500).
        **kwargs: cadence, probe data, loss and the rest: see ``CurvatureMonitor``
            (the probe-data arguments apply to ``source="probe"`` only; ``backend`` does not
            apply: no Hessian-vector products are computed).

    Logged metrics:
        - ``gradient/coherence``, ``gradient/mean_cosine``, ``gradient/noise_scale``,
          ``gradient/snr`` (cosine and SNR not with ``source="ddp"`` nor under FSDP2)
        - ``gradient/grad_norm_sq`` and ``gradient/trace_sigma``: unbiased ``‖G‖²`` and
          ``tr Σ``, the parts of the noise scale
        - ``gradient/num_samples`` and ``gradient/sample_size``: ``m`` and ``b`` (examples
          per sample; 1 for per-example gradients)
        - ``gradient/coherence/<name>`` (with ``per_layer``)
        - ``probe_cost/coherence_seconds``: cost of the measurement

    Raises:
        MisconfigurationException: on invalid arguments (at construction), or without a
            logger, under FSDP1/DeepSpeed (every source) or FSDP2 (``"probe"``, ``"ddp"``),
            with manual optimization (free sources, or the
            probe without ``loss_fn``), with a ``per_layer`` pattern that matches no
            measured parameter, or when the source has no samples to read (at setup).

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = GradientCoherenceMonitor(every_n_steps=50, per_layer=True)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=1, enable_progress_bar=False)
        >>> free = GradientCoherenceMonitor(source="accumulation", every_n_steps=10)
        >>> trainer = pl.Trainer(callbacks=[free], accumulate_grad_batches=4, max_steps=1)
        >>> type(free).__name__, isinstance(free, GradientCoherenceMonitor)
        ('TrainingGradientCoherenceMonitor', True)
    """

    unshardable_reason = (
        "source='probe' needs per-example or micro-batch gradients through torch.func, "
        "which FSDP2's DTensor shards and hooks do not allow. source='accumulation' measures "
        "under FSDP2 (with accumulate_grad_batches >= 2), from training's own micro-batch "
        "gradients."
    )

    cost_name = "coherence"
    counts_hvps = False
    default_every_n_steps = 500
    state_key_arguments = ("source", "mode", "micro_batch_size", "chunk_size", "per_layer")

    def __init__(
        self,
        source: CoherenceSource = "probe",
        mode: CoherenceMode = "auto",
        *,
        micro_batch_size: int | None = 8,
        chunk_size: int | None = None,
        per_layer: PerLayer = False,
        every_n_steps: EveryNSteps = "auto",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("backend", "auto") != "auto":
            raise MisconfigurationException(
                "`backend` chooses how Hessian-vector products are computed; "
                "GradientCoherenceMonitor computes none, so it takes no `backend`; got "
                f"backend={kwargs['backend']!r}."
            )
        super().__init__(per_layer=per_layer, every_n_steps=every_n_steps, **kwargs)
        try:
            check_coherence_arguments(mode, micro_batch_size, chunk_size)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        self.source: CoherenceSource = source
        self.mode: CoherenceMode = mode
        self.micro_batch_size = micro_batch_size
        self.chunk_size = chunk_size

    # -- what every source shares ---------------------------------------------------------
    @property
    def skipped_statistics(self) -> tuple[str, ...]:
        """Statistics this source cannot measure (they are neither logged nor charted)."""
        return ()

    @override
    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Charts:
        def chart(*names: str) -> list[Any]:
            return multiline(*(exact(self.tag(f"gradient/{name}")) for name in names))

        skipped = self.skipped_statistics
        science = {"gradient coherence (m-coherence)": chart("coherence")}
        if "mean_cosine" not in skipped:
            science["mean pairwise cosine of the gradients"] = chart("mean_cosine")
        science["noise scale B_simple = tr Σ / ‖G‖² (examples)"] = chart("noise_scale")
        science["noise scale parts ‖G‖² and tr Σ"] = chart("grad_norm_sq", "trace_sigma")
        if "snr" not in skipped:
            science["gradient SNR (mean over coordinates)"] = chart("snr")
        if self.blocks.requested:
            science["gradient coherence per block"] = multiline(
                family(self.tag("gradient/coherence/"), ".+")
            )
        samples = {"gradient samples m, examples per sample b": chart("num_samples", "sample_size")}
        return layout(
            [
                {self.category("gradient"): science},
                super().charts(trainer, pl_module),
                {COST_CATEGORY: samples},
            ]
        )

    @override
    def _generate_state_key(self, **kwargs: Any) -> str:
        # One key for every source (the source is one of the fields), whichever class
        # implements it: checkpoints resume across the two kinds' classes.
        return f"{GradientCoherenceMonitor.__qualname__}{kwargs!r}"

    @staticmethod
    def summed_over_processes(trainer: pl.Trainer, sums: GradientSums) -> GradientSums:
        """``sums`` of every process, in one collective (``sums`` itself on one process)."""
        if trainer.world_size <= 1:
            return sums
        return sums.all_reduce(process_sum(trainer))

    def enough_samples(self, sums: GradientSums, step: int) -> bool:
        """Whether ``sums`` hold the 2 samples the statistics need (else one warning)."""
        if sums.num_samples >= 2:
            return True
        self.warn_once(
            "samples",
            f"step {step} gave {sums.num_samples} gradient sample(s) from source="
            f"{self.source!r}; at least 2 are needed, so nothing is logged for it.",
        )
        return False

    def metrics(self, result: GradientCoherence) -> dict[str, float | torch.Tensor]:
        """The tags of ``result`` (those of :attr:`skipped_statistics` left out)."""
        metrics: dict[str, float | torch.Tensor] = {
            f"gradient/{name}": getattr(result, name)
            for name in _STATISTICS
            if name not in self.skipped_statistics
        }
        if "gradient/noise_scale" in metrics and not result.noise_scale_defined:
            # ‖G‖² ≤ 0: the signal is below its noise (near convergence) and tr Σ/‖G‖² has no
            # meaning; its parts are still logged.
            del metrics["gradient/noise_scale"]
        metrics["gradient/num_samples"] = float(result.num_samples)
        metrics["gradient/sample_size"] = result.sample_size
        for block, value in result.per_layer.items():
            metrics[f"gradient/coherence/{block}"] = value
        return metrics

    # -- source="probe" -------------------------------------------------------------------
    #: Per-example gradients of a batch, in its gradients (measured 1.6-1.7x on a 95k-parameter
    #: CNN, ``benchmarks/bench_coherence.py``, and about 10x on the 38k-parameter digits CNN
    #: of ``examples/digits_cnn.py``, whose batch is small).
    per_example_gradients = 10.0

    @override
    def expected_cost(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """The per-example gradients of the probe batches (free sources: nothing to plan).

        Example:
            >>> GradientCoherenceMonitor(probe_batches=2).expected_cost(None, None)
            20.0
        """
        if self.source != "probe":
            return None
        return self.per_example_gradients * self.probe_batches

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> Measurement | None:
        sums = gradient_sums(
            pl_module,
            self.probe_loss_fn(),
            BatchList(batches),
            mode=self.mode,
            micro_batch_size=self.micro_batch_size,
            chunk_size=self.chunk_size,
            per_layer=self.measured_blocks,
            parameters=self.measured_parameters,
            batch_norm=self.batch_norm,
        )
        total = self.summed_over_processes(trainer, sums)
        if not self.enough_samples(total, trainer.global_step):
            return None
        return Measurement(self.metrics(total.compute()))
