"""SAM's optimizer step: the wrapped hook, the second pass at ``w + ε`` and the SAM gradient.

Mechanism (Lightning 2.x; ``../shared/ALGORITHMS.md`` §7 shows what the alternatives break).
In ``setup`` the ``SAM`` callback replaces the module's ``optimizer_step`` hook by a
:class:`SAMOptimizerStep` (an instance attribute, removed again in ``teardown``; a user
override of the hook keeps running). On a SAM step the wrapper hands ``optimizer_step`` a
closure that

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
   (each a :class:`MicroBatch`, kept as it passed through ``on_train_batch_start``, already
   on the device), each loss divided by ``accumulate_grad_batches`` and multiplied by the
   scaler's scale exactly as Lightning does, under the precision plugin's autocast; their
   summed gradient replaces ``.grad``, averaged across processes under DDP
   (:meth:`SAMStep.replace_gradients`);
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ParallelStrategy

from lightning_curvature.callbacks.isolation import call_training_step, isolated
from lightning_curvature.functional.gradients.perturbation import (
    SAMPerturbation,
    perturbed_parameters,
    sam_perturbation,
)
from lightning_curvature.functional.gradients.rng import RNGState
from lightning_curvature.functional.gradients.summed import backward_gradient_sum, gradient_sum
from lightning_curvature.functional.linalg.sharded import fsdp_shards, local_tensor
from lightning_curvature.functional.model.probe import frozen_running_stats

__all__ = ["MicroBatch", "SAMOptimizerStep", "SAMStep", "first_pass", "loss_of"]


@dataclass(frozen=True)
class MicroBatch:
    """A micro-batch of a SAM step, as it passed through ``on_train_batch_start``.

    Attributes:
        batch: the batch, already on the device.
        batch_idx: its index, as ``training_step`` receives it.
        rng: the global RNG states it arrived with (``dropout="reuse"``), else ``None``.
    """

    batch: Any
    batch_idx: int
    rng: RNGState | None


def loss_of(output: Any) -> torch.Tensor | None:
    """The loss Lightning takes from a ``training_step`` output (tensor, dict or None).

    Example:
        >>> loss_of({"loss": torch.tensor(2.0), "logits": None}), loss_of(None)
        (tensor(2.), None)
    """
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


class SAMOptimizerStep:
    """What ``module.optimizer_step`` is while SAM is installed: SAM around the original hook.

    ``step(original, epoch, batch_idx, optimizer, optimizer_closure)`` is the ``SAM``
    callback's wrapper of the hook. A copy of the module made meanwhile (``deepcopy`` by
    SWA/EMA callbacks, ``pickle``) gets the original hook bound to the copy, never SAM or its
    Trainer.
    """

    def __init__(self, step: Callable[..., Any], original: Callable[..., Any]) -> None:
        self.step, self.original = step, original

    def __call__(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> Any:
        """The hook's call: ``step`` with the original hook first."""
        return self.step(self.original, epoch, batch_idx, optimizer, optimizer_closure)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.original, memo)

    def __reduce__(self) -> Any:
        return self.original.__reduce__()  # type: ignore[attr-defined]


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

    def stay_at_w(self) -> None:
        """ε := 0, for a rank whose ``g`` is not finite while other ranks may go on.

        The second pass is then taken at ``w`` so that the collectives match; the averaged
        gradient is not finite and the scaler skips the step.
        """
        self.perturbation = SAMPerturbation(
            tuple(None if e is None else torch.zeros_like(e) for e in self.perturbation.tensors),
            self.perturbation.gradient_norm,
            self.perturbation.all_sum,
        )

    def replace_gradients(
        self, trainer: pl.Trainer, window: list[MicroBatch], *, reuse_rng: bool, curvature: bool
    ) -> torch.Tensor | None:
        """``.grad`` := ``g_SAM`` (steps 3 and 4); the curvature along ε if asked, else None.

        The curvature ``(g_SAM − g)·ε / ‖ε‖²`` comes from the two gradients: ``⟨g, ε⟩`` before
        ``.grad`` is overwritten, ``⟨g_SAM, ε⟩`` with the ``g_SAM`` of the same data as ``g``
        (this rank's own per replica, else the averaged one); the loss scale divided out.
        """
        before = self.perturbation.dot(self.grads) if curvature else None
        sam_grads = self._second_pass(trainer, window, reuse_rng)
        after = self.perturbation.dot(sam_grads) if curvature and self.per_replica else None
        with torch.no_grad():
            final: list[torch.Tensor | None] = []
            for p, g in zip(self.params, sam_grads, strict=True):
                if p.grad is None:  # per replica: not reached on this rank at w
                    final.append(g)
                    continue
                if g is None:
                    p.grad.zero_()
                else:
                    p.grad.copy_(g)
                final.append(p.grad)
            if trainer.world_size > 1 and not self.sharded:
                _average_gradients(trainer, self.params, final)
        if before is None:
            return None
        if after is None:  # ε from the averaged g: compare with the averaged g_SAM
            after = self.perturbation.dot([p.grad for p in self.params])
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        return (after - before) / (scale * self.perturbation.norm().double().square())

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
            if self.perturbation.all_sum is not None:  # FSDP2 shards: through their hooks
                return backward_gradient_sum(self.params, losses(), list(module.parameters()))
            return gradient_sum(self.params, losses())
