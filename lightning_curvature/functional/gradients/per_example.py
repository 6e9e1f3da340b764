"""Gradient samples of a model's loss: one per example (``vmap``) or one per micro-batch.

:class:`GradientSampler` turns ``loss_fn(model, batch) -> scalar`` into a stream of flat
gradient *samples* over the measured parameters, yielded in chunks of ``k`` samples (one
``(k, *shape)`` tensor per parameter, the input of
:meth:`~lightning_curvature.functional.gradients.accumulator.GradientSums.add`) together
with the number of examples each sample averages:

* **per example** (:meth:`GradientSampler.per_example`): ``torch.func.vmap`` of
  ``torch.func.grad`` of the loss on a batch of *one* example, over chunks of examples, so
  memory is ``O(chunk_size · P)`` and never ``O(m · P)``. Where ``vmap`` cannot trace the
  model (``.item()`` or data-dependent control flow, as in Hugging Face attention masks;
  ``nn.LSTM``; backward hooks) the same gradients come from a loop, one
  ``torch.autograd.grad`` per example on a batch of that one example, in chunks of the same
  size: same samples, same meaning, only slower (:attr:`GradientSampler.vmap_error` says why);
* **per micro-batch** (:meth:`GradientSampler.micro_batches`): one
  ``torch.autograd.grad`` per consecutive slice of ``b`` examples. It runs on any model
  (BatchNorm in train mode, backward hooks, data-dependent control flow).

The model is called through the package's one functional adapter,
:class:`~lightning_curvature.functional.model.functional_model.FunctionalModel` (detached aliases
of the parameters, one dtype policy), so its ``.grad`` and parameters are never written.
Callers run the sampler inside :func:`~lightning_curvature.functional.model.probe.probe_context`.

How a batch is cut into examples: a batch is a tensor or a (nested) tuple, list or mapping
of them; every tensor whose leading dimension equals the batch size (the leading dimension
of its first tensor) is split along it, every other item (scalars, shared masks, strings) is
passed whole to each piece.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_curvature.functional.model.batches import batch_size, map_tensors
from lightning_curvature.functional.model.functional_model import FunctionalModel, LossFn
from lightning_curvature.functional.model.probe import restored_module_attributes

__all__ = ["ExampleSplitter", "GradientSampler"]

Samples = tuple[list[torch.Tensor], float]
# What vmap raises on a model it cannot trace: functorch's own errors are RuntimeErrors, but
# model code reacts to batched tensors in its own ways (IndexError, ValueError, ...). Any of
# them is safe to catch: the loop then runs the model plainly, and a real model error comes
# back from it unchanged.
_VMAP_ERRORS = (Exception,)
_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching"


@dataclass(frozen=True)
class ExampleSplitter:
    """Cuts one batch into examples or slices of examples (see the module docstring).

    Attributes:
        batch: the batch.
        num_examples: its size (leading dimension of its first tensor).

    Example:
        >>> batch = {"x": torch.arange(6.0).view(3, 2), "y": torch.tensor([0, 1, 2]), "t": 0.5}
        >>> splitter = ExampleSplitter.of(batch)
        >>> splitter.take(slice(1, 3))["y"], splitter.take(slice(1, 3))["t"]
        (tensor([1, 2]), 0.5)
    """

    batch: Any
    num_examples: int

    @classmethod
    def of(cls, batch: Any) -> ExampleSplitter:
        """The splitter of ``batch``.

        Raises:
            ValueError: if the batch has no tensor with a leading (example) dimension.
        """
        size = batch_size(batch)
        if size is None:
            raise ValueError(
                "`batch` holds no tensor with a leading (example) dimension, so it cannot be "
                f"cut into examples; got {type(batch).__name__}."
            )
        return cls(batch=batch, num_examples=size)

    def _splits(self, tensor: torch.Tensor) -> bool:
        return tensor.dim() >= 1 and tensor.shape[0] == self.num_examples

    def take(self, index: slice) -> Any:
        """The batch of the examples in ``index`` (a slice along the example dimension)."""
        return map_tensors(self.batch, lambda t: t[index] if self._splits(t) else t)

    def example_tensors(self, index: slice) -> list[torch.Tensor]:
        """The split tensors restricted to ``index``, in walk order (what ``vmap`` maps over)."""
        found: list[torch.Tensor] = []

        def collect(tensor: torch.Tensor) -> torch.Tensor:
            if self._splits(tensor):
                found.append(tensor[index])
            return tensor

        map_tensors(self.batch, collect)
        return found

    def one_example(self, tensors: Sequence[torch.Tensor]) -> Any:
        """A batch of one example from its unbatched split tensors.

        The inverse of :meth:`example_tensors` for one example: the example dimension (of
        size 1) is put back.
        """
        items = iter(tensors)
        return map_tensors(self.batch, lambda t: next(items).unsqueeze(0) if self._splits(t) else t)


class GradientSampler:
    """Flat gradient samples of ``loss_fn`` over given parameters of ``model``.

    Args:
        model: the (unwrapped) module.
        loss_fn: ``loss_fn(model, batch) -> scalar``, the *mean* loss over the batch.
        named: the measured ``(name, parameter)`` pairs.

    Attributes:
        dtype: the probe dtype the gradients are computed in.
        vmap_error: ``None`` while ``vmap`` works on the model; else the error that made
            :meth:`per_example` switch to its loop over examples (for good: it is not retried).

    Raises:
        ValueError: if a measured parameter is complex.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> sampler = GradientSampler(net, lambda m, b: m(b).sum(), list(net.named_parameters()))
        >>> [grads for grads, _ in sampler.per_example(torch.eye(2), chunk_size=8)]
        [[tensor([[[1., 0.]],
        <BLANKLINE>
                [[0., 1.]]])]]
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, named: Sequence[tuple[str, torch.Tensor]]
    ) -> None:
        self._model = FunctionalModel(model, loss_fn, named)
        self._network = model
        self.dtype = self._model.dtype
        self.vmap_error: Exception | None = None

    def prepare(self, batch: Any) -> Any:
        """``batch`` as the model is fed in the probe (floating tensors in the probe dtype)."""
        return self._model.inputs(batch)

    def loss(self, primals: Sequence[torch.Tensor], batch: Any) -> torch.Tensor:
        """The loss at parameters ``primals`` (one tensor per measured parameter)."""
        return self._model.loss(primals, batch)

    def per_example(self, batch: Any, chunk_size: int) -> Iterator[Samples]:
        """Per-example gradients of ``batch`` in chunks of at most ``chunk_size`` rows.

        By ``vmap``; from the first chunk ``vmap`` fails on, by a loop over the examples
        (the same gradients, see the module docstring).

        Yields:
            ``(gradients, 1.0)`` with ``gradients`` one ``(k, *shape)`` tensor per parameter.

        Raises:
            RuntimeError: whatever the model raises on a batch of one example.
        """
        splitter = ExampleSplitter.of(self.prepare(batch))
        for start in range(0, splitter.num_examples, chunk_size):
            index = slice(start, start + chunk_size)
            grads = None
            if self.vmap_error is None:
                try:
                    grads = self._vmapped(splitter, index)
                except _VMAP_ERRORS as err:
                    self.vmap_error = err
            yield grads if grads is not None else self._looped(splitter, index), 1.0

    def _vmapped(self, splitter: ExampleSplitter, index: slice) -> list[torch.Tensor]:
        def example_loss(primals: tuple[torch.Tensor, ...], *tensors: torch.Tensor) -> torch.Tensor:
            return self.loss(primals, splitter.one_example(tensors))

        tensors = splitter.example_tensors(index)
        in_dims = (None,) + (0,) * len(tensors)
        with warnings.catch_warnings():
            # vmap's own loop for ops without a batching rule (nn.LSTM on CPU): the values are
            # right; how fast is this package's concern, not the user's.
            warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE, category=UserWarning)
            with restored_module_attributes(self._network):
                grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=in_dims)(
                    self._model.primals, *tensors
                )
        return [g.detach() for g in grads]

    def _looped(self, splitter: ExampleSplitter, index: slice) -> list[torch.Tensor]:
        start, stop, _ = index.indices(splitter.num_examples)
        rows = [self.whole(splitter.take(slice(i, i + 1))) for i in range(start, stop)]
        return [torch.cat(parts) for parts in zip(*rows, strict=True)]

    def whole(self, batch: Any) -> list[torch.Tensor]:
        """The gradient of the loss on the whole of ``batch``, one ``(1, *shape)`` per parameter."""
        leaves = [p.detach().requires_grad_(True) for p in self._model.primals]
        grads = torch.autograd.grad(
            self.loss(leaves, batch), leaves, allow_unused=True, materialize_grads=True
        )
        return [g.unsqueeze(0) for g in grads]

    def micro_batches(self, batch: Any, micro_batch_size: int | None) -> Iterator[Samples]:
        """One gradient per consecutive slice of ``micro_batch_size`` examples.

        The last slice may be smaller; ``micro_batch_size=None`` gives one gradient of the
        whole batch.

        Yields:
            ``(gradient, size)`` with ``gradient`` one ``(1, *shape)`` tensor per parameter
            and ``size`` the number of examples it averages.
        """
        splitter = ExampleSplitter.of(self.prepare(batch))
        step = micro_batch_size or splitter.num_examples
        for start in range(0, splitter.num_examples, step):
            piece = splitter.take(slice(start, start + step))
            yield self.whole(piece), float(min(step, splitter.num_examples - start))
