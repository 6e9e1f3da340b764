"""SAM's optimizer step: the wrapped hook, the second pass at ``w + ε`` and the SAM gradient.

Mechanism (Lightning 2.x; ``../shared/ALGORITHMS.md`` §7 shows what the alternatives break).
In ``setup`` the ``SAM`` callback wraps the module's ``optimizer_step`` hook
(:mod:`~lightning_curvature.callbacks.module_hooks`: an instance attribute, removed again in
``teardown``; a user override of the hook keeps running). On a SAM step the wrapper hands
``optimizer_step`` a closure that

1. runs Lightning's own closure for the step's last micro-batch (:func:`first_pass`:
   ``training_step``, ``zero_grad``, backward with Lightning's loss scaling). ``.grad`` now
   holds ``g``, the gradient at ``w`` accumulated over *all* micro-batches of the step,
   DDP-averaged (or, with ``perturbation="per_replica"``, this rank's own) and multiplied by
   the grad scaler's scale under ``16-mixed``;
2. computes ε from ``.grad`` (:meth:`SAMStep.of`, with
   :func:`~lightning_curvature.functional.gradients.perturbation.sam_perturbation`, exact
   under a power-of-two loss scale). A non-finite ``g`` ends the SAM part here: the grad
   scaler then skips the step as it would without SAM;
3. moves to ``w + ε`` and evaluates ``training_step`` again on every micro-batch of the step
   (each a :class:`~lightning_curvature.callbacks.sam_window.MicroBatch`, kept as it passed
   through ``on_train_batch_start``, already on the device), each loss divided by
   ``accumulate_grad_batches`` and multiplied by the scaler's scale exactly as Lightning
   does, under the precision plugin's autocast; their
   summed gradient, averaged across processes under DDP, is the SAM gradient
   (:meth:`SAMStep.second_pass`);
4. restores ``w`` from saved copies (bit-exact), writes the SAM gradient into ``.grad``
   (:meth:`SAMUpdate.commit`) and returns the first pass's loss.

**Faults.** Steps 2 and 3 run inside the agreement of the processes
(:func:`~lightning_curvature.callbacks.agreement.agreed_probe`) and write nothing the
optimizer reads. An exception on any rank (an out-of-memory error in the second forward,
say) or, without a grad scaler, a non-finite ``L(w + ε)`` or SAM gradient, skips the SAM
part of the step on every rank together: ``.grad`` still holds ``g``, so the optimizer
takes the step it would take without SAM (``perturbation="per_replica"`` averages ``g``
across processes first, as DDP would have). With a grad scaler a non-finite SAM gradient
is the scaler's routine: it skips the step and lowers its scale, as for any overflow.

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
  module's CUDA device, python, numpy) captured where each micro-batch's first pass starts
  (after the module's own ``on_train_batch_start``, which may draw; for the step's last
  micro-batch, when Lightning's closure is called) are replayed, so dropout masks and any
  other draw of ``training_step`` are the first pass's, and the states are then put back to
  where the first pass left them: the run's random stream is exactly the one it has without
  SAM. With ``dropout="resample"`` the second pass draws new masks from the global stream
  (which then advances, so later draws differ from a run without SAM).

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ParallelStrategy

from lightning_curvature.callbacks.agreement import process_mean
from lightning_curvature.callbacks.isolation import call_training_step, isolated
from lightning_curvature.callbacks.sam_window import MicroBatch, loss_of
from lightning_curvature.errors import NonFiniteCurvatureError
from lightning_curvature.functional.distributed.agreement import checked_forwards
from lightning_curvature.functional.gradients.perturbation import (
    SAMPerturbation,
    perturbed_parameters,
    sam_perturbation,
)
from lightning_curvature.functional.gradients.summed import backward_gradient_sum, gradient_sum
from lightning_curvature.functional.linalg.sharded import fsdp_shards, local_tensor
from lightning_curvature.functional.model.probe import frozen_running_stats
from lightning_curvature.functional.operator.sharded_gradients import fsdp_modules

__all__ = [
    "SAMStep",
    "SAMUpdate",
    "averaged_gradients",
    "first_pass",
    "plain_gradients",
]


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


def _mean_over_processes(
    trainer: pl.Trainer, tensors: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Each tensor's mean over processes (new tensors): one collective per dtype and device."""
    mean = process_mean(trainer)
    assert mean is not None
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault((tensor.dtype, tensor.device), []).append(i)
    out: list[torch.Tensor] = list(tensors)
    for indices in groups.values():
        flat = mean(torch.cat([tensors[i].reshape(-1) for i in indices]))
        pieces = torch.split(flat, [tensors[i].numel() for i in indices])
        for i, piece in zip(indices, pieces, strict=True):
            out[i] = piece.view_as(tensors[i])
    return out


def averaged_gradients(
    trainer: pl.Trainer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """The mean over processes of each parameter's ``grads`` (``None``: reached on none).

    A process without a gradient for a parameter contributes zeros, as DDP's reducer does for
    unused parameters. The tensors all-reduced are the same on every process (one per
    parameter, and one flag each), whichever parameters each process reached.
    """
    present = torch.tensor(
        [float(g is not None) for g in grads], dtype=torch.float32, device=params[0].device
    )
    tensors = [
        g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads, strict=True)
    ]
    *means, reached = _mean_over_processes(trainer, [*tensors, present])
    return [m if r > 0 else None for m, r in zip(means, reached.tolist(), strict=True)]


@dataclass(frozen=True)
class SAMUpdate:
    """A SAM step's outcome, agreed by every process, not yet in ``.grad``.

    Attributes:
        params: the optimized parameters.
        gradients: the new ``.grad`` of each (``None``: left as it is).
        logged: ``‖ε‖``, ``L(w + ε) − L(w)`` and the curvature along ε, averaged over
            processes (on steps that log), else ``None``.
    """

    params: list[torch.Tensor]
    gradients: list[torch.Tensor | None]
    logged: torch.Tensor | None = None

    def commit(self) -> None:
        """``.grad`` := :attr:`gradients` (no collective, nothing allocated but a new ``.grad``)."""
        with torch.no_grad():
            for p, g in zip(self.params, self.gradients, strict=True):
                if g is None or p.grad is g:
                    continue
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)


def plain_gradients(trainer: pl.Trainer, optimizer: Any, per_replica: bool) -> None:
    """After a skipped SAM part: ``.grad`` as a step without SAM has it.

    It holds ``g`` already, except per replica under DDP (each process's own): averaged
    across processes then, as DDP's backward would have.
    """
    if not per_replica or trainer.world_size <= 1:
        return
    params = _optimized_parameters(optimizer, with_grad_only=False)
    grads = [p.grad for p in params]
    SAMUpdate(params, averaged_gradients(trainer, params, grads)).commit()


def first_pass(trainer: pl.Trainer, closure: Callable[[], Any], per_replica: bool) -> Any:
    """Run Lightning's closure (step 1 of the module docstring) and return its loss.

    ``per_replica``: under DDP, without the all-reduce of the gradients, so that ``.grad``
    holds this process's own gradient.
    """
    no_sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if per_replica and isinstance(trainer.strategy, ParallelStrategy):
        no_sync = trainer.strategy.block_backward_sync()
    with no_sync:
        return closure()  # Lightning's: training_step, zero_grad, scaled backward


@dataclass
class SAMStep:
    """One SAM step after the first pass: ``g`` from ``.grad``, ε, then the second pass.

    Attributes:
        params: the optimized parameters, in the optimizer's order.
        grads: ``g``, their gradients at ``w`` (zeros where a parameter has none).
        perturbation: ε (its ``all_sum`` set over FSDP2 shards).
        scaler: the precision plugin's grad scaler (``16-mixed``), or ``None``.
        per_replica: ε from each process's own gradient under DDP.
        sharded: the parameters are FSDP2 shards, whose gradients FSDP averages itself.
        perturbed_losses: the second pass's losses ``L_j(w + ε) / k``, unscaled.
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    perturbation: SAMPerturbation
    scaler: Any
    per_replica: bool
    sharded: bool
    perturbed_losses: list[torch.Tensor]

    @classmethod
    def of(
        cls,
        trainer: pl.Trainer,
        optimizer: Any,
        rho: float,
        *,
        adaptive: bool,
        eta: float,
        per_replica: bool,
    ) -> SAMStep | None:
        """ε from the gradients in ``.grad`` (step 2); ``None`` if no parameter has one."""
        # Per replica, each rank may leave other parameters unused (MoE, find_unused_parameters):
        # one list fixed by the optimizer, so every rank all-reduces the same tensors.
        params = _optimized_parameters(optimizer, with_grad_only=not per_replica)
        if not params:  # the loss does not reach any optimized parameter: nothing to perturb
            return None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # FSDP2: ε from the local shards of w and g with the global norm; FSDP's
        # reduce-scatter already averaged g (and averages the SAM gradient).
        shards = fsdp_shards(params)
        perturbation = sam_perturbation(
            [local_tensor(p) for p in params],
            [local_tensor(g) for g in grads],
            rho,
            adaptive=adaptive,
            eta=eta,
            all_sum=None if shards is None else shards.all_sum,
        )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return cls(params, grads, perturbation, scaler, per_replica, shards is not None, [])

    def second_pass(
        self,
        trainer: pl.Trainer,
        window: list[MicroBatch],
        first_losses: list[torch.Tensor] | None,
        *,
        reuse_rng: bool,
    ) -> SAMUpdate:
        """The SAM gradient (step 3), averaged across processes; ``.grad`` untouched.

        ``first_losses``: the step's first-pass losses on a step that logs (then the logged
        values, and the curvature ``(g_SAM − g)·ε / ‖ε‖²`` from the two gradients of the same
        data: this rank's own per replica, else the averaged ones), else ``None``.

        Raises:
            NonFiniteCurvatureError: without a grad scaler, if ``L(w + ε)`` or the SAM
                gradient is not finite on this process.
        """
        before = self.perturbation.dot(self.grads) if first_losses is not None else None
        sam_grads = self._second_pass(trainer, window, reuse_rng)
        if self.scaler is None and not _all_finite([*self.perturbed_losses, *sam_grads]):
            losses = [round(float(loss), 6) for loss in self.perturbed_losses]
            raise NonFiniteCurvatureError(
                f"the loss at w + ε ({losses}) or its gradient is not finite"
            )
        after = (
            self.perturbation.dot(sam_grads) if before is not None and self.per_replica else None
        )
        new: list[torch.Tensor | None] = [
            g if g is not None else (None if p.grad is None else torch.zeros_like(p))
            for p, g in zip(self.params, sam_grads, strict=True)
        ]
        if trainer.world_size > 1 and not self.sharded:
            new = averaged_gradients(trainer, self.params, new)
        if before is None or first_losses is None:
            return SAMUpdate(self.params, new)
        if after is None:  # ε from the averaged g: compare with the averaged g_SAM
            after = self.perturbation.dot(new)
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        curvature = (after - before) / (scale * self.perturbation.norm().double().square())
        return SAMUpdate(self.params, new, self._logged(trainer, first_losses, curvature))

    def _logged(
        self, trainer: pl.Trainer, losses: list[torch.Tensor], curvature: torch.Tensor
    ) -> torch.Tensor | None:
        """``‖ε‖``, ``L(w + ε) − L(w)`` and the curvature, averaged over processes."""
        if not self.perturbed_losses:
            return None
        device, dtype = losses[-1].device, torch.promote_types(losses[-1].dtype, torch.float32)
        perturbed = torch.stack([v.to(device, dtype) for v in self.perturbed_losses]).sum()
        sharpness = perturbed - torch.stack([v.to(device, dtype) for v in losses]).sum()
        values = torch.stack(
            [self.perturbation.norm().to(device, dtype), sharpness, curvature.to(device, dtype)]
        )
        mean = process_mean(trainer)
        return values if mean is None else mean(values)

    def _second_pass(
        self, trainer: pl.Trainer, window: list[MicroBatch], reuse_rng: bool
    ) -> list[torch.Tensor | None]:
        """``Σ_j ∇(scale · L_j(w + ε) / k)`` over the step's micro-batches, ``.grad`` untouched."""
        module = trainer.lightning_module
        accumulate = trainer.accumulate_grad_batches
        scaler = self.scaler

        def losses() -> Iterator[torch.Tensor | None]:
            for micro in window:
                if micro.rng is not None:
                    micro.rng.restore()
                with trainer.precision_plugin.train_step_context():
                    loss = loss_of(call_training_step(module, micro.batch, micro.batch_idx))
                if loss is None:
                    yield None
                    continue
                loss = loss / accumulate  # as Lightning's closure does
                self.perturbed_losses.append(loss.detach())
                yield scaler.scale(loss) if scaler is not None else loss

        # With dropout="reuse" the RNG streams are put back to where the first pass left them.
        with (
            isolated(module, eval_mode=False, rng=reuse_rng, attributes=False),
            perturbed_parameters([local_tensor(p) for p in self.params], self.perturbation),
            frozen_running_stats(module),
            torch.enable_grad(),
        ):
            if self.sharded:  # FSDP2 shards: through their hooks, a status before each
                with checked_forwards(fsdp_modules(module)):
                    return backward_gradient_sum(self.params, losses(), list(module.parameters()))
            return gradient_sum(self.params, losses())


def _all_finite(tensors: Sequence[torch.Tensor | None]) -> bool:
    """Whether this process's values are finite (its shard of a DTensor: no collective)."""
    return all(t is None or bool(torch.isfinite(local_tensor(t)).all()) for t in tensors)
