"""The conditions every curvature probe runs under, and their exact undoing.

A probe must leave the model as it found it and must measure a *deterministic* operator.
:func:`probe_context` therefore, for the duration of the probe:

* forks the torch RNG (CPU and the model's CUDA device), so no random draw of the probe is
  seen by training;
* turns autocast off (curvature is computed in fp32 whatever the trainer's precision) and
  gradients on, also when called under ``torch.no_grad`` or ``torch.inference_mode``;
* puts every submodule in eval mode (its ``training`` flag ``False``), so every stochastic
  layer is off whatever its form (``nn.Dropout*``, a DropPath, ``F.dropout(x,
  training=self.training)``, attention's ``dropout_p=p if self.training else 0``) and a
  ``spectral_norm`` runs no power iteration: every Hessian-vector product sees the same
  function;
* then puts BatchNorm in the requested mode on top. In train mode BatchNorm normalises with
  the batch statistics but is told not to track running statistics, so ``running_mean``,
  ``running_var`` and ``num_batches_tracked`` are never written (the exact train-mode
  Hessian, buffers untouched). A BatchNorm that normalises with its running statistics is
  the fixed per-channel map ``x·s + t``; it is written out as that map, whose double
  backward is cheaper than ``batch_norm``'s generic one (a Hessian-vector product through
  the benchmark CNN costs 12% less, ``benchmarks/bench_curvature.py``; same function, equal
  to rounding);
* selects the math kernel of ``scaled_dot_product_attention`` (the fused kernels have no
  double backward) and disables cuDNN for recurrent layers (cuDNN RNNs have none either);
* makes ``torch.compile``d submodules run eagerly (compiled graphs have no double backward).

Every attribute it changes is restored in a ``finally`` block, submodule by submodule.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "BATCH_NORM_MODES",
    "BatchNormMode",
    "frozen_running_stats",
    "module_device",
    "probe_context",
    "restored_module_attributes",
    "unwrap_model",
]

BatchNormMode = Literal["as_is", "eval", "train"]
BATCH_NORM_MODES = ("as_is", "eval", "train")
_BatchNorm = nn.modules.batchnorm._BatchNorm
_BATCH_NORM_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module to differentiate: without ``torch.compile`` or DDP/DP wrappers.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        elif isinstance(
            model, (nn.parallel.DistributedDataParallel, nn.DataParallel)
        ) and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def module_device(module: nn.Module) -> torch.device:
    """The device ``module`` lives on: its ``device`` if it has one, else its first tensor's.

    A LightningModule (or a module set up by Fabric) knows its device; any other module is
    where its first parameter (or buffer) is, and a module without tensors is on the CPU.

    Example:
        >>> module_device(nn.Linear(2, 1)), module_device(nn.Identity())
        (device(type='cpu'), device(type='cpu'))
    """
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    tensors = itertools.chain(module.parameters(), module.buffers())
    return next(tensors, torch.empty(0)).device


def _check_batch_norm_mode(batch_norm: str) -> None:
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"`batch_norm` must be one of {BATCH_NORM_MODES}, got {batch_norm!r}.")


@contextlib.contextmanager
def _restored_attributes(model: nn.Module, batch_norm: str, dropout: bool) -> Iterator[None]:
    saved: list[tuple[nn.Module, str, object]] = []

    def set_attr(module: nn.Module, name: str, value: object) -> None:
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    try:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                if batch_norm == "eval":
                    set_attr(module, "training", False)
                elif batch_norm == "train":
                    set_attr(module, "training", True)
                if module.training:
                    set_attr(module, "track_running_stats", False)
            elif not dropout and module.training:
                set_attr(module, "training", False)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


@contextlib.contextmanager
def restored_module_attributes(model: nn.Module) -> Iterator[None]:
    """Every submodule's ``__dict__`` entries put back on exit (by identity), new ones removed.

    What a forward or a ``training_step`` stores on the model (a recurrent ``self.hidden``, a
    table built lazily in the first forward, which inside ``vmap`` would stay a dead
    functorch wrapper) leaves no trace. An attribute changed in place is not seen.

    Example:
        >>> class Lazy(nn.Linear):
        ...     def forward(self, x):
        ...         self.table = x * 2  # cached on the module
        ...         return super().forward(x)
        >>> net = Lazy(2, 1)
        >>> with restored_module_attributes(net):
        ...     _ = torch.func.vmap(net)(torch.ones(3, 2))
        >>> hasattr(net, "table")
        False
    """
    saved = [(m, dict(vars(m))) for m in model.modules()]
    try:
        yield
    finally:
        for m, entries in saved:
            current = vars(m)
            for name in [name for name in current if name not in entries]:
                del current[name]
            for name, value in entries.items():
                if current.get(name, _MISSING) is not value:
                    current[name] = value


_MISSING = object()


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm uses batch statistics but writes no running statistics.

    The BatchNorm part of :func:`probe_context` alone, with nothing else changed (no RNG
    fork, autocast, dropout or kernel change): each BatchNorm in training mode gets
    ``track_running_stats=False`` for the duration, so ``running_mean``, ``running_var``
    and ``num_batches_tracked`` are not written and the forward is unchanged; attributes
    are restored on exit. SAM's second forward runs under it.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
        >>> with frozen_running_stats(net):
        ...     _ = net(torch.randn(4, 3))
        >>> int(net[1].num_batches_tracked), net[1].track_running_stats
        (0, True)
    """
    with _restored_attributes(model, "as_is", dropout=True):
        yield


def _normalises_with_running_statistics(module: _BatchNorm) -> bool:
    """A torch BatchNorm (forward not overridden) that will use its running statistics."""
    return (
        type(module).forward in _BATCH_NORM_FORWARDS
        and "forward" not in vars(module)
        and not (module.training or module.running_mean is None or module.running_var is None)
    )


def _running_statistics_affine(module: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``batch_norm`` with running statistics, as the per-channel map ``x·s + t``."""
    module._check_input_dim(x)  # type: ignore[no-untyped-call]
    assert module.running_mean is not None
    assert module.running_var is not None
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    shift = -module.running_mean * scale
    if module.bias is not None:
        shift = shift + module.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(shape) + shift.view(shape)


@contextlib.contextmanager
def _batch_norm_as_affine(model: nn.Module) -> Iterator[None]:
    """Run every BatchNorm that uses running statistics as :func:`_running_statistics_affine`.

    The replacement is an instance attribute ``forward`` (hooks still run, as
    ``Module.__call__`` is unchanged), removed again on exit.
    """
    patched = [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and _normalises_with_running_statistics(m)
    ]
    try:
        for module in patched:
            vars(module)["forward"] = functools.partial(_running_statistics_affine, module)
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def _has_recurrent_layers(model: nn.Module) -> bool:
    return any(isinstance(m, nn.RNNBase) for m in model.modules())


@contextlib.contextmanager
def probe_context(
    model: nn.Module, *, batch_norm: BatchNormMode = "as_is", dropout: bool = False
) -> Iterator[None]:
    """Run a curvature probe on ``model`` without leaving a trace (see module docstring).

    Args:
        model: the (unwrapped) module that will be differentiated.
        batch_norm: ``"as_is"`` keeps each BatchNorm's current mode, ``"eval"`` normalises
            with the running statistics, ``"train"`` with the batch statistics. In every
            case the running statistics are left untouched.
        dropout: keep every module's mode (``True``: dropout and any other train-mode
            behaviour stay active) or put every module but BatchNorm in eval mode (``False``,
            the default: random masks would make every Hessian-vector product a different
            operator).

    Raises:
        ValueError: if ``batch_norm`` is not one of the allowed values.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
        >>> before = net[1].running_mean.clone()
        >>> with probe_context(net):
        ...     _ = net(torch.randn(4, 3))
        >>> torch.equal(before, net[1].running_mean), net[1].track_running_stats
        (True, True)
    """
    _check_batch_norm_mode(batch_norm)
    tensors = itertools.chain(model.parameters(), model.buffers())
    device = next(tensors, torch.empty(0)).device  # a module may hold no parameters
    cuda_devices = [device] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
        stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        if _has_recurrent_layers(model):
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        stack.enter_context(_restored_attributes(model, batch_norm, dropout))
        stack.enter_context(_batch_norm_as_affine(model))
        yield
