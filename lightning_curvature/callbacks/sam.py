"""``SAM``: sharpness-aware training of any automatic-optimization LightningModule.

The callback: its arguments and their checks, the Lightning hooks (``setup`` checks the run
and installs the wrapped ``optimizer_step``, ``teardown`` removes it,
``on_train_batch_start`` keeps the micro-batches of each SAM step, ``on_train_batch_end``
their first losses), its two schedules (SAM steps, log windows), its checkpoint state and
what it logs. The step itself (Lightning's closure, ε, the second pass at ``w + ε`` and why
it is harmless, the SAM gradient across processes) is
:mod:`~lightning_curvature.callbacks.sam_step`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from typing_extensions import override

from lightning_curvature.callbacks.reporting.logging import log_scalars
from lightning_curvature.callbacks.sam_step import (
    MicroBatch,
    SAMOptimizerStep,
    SAMStep,
    first_pass,
    loss_of,
)
from lightning_curvature.callbacks.schedule import ProbeSchedule
from lightning_curvature.callbacks.trainer import check_strategy, log_step
from lightning_curvature.checks import check_choice, check_integer
from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.gradients.perturbation import SAMPerturbation
from lightning_curvature.functional.gradients.rng import RNGState
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
        #: SAM steps taken, and SAM steps given up because the gradient at w was not finite.
        self.num_sam_steps = 0
        self.num_skipped_steps = 0
        self._sam_steps = ProbeSchedule(every_n_steps)
        # the first SAM step of every log window; the Trainer's window (Lightning's default
        # 50 until setup reads it) unless log_every_n_steps is given
        self._logs = ProbeSchedule(log_every_n_steps or 50, once_per_window=True)
        self._window_step = -1
        self._window: list[MicroBatch] = []
        self._first_losses: list[torch.Tensor] = []
        self._installed: tuple[pl.LightningModule, SAMOptimizerStep, bool] | None = None
        self._trainer: pl.Trainer | None = None
        self._warned = False

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
        self._window, self._first_losses, self._window_step = [], [], -1

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # A new window wherever Lightning zeroes the gradients (the first micro-batch of a step),
        # so the second pass covers exactly the micro-batches whose gradients are in ``.grad``.
        if step != self._window_step or batch_idx % trainer.accumulate_grad_batches == 0:
            self._window_step, self._window, self._first_losses = step, [], []
        if self._sam_steps.is_due(step):
            rng = RNGState.capture(pl_module.device) if self.dropout == "reuse" else None
            self._window.append(MicroBatch(batch, batch_idx, rng))

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step != self._window_step:  # the step is done: free its batches
            self._window, self._first_losses = [], []
        elif self._window:
            # A micro-batch that did not end the step: keep its loss (divided by the number of
            # micro-batches, as Lightning reports it) for ``sam/sharpness``.
            loss = loss_of(outputs)
            if loss is not None:
                self._first_losses.append(loss.detach())

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

    # -- the wrapped optimizer_step hook -----------------------------------------------------
    def _install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall()
        had_attribute = "optimizer_step" in vars(pl_module)
        hook = SAMOptimizerStep(self._optimizer_step, pl_module.optimizer_step)
        self._installed = (pl_module, hook, had_attribute)
        self._trainer = trainer
        pl_module.optimizer_step = hook  # type: ignore[method-assign]

    def _uninstall(self) -> None:
        if self._installed is None:
            return
        pl_module, hook, had_attribute = self._installed
        if vars(pl_module).get("optimizer_step") is hook:
            if had_attribute:
                pl_module.optimizer_step = hook.original  # type: ignore[method-assign]
            else:
                del pl_module.optimizer_step
        self._installed, self._trainer = None, None

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
            and self._window
            and self._window_step == trainer.global_step
        ):
            optimizer_closure = functools.partial(
                self._sam_closure, trainer, optimizer, optimizer_closure
            )
        return original(epoch, batch_idx, optimizer, optimizer_closure)

    # -- the SAM step --------------------------------------------------------------------------
    def _sam_closure(self, trainer: pl.Trainer, optimizer: Any, closure: Callable[[], Any]) -> Any:
        window, first_losses = self._window, self._first_losses  # freed once the step is done
        step = trainer.global_step
        per_replica = self.perturbation == "per_replica" and trainer.world_size > 1
        loss = first_pass(trainer, closure, per_replica)
        if loss is None:  # training_step returned None: Lightning skips backward
            return loss
        sam_step = SAMStep.of(
            trainer,
            optimizer,
            self.rho,
            adaptive=self.adaptive,
            eta=self.eta,
            per_replica=per_replica,
        )
        if sam_step is None:  # the loss does not reach any optimized parameter
            return loss
        if not sam_step.perturbation.is_finite():
            if not per_replica:  # every rank holds the same g: all skip alike
                self._skip(step, sam_step.scaler)
                return loss
            sam_step.stay_at_w()  # other ranks may go on: the second pass at w
        # The curvature along ε from the two gradients (only on steps that log it).
        logging = self._logs.is_due(step)
        curvature = sam_step.replace_gradients(
            trainer, window, reuse_rng=self.dropout == "reuse", curvature=logging
        )
        self.num_sam_steps += 1
        if curvature is not None:
            self._log(
                trainer,
                step,
                sam_step.perturbation,
                [*first_losses, loss],
                sam_step.perturbed_losses,
                curvature,
            )
        return loss

    def _skip(self, step: int, scaler: Any) -> None:
        self.num_skipped_steps += 1
        if scaler is None and not self._warned:  # with a scaler this is routine
            self._warned = True
            rank_zero_warn(
                f"SAM: the gradient at step {step} is not finite; the SAM pass was skipped and "
                "the optimizer steps with that gradient, as it would without SAM.",
                category=CurvatureWarning,
            )

    def _log(
        self,
        trainer: pl.Trainer,
        step: int,
        perturbation: SAMPerturbation,
        losses: list[torch.Tensor],
        perturbed_losses: list[torch.Tensor],
        curvature: torch.Tensor,
    ) -> None:
        if not perturbed_losses:
            return
        device, dtype = losses[-1].device, torch.promote_types(losses[-1].dtype, torch.float32)
        perturbed = torch.stack([v.to(device, dtype) for v in perturbed_losses]).sum()
        sharpness = perturbed - torch.stack([v.to(device, dtype) for v in losses]).sum()
        values = torch.stack(
            [perturbation.norm().to(device, dtype), sharpness, curvature.to(device, dtype)]
        )
        if trainer.world_size > 1:
            values = trainer.strategy.reduce(values, reduce_op="mean")
        if not bool(torch.isfinite(values[:2]).all()):
            return  # a step the grad scaler skips: nothing worth a point on a chart
        self._logs.record(step)
        metrics = {"sam/perturbation_norm": values[0], "sam/sharpness": values[1]}
        if bool(torch.isfinite(values[2])):
            metrics["sam/curvature"] = values[2]
        self.last_metrics = {name: float(value) for name, value in metrics.items()}
        log_scalars(trainer, metrics, log_step(trainer))
