"""``SAM``: sharpness-aware training of any automatic-optimization LightningModule.

Mechanism (Lightning 2.x; ``../shared/ALGORITHMS.md`` §7 shows what the alternatives break).
In ``setup`` the callback wraps the module's ``optimizer_step`` hook (an instance attribute,
removed again in ``teardown``; a user override of the hook keeps running). On a SAM step the
wrapper hands ``optimizer_step`` a closure that

1. runs Lightning's own closure for the step's last micro-batch (``training_step``,
   ``zero_grad``, backward with Lightning's loss scaling). ``.grad`` now holds ``g``, the
   gradient at ``w`` accumulated over *all* micro-batches of the step, DDP-averaged (or, with
   ``perturbation="per_replica"``, this rank's own) and multiplied by the grad scaler's scale
   under ``16-mixed``;
2. computes ε from ``.grad`` (:func:`~lightning_curvature.functional.sam.sam_perturbation`,
   exact under a power-of-two loss scale). A non-finite ``g`` ends the SAM part here: the
   grad scaler then skips the step as it would without SAM;
3. moves to ``w + ε`` and evaluates ``training_step`` again on every micro-batch of the step
   (kept as they passed through ``on_train_batch_start``, already on the device), each loss
   divided by ``accumulate_grad_batches`` and multiplied by the scaler's scale exactly as
   Lightning does, under the precision plugin's autocast; their summed gradient replaces
   ``.grad`` (averaged across processes under DDP);
4. restores ``w`` from saved copies (bit-exact) and returns the first pass's loss.

Lightning then, once and on ``g_SAM``: unscales (``16-mixed``), calls
``on_before_optimizer_step``, clips, and steps the optimizer (``GradScaler.step`` skips the
step if ``g_SAM`` is not finite); lr schedulers are untouched.

The second pass is harmless: it runs in the isolation context every monitor's probe runs in
(:func:`~lightning_curvature.callbacks.isolation.isolated`, here with the modules' modes
kept), so

* **buffers** are put back by value: a ``spectral_norm``'s power iteration (``_u``, ``_v``)
  advances once per step, in the first pass, as without SAM;
* **BatchNorm** normalises with the batch statistics but writes no running statistics
  (:func:`~lightning_curvature.functional.model.probe.frozen_running_stats`), so they come from
  the first pass only;
* **logging**: ``self.log``/``self.log_dict`` are silenced, and the states of torchmetrics
  ``Metric`` modules are put back afterwards (in place), so logged values (and metric
  objects updated in ``training_step``) see every step once;
* **randomness** (``dropout="reuse"``, the default): the global RNG states (torch CPU and the
  module's CUDA device, python, numpy) captured when each micro-batch reached
  ``on_train_batch_start`` are replayed, so dropout masks and any other draw of
  ``training_step`` are the first pass's, and the states are then put back to where the
  first pass left them: the run's random stream is exactly the one it has without SAM. With
  ``dropout="resample"`` the second pass draws new masks from the global stream (which then
  advances, so later draws differ from a run without SAM).

Requirements: ``training_step`` must not change its batch in place, and everything but its
random draws must be deterministic between the two calls; other side effects of
``training_step`` on plain attributes (counters, caches, a recurrent ``self.hidden``) happen
twice (the monitors' probes undo those too; SAM's second pass is a second training-mode
evaluation, documented as such). ``training_step(self, batch)`` without ``batch_idx`` is
called that way. No ``on_before_backward`` /
``on_after_backward`` hooks run for the second pass.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from typing_extensions import override

from lightning_curvature.callbacks.isolation import call_training_step, isolated
from lightning_curvature.callbacks.reporting.logging import log_scalars
from lightning_curvature.callbacks.schedule import ProbeSchedule
from lightning_curvature.callbacks.trainer import check_strategy, log_step
from lightning_curvature.errors import CurvatureWarning
from lightning_curvature.functional.linalg.sharded import fsdp_shards, local_tensor
from lightning_curvature.functional.model.probe import frozen_running_stats
from lightning_curvature.functional.sam import (
    RNGState,
    SAMDropout,
    SAMPerturbation,
    backward_gradient_sum,
    check_sam_arguments,
    gradient_sum,
    perturbed_parameters,
    sam_perturbation,
)

__all__ = ["SAM", "SAMPerturbationMode"]

#: Under DDP: ε from the all-reduced gradient (the full-batch SAM of the union batch), or
#: from each replica's own gradient (Foret et al.'s m-sharpness with m = the local batch).
SAMPerturbationMode = Literal["all_reduced", "per_replica"]
_PERTURBATION = ("all_reduced", "per_replica")
#: What a checkpoint holds of SAM (plain integers), and their values before any step.
_STATE_DEFAULTS = {"num_sam_steps": 0, "num_skipped_steps": 0, "last_log_step": -1}


@dataclass(frozen=True)
class _MicroBatch:
    batch: Any
    batch_idx: int
    rng: RNGState | None


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss Lightning takes from a ``training_step`` output (tensor, dict or None)."""
    if isinstance(output, Mapping):
        output = output.get("loss")
    return output if isinstance(output, torch.Tensor) else None


def _optimized_parameters(optimizer: Any, with_grad_only: bool = True) -> list[torch.Tensor]:
    """Parameters of ``optimizer`` that require grad (and, by default, have one now), once each.

    Without ``with_grad_only`` the list is fixed by the optimizer alone, so it is the same
    on every process whatever parameters each one's loss reached.
    """
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            usable = p.requires_grad and (p.grad is not None or not with_grad_only)
            if id(p) not in seen and usable:
                seen.add(id(p))
                found.append(p)
    return found


def _all_reduce_mean(trainer: pl.Trainer, tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` in place across processes: one collective per dtype and device."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def _average_gradients(
    trainer: pl.Trainer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> None:
    """``.grad`` of each parameter := the mean over processes of their ``grads``.

    A process without a gradient for a parameter contributes zeros, as DDP's reducer does for
    unused parameters; a parameter with a gradient on no process keeps ``.grad = None``.
    The tensors all-reduced are the same on every process (one per parameter, and one flag
    each), whichever parameters each process reached.
    """
    present = torch.tensor(
        [float(g is not None) for g in grads], dtype=torch.float32, device=params[0].device
    )
    tensors = [
        g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads, strict=True)
    ]
    _all_reduce_mean(trainer, [*tensors, present])
    for p, tensor, reached in zip(params, tensors, present.tolist(), strict=True):
        if reached > 0 and p.grad is not tensor:
            p.grad = tensor


class _SAMOptimizerStep:
    """What ``module.optimizer_step`` is while SAM is installed: SAM around the original hook.

    A copy of the module made meanwhile (``deepcopy`` by SWA/EMA callbacks, ``pickle``) gets
    the original hook bound to the copy, never SAM or its Trainer.
    """

    def __init__(self, sam: SAM, original: Callable[..., Any]) -> None:
        self.sam, self.original = sam, original

    def __call__(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> Any:
        return self.sam._optimizer_step(
            self.original, epoch, batch_idx, optimizer, optimizer_closure
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.original, memo)

    def __reduce__(self) -> Any:
        return self.original.__reduce__()  # type: ignore[attr-defined]


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
    weights. See the module docstring for the mechanism and the harmlessness of the second
    pass (BatchNorm, logging, dropout).

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
            check_sam_arguments(rho, eta, dropout)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        if not isinstance(adaptive, bool):
            raise MisconfigurationException(f"`adaptive` must be True or False, got {adaptive!r}.")
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("log_every_n_steps", log_every_n_steps),
        ):
            if value is None and name == "log_every_n_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MisconfigurationException(f"`{name}` must be an integer >= 1, got {value!r}.")
        if perturbation not in _PERTURBATION:
            raise MisconfigurationException(
                f"`perturbation` must be one of {_PERTURBATION}, got {perturbation!r}."
            )
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
        self._window: list[_MicroBatch] = []
        self._first_losses: list[torch.Tensor] = []
        self._installed: tuple[pl.LightningModule, _SAMOptimizerStep, bool] | None = None
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
            self._window.append(_MicroBatch(batch, batch_idx, rng))

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
            loss = _loss_of(outputs)
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
        hook = _SAMOptimizerStep(self, pl_module.optimizer_step)
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
        module = trainer.lightning_module
        per_replica = self.perturbation == "per_replica" and trainer.world_size > 1
        no_sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if per_replica and isinstance(trainer.strategy, ParallelStrategy):
            no_sync = trainer.strategy.block_backward_sync()
        with no_sync:
            loss = closure()  # Lightning's: training_step, zero_grad, scaled backward
        if loss is None:  # training_step returned None: Lightning skips backward
            return loss

        # Per replica, each rank may leave other parameters unused (MoE, find_unused_parameters):
        # one list fixed by the optimizer, so every rank all-reduces the same tensors.
        params = _optimized_parameters(optimizer, with_grad_only=not per_replica)
        if not params:  # the loss does not reach any optimized parameter: nothing to perturb
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # FSDP2: ε from the local shards of w and g with the global norm; FSDP's
        # reduce-scatter already averaged g (and averages the SAM gradient).
        shards = fsdp_shards(params)
        perturbation = sam_perturbation(
            [local_tensor(p) for p in params],
            [local_tensor(g) for g in grads],
            self.rho,
            adaptive=self.adaptive,
            eta=self.eta,
            all_sum=None if shards is None else shards.all_sum,
        )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if not perturbation.is_finite():
            if not per_replica:  # every rank holds the same g: all skip alike
                self._skip(step, scaler)
                return loss
            # Other ranks may go on: take the second pass at w (ε = 0) so the collectives
            # match; the averaged gradient is then not finite and the scaler skips the step.
            perturbation = SAMPerturbation(
                tuple(None if e is None else torch.zeros_like(e) for e in perturbation.tensors),
                perturbation.gradient_norm,
                perturbation.all_sum,
            )

        # The curvature along ε from the two gradients (only on steps that log it): ⟨g, ε⟩ now,
        # before .grad is overwritten; ⟨g_SAM, ε⟩ with the g_SAM of the same data as g.
        logging = self._logs.is_due(step)
        before = perturbation.dot(grads) if logging else None
        perturbed_losses: list[torch.Tensor] = []
        sam_grads = self._second_pass(
            trainer, module, window, params, perturbation, scaler, perturbed_losses
        )
        after = perturbation.dot(sam_grads) if logging and per_replica else None
        with torch.no_grad():
            final: list[torch.Tensor | None] = []
            for p, g in zip(params, sam_grads, strict=True):
                if p.grad is None:  # per replica: not reached on this rank at w
                    final.append(g)
                    continue
                if g is None:
                    p.grad.zero_()
                else:
                    p.grad.copy_(g)
                final.append(p.grad)
            if trainer.world_size > 1 and shards is None:
                _average_gradients(trainer, params, final)
        self.num_sam_steps += 1
        if before is not None:
            if after is None:  # ε from the averaged g: compare with the averaged g_SAM
                after = perturbation.dot([p.grad for p in params])
            scale = float(scaler.get_scale()) if scaler is not None else 1.0
            curvature = (after - before) / (scale * perturbation.norm().double().square())
            self._log(
                trainer, step, perturbation, [*first_losses, loss], perturbed_losses, curvature
            )
        return loss

    def _second_pass(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        window: list[_MicroBatch],
        params: list[torch.Tensor],
        perturbation: SAMPerturbation,
        scaler: Any,
        perturbed_losses: list[torch.Tensor],
    ) -> list[torch.Tensor | None]:
        """``Σ_j ∇(scale · L_j(w + ε) / k)`` over the step's micro-batches, ``.grad`` untouched."""
        accumulate = trainer.accumulate_grad_batches

        def losses() -> Iterator[torch.Tensor | None]:
            for micro in window:
                if micro.rng is not None:
                    micro.rng.restore()
                with trainer.precision_plugin.train_step_context():
                    loss = _loss_of(call_training_step(module, micro.batch, micro.batch_idx))
                if loss is None:
                    yield None
                    continue
                loss = loss / accumulate  # as Lightning's closure does
                perturbed_losses.append(loss.detach())
                yield scaler.scale(loss) if scaler is not None else loss

        # With dropout="reuse" the RNG streams are put back to where the first pass left them.
        with (
            isolated(module, eval_mode=False, rng=self.dropout == "reuse", attributes=False),
            perturbed_parameters([local_tensor(p) for p in params], perturbation),
            frozen_running_stats(module),
            torch.enable_grad(),
        ):
            if perturbation.all_sum is not None:  # FSDP2 shards: through their hooks
                return backward_gradient_sum(params, losses(), list(module.parameters()))
            return gradient_sum(params, losses())

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
