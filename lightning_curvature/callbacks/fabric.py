"""``FabricMonitors``: the curvature monitors in a Lightning Fabric loop, as they are.

A monitor reads a short list of facts from the Trainer it runs in (see
:mod:`~lightning_curvature.callbacks.trainer`): the step, the epoch, the loggers, the
strategy (its collectives, how it shards), the optimizers, the training data and the other
monitors. A Fabric loop has every one of them, so nothing is implemented twice here:
:class:`FabricMonitors` presents those facts of a ``Fabric`` and calls the monitors' own
Lightning hooks, with the same schedule and budget, probe data, isolation, collectives,
warnings, logging, custom-scalars layout and checkpoint state as under a Trainer.

What a loop adds, and the hook each line drives:

============================================  ============================================
the loop                                      the monitors
============================================  ============================================
``FabricMonitors(fabric, model, opt, ...)``   ``setup`` and ``on_train_start``: checks, the
(once, after ``fabric.setup``)                fixed probe drawn, the TensorBoard layout
``curvature.on_train_batch_start(step, b)``   ``on_train_batch_start``: probe if due
``curvature.on_train_end(step)`` (optional)   ``on_train_end`` (``on_train_end=True``)
``state = {..., "curvature": curvature}``     ``state_dict``, through ``fabric.save``/``load``
============================================  ============================================

``step`` is the number of optimizer steps taken so far (a Trainer's ``global_step``: litgpt's
``state["step_count"]``), so accumulated micro-batches probe once. Two more hooks exist for
loops that want them: ``on_train_epoch_end(step, epoch)`` (``every_n_epochs``) and
``on_before_optimizer_step()`` (the eigenvalue monitor's ``gradient_share`` and
``update_sharpness``, read at the optimizer step; call it after the backward, before
``optimizer.step()``).

What a Trainer reads, and what stands in for it here: ``global_step`` and
``current_epoch`` are the loop's ``step`` and ``epoch``; ``loggers``, ``world_size``,
``global_rank`` and ``strategy`` are Fabric's (``fabric.loggers``, whose TensorBoard logger
gets the same layout, histograms and images); ``optimizers`` is ``[optimizer]``;
``train_dataloader`` is ``probe_data``; ``callbacks`` is the monitors; the LightningModule
is the module Fabric set up (``model.module``: under DDP the module inside the wrapper, as a
Trainer's monitors see it; under FSDP2 the sharded module).

Not available in a Fabric loop, refused at construction with the reason: ``SAM`` (it
replaces the LightningModule's ``optimizer_step`` and replays ``training_step`` in the
Trainer's closure; a Fabric loop owns its step, and takes the SAM gradient from
:func:`~lightning_curvature.functional.sam.sam_gradient`), ``GradientCoherenceMonitor`` with
``source="accumulation"`` or ``"ddp"`` (it reads training's backward passes through the
Trainer's backward hooks and its accumulation and precision settings) and ``prog_bar=True``
(a Fabric loop has no progress bar).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import torch
from lightning.fabric.wrappers import is_wrapped
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_curvature.callbacks.monitor import CurvatureMonitor
from lightning_curvature.callbacks.sam import SAM
from lightning_curvature.callbacks.training_coherence import TrainingGradientCoherenceMonitor
from lightning_curvature.checks import check_callable, check_module, shown
from lightning_curvature.functional.model.functional_model import LossFn
from lightning_curvature.functional.model.probe import unwrap_model

if TYPE_CHECKING:
    from lightning.fabric import Fabric

__all__ = ["FabricMonitors"]


class _FabricRun:
    """The facts of a Fabric loop a monitor reads from a Trainer, under the Trainer's names."""

    fast_dev_run = False
    is_last_batch = False  # a Fabric loop does not say; see FabricMonitors.on_before_optimizer_step
    max_steps = -1

    def __init__(
        self,
        fabric: Fabric,
        optimizer: torch.optim.Optimizer | None,
        monitors: list[CurvatureMonitor],
        probe_data: Iterable[Any] | None,
    ) -> None:
        self.fabric = fabric
        self.optimizers = [] if optimizer is None else [optimizer]
        self.callbacks = monitors
        self.probe_data = probe_data
        self.global_step = 0
        self.current_epoch = 0

    @property
    def train_dataloader(self) -> Iterable[Any] | None:
        """Where each monitor draws its fixed probe from (:func:`_probe_source`)."""
        return _probe_source(self.probe_data)

    @property
    def strategy(self) -> Any:
        return self.fabric.strategy

    @property
    def loggers(self) -> list[Any]:
        return list(self.fabric.loggers)

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    @property
    def global_rank(self) -> int:
        return self.fabric.global_rank

    @property
    def is_global_zero(self) -> bool:
        return self.fabric.is_global_zero


def _refusal(monitor: object) -> str | None:
    """Why ``monitor`` cannot run in a Fabric loop (``None``: it can)."""
    name = type(monitor).__name__
    if isinstance(monitor, TrainingGradientCoherenceMonitor):
        return (
            f"`GradientCoherenceMonitor(source={monitor.source!r})` reads training's backward "
            "passes through the Trainer's backward hooks and its accumulation and precision "
            "settings, which a Fabric loop does not have; use source='probe'."
        )
    if isinstance(monitor, SAM):
        return (
            "`SAM` replaces the LightningModule's `optimizer_step` and replays `training_step` "
            "in the Trainer's closure; a Fabric loop owns its step: compute the SAM gradient "
            "there with `lightning_curvature.sam_gradient`."
        )
    if not isinstance(monitor, CurvatureMonitor):
        return f"`{name}` is not a curvature monitor (`monitors` holds only those)."
    if getattr(monitor, "prog_bar", False):
        return f"`{name}(prog_bar=True)`: a Fabric loop has no progress bar; leave it False."
    return None


def _module_of(model: nn.Module) -> nn.Module:
    """The module the monitors measure: the one Fabric set up, out of its wrappers."""
    model = unwrap_model(model)  # torch.compile around the Fabric wrapper
    if is_wrapped(model):
        model = unwrap_model(cast(nn.Module, model.module))  # inside (not DDP's wrapper)
    return model


def _optimizer_of(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """``optimizer`` out of Fabric's wrapper (the stability threshold reads its state)."""
    if optimizer is not None and is_wrapped(optimizer):
        return cast(torch.optim.Optimizer, optimizer.optimizer)  # type: ignore[attr-defined]
    return optimizer


def _probe_source(probe_data: Iterable[Any] | None) -> Iterable[Any] | None:
    """``probe_data`` to draw a fixed probe from, leaving the loader training iterates alone.

    A loader set up by Fabric counts the iterations begun (the epoch its distributed sampler
    shuffles with): each probe is drawn from a shallow copy of it, which shares dataset,
    sampler and device but counts on its own, so that training's epochs and every monitor's
    draw see the count as it was.
    """
    return (
        copy.copy(probe_data) if probe_data is not None and is_wrapped(probe_data) else probe_data
    )


def _check_arguments(
    fabric: Any,
    model: Any,
    optimizer: Any,
    monitors: Any,
    loss_fn: Any,
    probe_data: Any,
) -> None:
    """Refuse an argument of :class:`FabricMonitors` of the wrong kind, naming it."""
    from lightning.fabric import Fabric

    error = MisconfigurationException
    if not isinstance(fabric, Fabric):
        raise error(f"`fabric` must be a lightning.fabric.Fabric, got {shown(fabric)}.")
    check_module("model", model, error=error)
    if optimizer is not None and not isinstance(_optimizer_of(optimizer), torch.optim.Optimizer):
        raise error(f"`optimizer` must be a torch.optim.Optimizer or None, got {shown(optimizer)}.")
    if not isinstance(monitors, (list, tuple)):
        raise error(f"`monitors` must be a list of curvature monitors, got {shown(monitors)}.")
    check_callable("loss_fn", loss_fn, "loss_fn(module, batch)", allow_none=True, error=error)
    if probe_data is not None and (
        not isinstance(probe_data, Iterable) or isinstance(probe_data, (str, bytes))
    ):
        raise error(
            f"`probe_data` must be an iterable of batches or None, got {shown(probe_data)}."
        )


class FabricMonitors:
    """The curvature monitors of ``monitors`` in a Lightning Fabric training loop.

    Build it once, after ``fabric.setup``; call :meth:`on_train_batch_start` at the start of
    every training batch (before its forward) and, optionally, :meth:`on_train_end` after
    the loop; put it in the state ``fabric.save`` writes. The monitors then behave as under a
    Trainer (see the module docstring for what stands in for the Trainer, and what is
    refused).

    Args:
        fabric: the launched ``Fabric`` (its loggers, strategy and processes).
        model: the model ``fabric.setup`` returned (or the module it set up).
        optimizer: its optimizer (the stability threshold is read from it); ``None``: no
            threshold.
        monitors: the monitors, e.g. ``HessianEigenvalueMonitor`` and ``HessianTraceMonitor``.
        loss_fn: ``loss_fn(module, batch) -> scalar``, the loss the probes measure, for every
            monitor that has none of its own (a Fabric loop has no ``training_step``; a
            LightningModule's is used without one).
        probe_data: where the fixed probes are drawn from: the loader the loop trains on
            (set up by Fabric, so that under DDP each process probes its own shard and the
            monitors measure their union, as under a Trainer). Each probe batch goes to the
            device through ``fabric.strategy``.

    Raises:
        MisconfigurationException: on a monitor a Fabric loop cannot run (see the module
            docstring), a Fabric without a logger, no loss for a module with no
            ``training_step``, no ``probe_data`` for a fixed probe, or any refusal of the
            monitors' own ``setup`` (a sharded strategy they cannot measure under, ``k``
            above the number of parameters, ...).

    Example:
        A least-squares model, whose Hessian ``XᵀX/n`` is the same at every weight:

        >>> import tempfile
        >>> from lightning.fabric import Fabric
        >>> from lightning.fabric.loggers import CSVLogger
        >>> from lightning_curvature import HessianEigenvalueMonitor
        >>> x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
        >>> loader = torch.utils.data.DataLoader(x, batch_size=64)
        >>> fabric = Fabric(accelerator="cpu", devices=1, loggers=CSVLogger(tempfile.mkdtemp()))
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model, optimizer = fabric.setup(model, optimizer)
        >>> loader = fabric.setup_dataloaders(loader)
        >>> def loss_fn(module, batch):
        ...     return 0.5 * module(batch).pow(2).mean()
        >>> monitor = HessianEigenvalueMonitor(every_n_steps=2)
        >>> curvature = FabricMonitors(
        ...     fabric, model, optimizer, [monitor], loss_fn=loss_fn, probe_data=loader
        ... )
        >>> state = {"model": model, "optimizer": optimizer, "curvature": curvature, "step": 0}
        >>> for batch in loader:  # one epoch of one batch: step 0 is probed
        ...     curvature.on_train_batch_start(state["step"], batch)  # the line a loop adds
        ...     fabric.backward(loss_fn(model, batch))
        ...     optimizer.step()
        ...     optimizer.zero_grad()
        ...     state["step"] += 1
        >>> exact = float(torch.linalg.eigvalsh(x.T @ x / 64)[-1])
        >>> abs(monitor.last_metrics["curvature/eigenvalue_1"] / exact - 1) < 1e-3
        True
        >>> monitor.last_metrics["curvature/stability_threshold"]  # 2 / lr
        20.0
    """

    def __init__(
        self,
        fabric: Fabric,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        monitors: Sequence[CurvatureMonitor],
        *,
        loss_fn: LossFn | None = None,
        probe_data: Iterable[Any] | None = None,
    ) -> None:
        _check_arguments(fabric, model, optimizer, monitors, loss_fn, probe_data)
        for monitor in monitors:
            why = _refusal(monitor)
            if why is not None:
                raise MisconfigurationException(f"Cannot run in a Fabric loop: {why}")
        if not fabric.loggers:
            raise MisconfigurationException(
                "The curvature monitors log through Fabric's loggers, and this Fabric has "
                "none: pass `loggers=` (e.g. lightning.fabric.loggers.TensorBoardLogger)."
            )
        self.module = _module_of(model)
        self.monitors = list(monitors)
        for monitor in self.monitors:
            if monitor.loss_fn is None and not isinstance(self.module, pl.LightningModule):
                if loss_fn is None:
                    raise MisconfigurationException(
                        f"`{type(monitor).__name__}` in a Fabric loop needs a loss: pass "
                        "`loss_fn=` (`loss_fn(module, batch) -> scalar`) to FabricMonitors "
                        "or to the monitor."
                    )
                monitor.loss_fn = loss_fn
            if monitor.probe == "fixed" and probe_data is None and monitor.probe_dataloader is None:
                raise MisconfigurationException(
                    f"`{type(monitor).__name__}` draws a fixed probe: pass `probe_data=` (the "
                    "loader the loop trains on) to FabricMonitors; `probe_data` is None."
                )
        self._run = _FabricRun(fabric, _optimizer_of(optimizer), self.monitors, probe_data)
        for monitor in self.monitors:
            monitor.setup(self.trainer, self._lightning_module, "fit")
        for monitor in self.monitors:
            monitor.on_train_start(self.trainer, self._lightning_module)

    @property
    def trainer(self) -> pl.Trainer:
        """What the monitors' hooks take as their Trainer: the facts of this Fabric loop."""
        return cast(pl.Trainer, self._run)

    @property
    def _lightning_module(self) -> pl.LightningModule:
        return cast(pl.LightningModule, self.module)

    def _at(self, step: int, epoch: int | None = None) -> None:
        self._run.global_step = step
        if epoch is not None:
            self._run.current_epoch = epoch

    def on_train_batch_start(self, step: int, batch: Any = None, *, epoch: int = 0) -> None:
        """Probe what is due at optimizer step ``step``: call before each batch's forward.

        Args:
            step: optimizer steps taken so far (every micro-batch of an accumulated step
                passes the same: that step probes once).
            batch: the training batch, on the device (what ``probe="current"`` measures).
            epoch: the epoch the batch belongs to.

        Raises:
            ValueError: without ``batch`` for a monitor with ``probe="current"``.
        """
        if batch is None and any(m.probe == "current" for m in self.monitors):
            raise ValueError("a monitor with probe='current' measures the batch: pass `batch`.")
        self._at(step, epoch)
        for monitor in self.monitors:
            monitor.on_train_batch_start(self.trainer, self._lightning_module, batch, 0)

    def on_before_optimizer_step(self) -> None:
        """Read the step's gradient and weights: after the backward, before ``optimizer.step()``.

        Only ``HessianEigenvalueMonitor(gradient_share=True)`` (the training gradient's share)
        and ``update_sharpness=True`` (the weights before an update a probe measures along)
        need it; both read the step given to the last :meth:`on_train_batch_start`. A Fabric
        loop does not say which batch ends an epoch, so ``update_sharpness`` has no update to
        measure at an epoch-end or final probe.
        """
        optimizer = self._run.optimizers[0] if self._run.optimizers else None
        for monitor in self.monitors:
            monitor.on_before_optimizer_step(
                self.trainer,
                self._lightning_module,
                optimizer,  # type: ignore[arg-type]
            )

    def on_train_epoch_end(self, step: int, epoch: int) -> None:
        """Probe what ``every_n_epochs`` makes due after epoch ``epoch`` (``step`` steps done)."""
        self._at(step, epoch)
        for monitor in self.monitors:
            monitor.on_train_epoch_end(self.trainer, self._lightning_module)

    def on_train_end(self, step: int) -> None:
        """Probe the final weights (monitors with ``on_train_end=True``), ``step`` steps done."""
        self._at(step)
        for monitor in self.monitors:
            monitor.on_train_end(self.trainer, self._lightning_module)

    def state_dict(self) -> dict[str, Any]:
        """Every monitor's checkpoint state, by its ``state_key`` (for ``fabric.save``).

        Tensors and plain types only, as a Trainer's checkpoint holds them.
        """
        return {monitor.state_key: monitor.state_dict() for monitor in self.monitors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (``fabric.load`` calls it); a monitor not in it starts anew.

        Checkpoint states no monitor claims (a monitor left out since) are not restored, with
        one warning naming them.
        """
        for monitor in self.monitors:
            if monitor.state_key in state_dict:
                monitor.load_state_dict(state_dict[monitor.state_key])
        unknown = set(state_dict) - {monitor.state_key for monitor in self.monitors}
        if unknown:
            rank_zero_warn(
                f"The checkpoint holds the state of monitors not given to FabricMonitors, "
                f"which is not restored: {sorted(unknown)}."
            )
