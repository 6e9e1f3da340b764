"""The one isolation context of everything a callback runs on the user's module.

Monitors' probes and ``SAM``'s second pass both call the module (usually through its own
``training_step``) at moments training does not. :func:`isolated` makes such a call leave
no trace on what the user trains, and is the only place that knows how:

* **random number generators**: torch CPU and the module's CUDA device, numpy and python
  are put back on exit (:func:`~lightning_curvature.callbacks.probe_data.isolated_rng`);
* **modes**: with ``eval_mode=True`` (probes) every submodule's ``training`` flag is set to
  ``False`` for the call, so every stochastic layer is off, whatever form it takes
  (``nn.Dropout``, a DropPath, ``F.dropout(x, training=self.training)``, attention's
  ``dropout_p=p if self.training else 0``), and so is a ``spectral_norm`` power iteration.
  The model-level functions then put BatchNorm in the monitor's ``batch_norm`` mode on top;
* **attributes**: every entry of every submodule's ``__dict__`` (the ``training`` flags,
  ``self.hidden`` kept between steps by a recurrent ``training_step``, counters) is put back
  as it was, and entries the call adds are removed (:func:`training_step_loss` does so after
  each of its calls too). A plain attribute changed *in place*
  (``self.cache.append(...)``) is not seen; buffers and metric states are:
* **buffers** (BatchNorm statistics, a ``spectral_norm``'s ``_u``/``_v``) are restored by
  value, and buffer objects replaced by the call are put back;
* **torchmetrics** ``Metric`` states inside the module are restored in place, so a metric
  updated in ``training_step`` counts every training step once;
* **logging**: ``self.log`` and ``self.log_dict`` do nothing.

Parameters, ``.grad`` and the optimizer are not snapshotted: the model-level API never
writes them, and ``SAM`` restores the weights it perturbs itself (bit-exact).

Inside the context a ``training_step`` that returns ``None`` (Lightning's way to skip a
batch) is not an error: :func:`training_step_loss` records the reason and returns a
not-finite loss that depends on the parameters, so the probe's usual non-finite check skips
the measurement on every process at once (no rank waits in a collective for another) and
the monitor names the reason in its one warning (:func:`skip_reasons`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import nn

from lightning_curvature.callbacks.probe_data import isolated_rng
from lightning_curvature.functional.model.probe import (
    module_device,
    restored_module_attributes,
)

__all__ = [
    "RETURNED_NONE",
    "call_training_step",
    "isolated",
    "recording_skip_reasons",
    "restored_metric_states",
    "silenced_logging",
    "skip_reasons",
    "training_step_loss",
]

# The lists recording the reasons of the probe that is running, innermost last: every open
# recorder gets each reason (empty: no probe is running).
_REASONS: contextvars.ContextVar[tuple[list[str], ...]] = contextvars.ContextVar(
    "lightning_curvature_probe_reasons", default=()
)


#: The reason recorded when ``training_step`` returns ``None`` for a probe's batch.
RETURNED_NONE = "the module's training_step returned None for the probe batch"


def _silent(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` while a callback calls ``training_step``."""


@contextlib.contextmanager
def silenced_logging(module: pl.LightningModule) -> Iterator[None]:
    """``module.log`` and ``module.log_dict`` do nothing inside the block.

    Example:
        >>> module = pl.LightningModule()
        >>> with silenced_logging(module):
        ...     module.log("loss", 1.0)  # no trainer needed: nothing happens
        >>> "log" in vars(module)
        False
    """
    names = ("log", "log_dict")
    saved = {name: vars(module)[name] for name in names if name in vars(module)}  # nesting
    module.log, module.log_dict = _silent, _silent  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                setattr(module, name, saved[name])
            else:
                delattr(module, name)


@contextlib.contextmanager
def restored_metric_states(module: nn.Module) -> Iterator[None]:
    """Put back the state of every torchmetrics ``Metric`` in ``module`` on exit.

    Each state object is restored in place and reattached, so states that several metrics
    share (a ``MetricCollection``'s compute groups) stay shared.

    Example:
        >>> from torchmetrics import MeanMetric
        >>> holder = nn.Module()
        >>> holder.mean = MeanMetric()
        >>> with restored_metric_states(holder):
        ...     holder.mean.update(torch.tensor(5.0))
        >>> float(holder.mean.weight), holder.mean.update_count
        (0.0, 0)
    """
    from torchmetrics import Metric

    saved: list[tuple[Metric, dict[str, tuple[Any, Any]], dict[str, Any]]] = []
    for metric in module.modules():
        if isinstance(metric, Metric):
            states: dict[str, tuple[Any, Any]] = {
                name: (value, value.clone() if isinstance(value, torch.Tensor) else list(value))
                for name, value in metric.metric_state.items()
            }
            # counters and caches torchmetrics keeps beside the states
            extra: dict[str, Any] = {
                name: vars(metric)[name]
                for name in ("_update_count", "_computed", "_forward_cache")
                if name in vars(metric)
            }
            saved.append((metric, states, extra))
    try:
        yield
    finally:
        with torch.no_grad():
            for metric, states, extra in saved:
                for name, (original, copy_) in states.items():
                    if isinstance(original, torch.Tensor):
                        original.copy_(copy_)
                    else:
                        original[:] = copy_
                    setattr(metric, name, original)
                for name, value in extra.items():
                    setattr(metric, name, value)


@contextlib.contextmanager
def _restored_buffers(module: nn.Module) -> Iterator[None]:
    """Every buffer put back by value; buffers replaced or added by the call undone."""
    saved = [
        (m, {name: (b, None if b is None else b.clone()) for name, b in m._buffers.items()})
        for m in module.modules()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for name in [name for name in m._buffers if name not in buffers]:
                    del m._buffers[name]
                for name, (buffer, copy_) in buffers.items():
                    m._buffers[name] = buffer
                    if buffer is not None and copy_ is not None and not torch.equal(buffer, copy_):
                        buffer.copy_(copy_)


@contextlib.contextmanager
def isolated(
    module: pl.LightningModule, *, eval_mode: bool = True, rng: bool = True, attributes: bool = True
) -> Iterator[None]:
    """Run a callback's own call of ``module`` without a trace (see the module docstring).

    Args:
        module: the LightningModule (unwrapped).
        eval_mode: every submodule in eval mode for the call (probes); ``False`` keeps the
            modes (``SAM``'s second pass, which must see the training-mode function).
        rng: restore every RNG on exit (``False``: the call's draws advance the streams).
        attributes: restore the submodules' ``__dict__`` entries (``False``: ``SAM``, whose
            second pass is documented to repeat ``training_step``'s own side effects; its
            ``training`` flags are left alone anyway, with ``eval_mode=False``).

    Example:
        >>> class Recurrent(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.drop, self.hidden = nn.Dropout(0.5), None
        ...     def training_step(self, batch):
        ...         self.hidden = batch.sum()  # state kept between steps
        ...         return self.drop(batch).sum()
        >>> model = Recurrent().train()
        >>> with isolated(model):
        ...     loss = training_step_loss(model, torch.ones(4))
        >>> loss, model.hidden, model.drop.training  # dropout was off; nothing kept
        (tensor(4.), None, True)
    """
    with contextlib.ExitStack() as stack:
        # Attributes first, so they are put back last (after the contexts below undo theirs).
        if attributes:
            stack.enter_context(restored_module_attributes(module))
        if rng:
            stack.enter_context(isolated_rng(module_device(module)))
        stack.enter_context(_restored_buffers(module))
        stack.enter_context(restored_metric_states(module))
        stack.enter_context(silenced_logging(module))
        if eval_mode:
            stack.enter_context(_eval_mode(module))
        yield


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule's ``training`` flag ``False``, each put back on exit.

    The flags are set directly, so no user override of ``train()`` runs.
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in modes:
            m.training = False
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def recording_skip_reasons() -> Iterator[list[str]]:
    """Collect what :func:`training_step_loss` ran into during a probe (see :func:`isolated`).

    Recorders nest: each reason goes to every recorder open (the probe's own, and one
    around it that decides what to do next, such as drawing another fixed probe batch).

    Example:
        >>> with recording_skip_reasons() as outer, recording_skip_reasons() as inner:
        ...     pass
        >>> outer, inner
        ([], [])
    """
    reasons: list[str] = []
    token = _REASONS.set((*_REASONS.get(), reasons))
    try:
        yield reasons
    finally:
        _REASONS.reset(token)


def skip_reasons() -> list[str] | None:
    """The reasons recorded so far by the running probe (``None`` outside a probe).

    Example:
        >>> skip_reasons() is None
        True
    """
    recorders = _REASONS.get()
    return recorders[-1] if recorders else None


def call_training_step(module: pl.LightningModule, batch: Any, batch_idx: int) -> Any:
    """``module.training_step(batch, batch_idx)``, or ``(batch)`` if it takes no batch index.

    Example:
        >>> class NoIndex(pl.LightningModule):
        ...     def training_step(self, batch):
        ...         return batch * 2
        >>> call_training_step(NoIndex(), torch.tensor(1.0), batch_idx=3)
        tensor(2.)
    """
    step = module.training_step
    key = getattr(step, "__func__", step)
    takes = _TAKES_BATCH_IDX.get(key)
    if takes is None:  # (inspecting a signature costs about a forward of a tiny MLP: cache it)
        takes = _TAKES_BATCH_IDX[key] = is_param_in_hook_signature(step, "batch_idx", min_args=2)
    return step(batch, batch_idx) if takes else step(batch)


_TAKES_BATCH_IDX: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _not_finite_loss(module: nn.Module) -> torch.Tensor:
    """A NaN scalar with a second derivative in every floating parameter (a skip marker)."""
    terms = [(p * p).sum() for p in module.parameters() if p.is_floating_point()]
    total = torch.stack([t.float() for t in terms]).sum() if terms else torch.zeros(())
    return total * math.nan


def training_step_loss(module: pl.LightningModule, batch: Any, batch_idx: int = 0) -> torch.Tensor:
    """The module's own ``training_step`` loss, with its ``self.log`` calls silenced.

    This is the default ``loss_fn`` of every monitor. Attributes ``training_step`` sets on
    the module (``self.hidden = ...``) are put back after each call, so every call sees the
    module as training left it. ``training_step`` is called with
    ``batch_idx`` if its signature has one: a probe passes the training batch's index for
    ``probe="current"`` and 0 for the fixed probe (whose batches were drawn like the first
    batch of an epoch). A dict output's ``"loss"`` is used.

    Inside a probe, a ``training_step`` that returns ``None`` gives a NaN loss (and records
    why), so the probe is skipped with one warning naming the reason; outside one it raises.

    Raises:
        ValueError: if ``training_step`` returns neither a tensor nor a dict with ``"loss"``
            (``None`` only outside a probe).

    Example:
        >>> class Tiny(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.tensor(2.0))
        ...     def training_step(self, batch, batch_idx):
        ...         self.log("loss", self.w)  # silenced during a probe
        ...         return {"loss": (self.w * batch).pow(2).mean()}
        >>> training_step_loss(Tiny(), torch.tensor([1.0, 3.0]))
        tensor(20., grad_fn=<MeanBackward0>)
    """
    # Attributes put back after every call, not only after the probe: each call of a probe
    # then sees the same module (a recurrent ``self.hidden`` as training left it), so the
    # operator does not change between products, and what a vmap'd call stores is dropped.
    with restored_module_attributes(module), silenced_logging(module):
        output = call_training_step(module, batch, batch_idx)
    if isinstance(output, Mapping) and "loss" in output:
        output = output["loss"]
    recorders = _REASONS.get()
    if output is None and recorders:
        for reasons in recorders:
            reasons.append(RETURNED_NONE)
        return _not_finite_loss(module)
    if not isinstance(output, torch.Tensor):
        raise ValueError(
            "the module's training_step returned neither a tensor nor a dict with 'loss' "
            f"(got {type(output).__name__}); pass `loss_fn=` to the monitor."
        )
    return output
