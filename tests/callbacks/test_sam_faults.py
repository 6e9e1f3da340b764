"""SAM never harms the weights: a failed second pass leaves the step a plain one.

A non-finite ``L(w + ε)``, or an exception in the second pass (any class, an out-of-memory
error included), at one step: the SAM part of that step is skipped with one warning naming
the step, and the optimizer steps with the plain gradient, bit for bit the step of a run
that takes no SAM step there (``every_n_steps=2``: SAM at steps 0 and 2 only). And
``dropout="reuse"`` replays the draws of the first pass as it really ran, after the module's
own ``on_train_batch_start`` (which may draw).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any

import pytest
import torch
from test_sam import Net, WeightsPerStep, data, fit, twin

from lightning_curvature.callbacks.sam import SAM
from lightning_curvature.errors import CurvatureWarning

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]

FAULTS = {
    "nan-at-w+eps": math.nan,
    "runtime-error": RuntimeError("the second forward failed"),
    "out-of-memory": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "value-error": ValueError("a shape the second pass did not expect"),
}


class FailsInItsSecondPass(Net):
    """At ``step``, its second (SAM) pass returns a NaN loss or raises ``fault``."""

    def __init__(self, step: int, fault: Any) -> None:
        super().__init__(dtype=torch.float32)
        self.fault_step, self.fault = step, fault

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if (self.trainer.global_step, self.calls_at[self.trainer.global_step]) == (
            self.fault_step,
            2,
        ):
            if isinstance(self.fault, BaseException):
                raise self.fault
            return loss * self.fault
        return loss


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_a_failed_second_pass_is_a_plain_step_with_one_warning(fault: Any) -> None:
    torch.manual_seed(0)
    model, dataset = FailsInItsSecondPass(step=1, fault=fault), data(n=32, dtype=torch.float32)
    expected = twin(model)  # (a step-1 second pass never runs there: no fault)
    sam, weights, expected_weights = SAM(rho=0.05), WeightsPerStep(), WeightsPerStep()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(model, dataset, max_steps=3, callbacks=[sam, weights])
    fit(
        expected, dataset, max_steps=3, callbacks=[SAM(rho=0.05, every_n_steps=2), expected_weights]
    )

    messages = [str(r.message) for r in records if issubclass(r.category, CurvatureWarning)]
    assert len(messages) == 1, messages
    assert "SAM: skipped the SAM part at step 1" in messages[0]
    assert "the optimizer steps with the plain gradient" in messages[0]
    if isinstance(fault, BaseException):
        assert f"{type(fault).__name__}: {fault}" in messages[0]
    else:
        assert "not finite" in messages[0]
    assert (sam.num_sam_steps, sam.num_skipped_steps) == (2, 1)
    assert dict(model.calls_at) == {0: 2, 1: 2, 2: 2}  # the step-1 second pass ran and failed
    for step in range(3):  # SAM, the plain step, SAM again: bit for bit
        for a, b in zip(weights.after[step], expected_weights.after[step], strict=True):
            assert torch.equal(a, b), step
    assert not torch.equal(weights.before[1][0], weights.after[1][0])  # step 1 did step
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


class DrawsInItsHook(Net):
    """Its ``on_train_batch_start`` draws (say, an augmentation's choice); ``training_step``
    records a draw of every call beside its dropout."""

    def __init__(self) -> None:
        super().__init__(dtype=torch.float32, dropout=0.5)
        self.draws: dict[int, list[torch.Tensor]] = defaultdict(list)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.rand(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.draws[self.trainer.global_step].append(torch.rand(3))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_reuse_replays_the_first_pass_that_starts_after_the_modules_own_hook(
    accumulate: int,
) -> None:
    torch.manual_seed(0)
    model, dataset = DrawsInItsHook(), data(n=32, dtype=torch.float32)
    plain = twin(model)
    torch.manual_seed(1)
    fit(model, dataset, callbacks=[SAM(rho=0.5)], accumulate_grad_batches=accumulate)
    after_sam = torch.get_rng_state()
    torch.manual_seed(1)
    fit(plain, dataset, accumulate_grad_batches=accumulate)
    assert torch.equal(after_sam, torch.get_rng_state())  # the run's stream as without SAM
    assert len(model.draws) == 4 // accumulate
    for draws in model.draws.values():  # first passes of the step's micro-batches, then second
        first, second = draws[:accumulate], draws[accumulate:]
        assert len(second) == accumulate
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)  # the same draws, so the same dropout masks
    assert "on_train_batch_start" not in vars(model)  # the wrapper is gone after fit
