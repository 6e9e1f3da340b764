"""``SAM``: sharpness-aware training of any automatic-optimization LightningModule.

The callback: its arguments and their checks, the Lightning hooks (``setup`` checks the run
and wraps the module's ``optimizer_step`` and, with ``dropout="reuse"``, its
``on_train_batch_start``; ``teardown`` removes them; ``on_train_batch_start`` and
``on_train_batch_end`` keep the micro-batches of each SAM step in a
:class:`~lightning_curvature.callbacks.sam_window.StepWindow`), its two schedules (SAM
steps, log windows), its checkpoint state and what it logs. The step itself (Lightning's
closure, ε, the second pass at ``w + ε`` and why it is harmless, the SAM gradient across
processes, what a fault in it does: the SAM part is skipped on every rank, the plain
gradient used) is :mod:`~lightning_curvature.callbacks.sam_step`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from typing_extensions import override

from lightning_curvature.callbacks.agreement import agreed_probe
from lightning_curvature.callbacks.module_hooks import InstalledHooks
from lightning_curvature.callbacks.reporting.logging import log_scalars
from lightning_curvature.callbacks.sam_step import SAMStep, SAMUpdate, first_pass, plain_gradients
from lightning_curvature.callbacks.sam_window import MicroBatch, StepWindow
from lightning_curvature.callbacks.schedule import ProbeSchedule
from lightning_curvature.callbacks.trainer import check_strategy, log_step
from lightning_curvature.callbacks.warning_policy import WarningPolicy
from lightning_curvature.checks import check_choice, check_integer
from lightning_curvature.errors import NonFiniteCurvatureError, ProbeFailure
from lightning_curvature.functional.sam import SAMDropout, check_sam_arguments

__all__ = ["SAM", "SAMPerturbationMode"]

#: Under DDP: ε from the all-reduced gradient (the full-batch SAM of the union batch), or
#: from each replica's own gradient (Foret et al.'s m-sharpness with m = the local batch).
SAMPerturbationMode = Literal["all_reduced", "per_replica"]
_PERTURBATION = ("all_reduced", "per_replica")
#: What a checkpoint holds of SAM (plain integers), and their values before any step.
_STATE_DEFAULTS = {"num_sam_steps": 0, "num_skipped_steps": 0, "last_log_step": -1}


class SAM(Callback):
    """Sharpness-aware minimisation (SAM, or adaptive ASAM) as a Lightning callback.

    On every ``every_n_steps``-th optimizer step the gradient the optimizer sees is
    ``∇L(w + ε)`` instead of ``∇L(w)``, with ``ε = ρ g/‖g‖`` (Foret et al., ICLR 2021) or,
    with ``adaptive=True``, ``ε = ρ T²g/‖Tg‖``, ``T = |w| + η`` (Kwon et al., ICML 2021),
    computed from the step's own data: all micro-batches under gradient accumulation. The
    module and its optimizer need no change; gradient clipping, the optimizer and lr
    schedulers act on the SAM gradient. It costs a second forward and backward per SAM step
    and, under accumulation, keeps the step's micro-batches alive until the step.

    Precision: ``32``/``64``, ``bf16-mixed`` and ``16-mixed`` (the second gradient scaled by
    the grad scaler like the first and unscaled once with it; a step whose first gradient is
    not finite is skipped by the scaler with no SAM pass, one whose SAM gradient is not
    finite is skipped by the scaler too). DDP: ε from the all-reduced gradient (default) or
    per replica, the SAM gradient averaged across processes, so every rank holds the same
    weights. See :mod:`~lightning_curvature.callbacks.sam_step` for the mechanism and the
    harmlessness of the second pass (BatchNorm, logging, dropout).

    Args:
        rho: neighbourhood radius ρ (> 0). About 0.05 for SAM; about 10x that for ASAM.
        adaptive: ASAM instead of SAM.
        every_n_steps: act on optimizer steps whose ``global_step`` is a multiple of it
            (>= 1); the other steps are plain.
        eta: ASAM's offset η in ``T = |w| + η`` (>= 0; 0.01 as in Kwon et al.); unused by SAM.
        dropout: ``"reuse"`` (default): the second pass replays the first pass's random draws
            (same dropout masks, the run's random stream unchanged); ``"resample"``: new
            draws from the global RNG (the stream advances).
        perturbation: under DDP, ``"all_reduced"`` (default; ε from the averaged gradient)
            or ``"per_replica"`` (ε from each process's own gradient, Foret et al.'s
            m-sharpness; saves one all-reduce per SAM step). Equal on a single process.
        log_every_n_steps: log at the first SAM step of every window of this many steps
            (default: the Trainer's ``log_every_n_steps``).

    Logged metrics:
        - ``sam/perturbation_norm``: ``‖ε‖`` (ρ for SAM; varies for ASAM)
        - ``sam/sharpness``: ``L(w + ε) − L(w)`` over the step's micro-batches, from the two
          passes (no extra cost); both averaged over processes under DDP
        - ``sam/curvature``: ``(∇L(w + ε) − ∇L(w))·ε / ‖ε‖²``, the curvature along ε from
          the two gradients (no extra product: ``εᵀHε/‖ε‖²`` up to ``O(ρ)``; ``16-mixed``'s
          loss scale divided out; per replica, each rank's own then averaged)

    Raises:
        MisconfigurationException: on an argument out of range (at construction, naming it
            and its allowed range); at setup, with manual optimization (and so with several
            optimizers, which Lightning 2 allows only there), a ``training_step`` that takes
            ``dataloader_iter``, FSDP1 or DeepSpeed, or ``ModelParallelStrategy`` with
            ``perturbation="per_replica"``. Under ``ModelParallelStrategy`` (FSDP2,
            ``fully_shard``) ε comes from the global gradient norm across the shards.

    Example:
        >>> import lightning.pytorch as pl
        >>> class Line(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        ...     def training_step(self, batch, batch_idx):
        ...         return 0.5 * (self.w * batch).pow(2).sum()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> sam = SAM(rho=0.5)
        >>> trainer = pl.Trainer(callbacks=[sam], max_steps=1, logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False,
        ...     enable_model_summary=False)
        >>> model = Line()
        >>> trainer.fit(model, torch.utils.data.DataLoader([torch.ones(2)]))
        >>> model.w.detach()  # w − 0.1 (w + 0.5 w/‖w‖) = w − 0.1 · 1.1 w
        tensor([2.6700, 3.5600])
        >>> round(sam.last_metrics["sam/sharpness"], 4)  # ½‖1.1 w‖² − ½‖w‖² = 2.625
        2.625
        >>> round(sam.last_metrics["sam/curvature"], 4)  # H = I: curvature 1 along any ε
        1.0
    """

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        every_n_steps: int = 1,
        *,
        eta: float = 0.01,
        dropout: SAMDropout = "reuse",
        perturbation: SAMPerturbationMode = "all_reduced",
        log_every_n_steps: int | None = None,
    ) -> None:
        try:
            check_sam_arguments(rho, eta, dropout, adaptive)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        check_integer("every_n_steps", every_n_steps, error=MisconfigurationException)
        # None: the Trainer's log_every_n_steps
        check_integer(
            "log_every_n_steps", log_every_n_steps, allow_none=True, error=MisconfigurationException
        )
        check_choice("perturbation", perturbation, _PERTURBATION, error=MisconfigurationException)
        self.rho = float(rho)
        self.adaptive = adaptive
        self.every_n_steps = every_n_steps
        self.eta = float(eta)
        self.dropout: SAMDropout = dropout
        self.perturbation: SAMPerturbationMode = perturbation
        self.log_every_n_steps = log_every_n_steps
        #: The values last logged (``sam/perturbation_norm``, ``sam/sharpness``).
        self.last_metrics: dict[str, float] = {}
        #: SAM steps taken, and SAM parts skipped (a gradient not finite at w, a failed pass).
        self.num_sam_steps = 0
        self.num_skipped_steps = 0
        self._sam_steps = ProbeSchedule(every_n_steps)
        # the first SAM step of every log window; the Trainer's window (Lightning's default
        # 50 until setup reads it) unless log_every_n_steps is given
        self._logs = ProbeSchedule(log_every_n_steps or 50, once_per_window=True)
        self._window = StepWindow()
        self._hooks: InstalledHooks | None = None
        self._trainer: pl.Trainer | None = None
        self._warnings = WarningPolicy("SAM")

    # -- Lightning hooks ---------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "`SAM` needs automatic optimization, but the module sets "
                "`automatic_optimization = False` (Lightning 2 also needs manual optimization "
                "for several optimizers). Take the SAM step in your own training_step instead."
            )
        if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
            raise MisconfigurationException(
                "`SAM` cannot re-evaluate a `training_step` that takes `dataloader_iter`: "
                "the step's batches are not known to the callback. Take a batch argument."
            )
        from lightning.pytorch.strategies import ModelParallelStrategy

        check_strategy(trainer, "SAM")  # FSDP2: ε from the global norm across the shards
        if isinstance(trainer.strategy, ModelParallelStrategy) and self.perturbation != (
            "all_reduced"
        ):
            raise MisconfigurationException(
                f"`SAM` under {type(trainer.strategy).__name__}: perturbation="
                f"{self.perturbation!r} needs each process's own gradient, which FSDP2 "
                "reduce-scatters inside the backward; use perturbation='all_reduced'."
            )
        if self.log_every_n_steps is None:
            self._logs.every_n_steps = max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        self._install(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()
        self._window.clear()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        due = self._sam_steps.is_due(step)
        self._window.start(step, batch, batch_idx, trainer.accumulate_grad_batches, due)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._window.end(trainer.global_step, outputs)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            rho=self.rho, adaptive=self.adaptive, every_n_steps=self.every_n_steps
        )

    @property
    def last_log_step(self) -> int:
        """The step SAM last logged at (-1: none yet)."""
        return self._logs.last_step

    @last_log_step.setter
    def last_log_step(self, step: int) -> None:
        self._logs.last_step = step

    @override
    def state_dict(self) -> dict[str, Any]:
        return {name: int(getattr(self, name)) for name in _STATE_DEFAULTS}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, default in _STATE_DEFAULTS.items():  # a key missing: its value before any step
            setattr(self, name, int(state_dict.get(name, default)))

    # -- the wrapped hooks of the module ------------------------------------------------------
    def _install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall()
        wrappers: dict[str, Callable[..., Any]] = {"optimizer_step": self._optimizer_step}
        if self.dropout == "reuse":
            wrappers["on_train_batch_start"] = self._module_batch_start
        self._hooks = InstalledHooks(pl_module, wrappers)
        self._trainer = trainer

    def _uninstall(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        self._hooks, self._trainer = None, None

    def _capture_first_pass(self, batch: Any) -> None:
        """The random state the first pass of the micro-batch ``batch`` starts from, now."""
        trainer = self._trainer
        if trainer is not None:
            self._window.capture(batch, trainer.global_step, trainer.lightning_module.device)

    def _module_batch_start(self, original: Callable[..., Any], batch: Any, *args: Any) -> Any:
        """The module's own ``on_train_batch_start``, which may draw, then the capture.

        Nothing but Lightning's closure runs between it and ``training_step`` of a
        micro-batch that does not end its step (the last one is captured again in the
        closure: an ``optimizer_step`` override may draw, an optimizer may call it twice).
        """
        response = original(batch, *args)
        self._capture_first_pass(batch)
        return response

    def _optimizer_step(
        self,
        original: Callable[..., Any],
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> Any:
        trainer = self._trainer
        if (
            optimizer_closure is not None
            and trainer is not None
            and self._window.holds(trainer.global_step)
        ):
            optimizer_closure = functools.partial(
                self._sam_closure, trainer, optimizer, optimizer_closure
            )
        return original(epoch, batch_idx, optimizer, optimizer_closure)

    # -- the SAM step --------------------------------------------------------------------------
    def _sam_closure(self, trainer: pl.Trainer, optimizer: Any, closure: Callable[[], Any]) -> Any:
        window = self._window.batches  # (freed once the step is done)
        first_losses = self._window.first_losses
        step = trainer.global_step
        per_replica = self.perturbation == "per_replica" and trainer.world_size > 1
        if window and self.dropout == "reuse":  # the step's last first pass starts here
            self._capture_first_pass(window[-1].batch)
        loss = first_pass(trainer, closure, per_replica)
        if loss is None:  # training_step returned None: Lightning skips backward
            return loss
        try:  # every rank skips the SAM part together if it fails on any
            with agreed_probe(trainer):
                update = self._second_pass(trainer, optimizer, window, [*first_losses, loss])
        except ProbeFailure as failure:
            plain_gradients(trainer, optimizer, per_replica)  # .grad: g, as without SAM
            self.num_skipped_steps += 1
            routine = failure.kinds == {NonFiniteCurvatureError.__name__} and _scaler(trainer)
            if not routine:  # (a grad scaler skips a non-finite gradient's step itself)
                what, then = "the SAM part", "the optimizer steps with the plain gradient"
                self._warnings.skipped(step, failure, what, then + ", as without SAM")
            return loss
        if update is not None:
            update.commit()
            self.num_sam_steps += 1
            if update.logged is not None:
                self._log(trainer, step, update.logged)
        return loss

    def _second_pass(
        self,
        trainer: pl.Trainer,
        optimizer: Any,
        window: list[MicroBatch],
        losses: list[torch.Tensor],
    ) -> SAMUpdate | None:
        """ε and the SAM gradient, inside the agreement; ``None``: no SAM part at this step."""
        step = trainer.global_step
        per_replica = self.perturbation == "per_replica" and trainer.world_size > 1
        sam_step = SAMStep.of(
            trainer,
            optimizer,
            self.rho,
            adaptive=self.adaptive,
            eta=self.eta,
            per_replica=per_replica,
        )
        if sam_step is None:  # the loss does not reach any optimized parameter
            return None
        if not sam_step.perturbation.is_finite():
            if per_replica:  # this rank's own gradient: the others agree to skip with it
                raise NonFiniteCurvatureError("the gradient at w is not finite")
            self._skip(step, sam_step.scaler)  # every rank holds the same g: all skip alike
            return None
        # The logged values (and the curvature along ε) only on steps that log them.
        logged = losses if self._logs.is_due(step) else None
        return sam_step.second_pass(trainer, window, logged, reuse_rng=self.dropout == "reuse")

    def _skip(self, step: int, scaler: Any) -> None:
        self.num_skipped_steps += 1
        if scaler is None:  # with a scaler this is routine
            self._warnings.warn_once(
                "gradient",
                f"the gradient at step {step} is not finite; the SAM pass was skipped and the "
                "optimizer steps with that gradient, as it would without SAM.",
            )

    def _log(self, trainer: pl.Trainer, step: int, values: torch.Tensor) -> None:
        """Write ``‖ε‖``, the sharpness and the curvature (averaged over processes)."""
        if not bool(torch.isfinite(values[:2]).all()):
            return  # a step the grad scaler skips: nothing worth a point on a chart
        self._logs.record(step)
        metrics = {"sam/perturbation_norm": values[0], "sam/sharpness": values[1]}
        if bool(torch.isfinite(values[2])):
            metrics["sam/curvature"] = values[2]
        self.last_metrics = {name: float(value) for name, value in metrics.items()}
        log_scalars(trainer, metrics, log_step(trainer))


def _scaler(trainer: pl.Trainer) -> bool:
    """Whether the precision plugin has a grad scaler (``16-mixed``)."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None
