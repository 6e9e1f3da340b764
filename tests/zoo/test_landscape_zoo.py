"""Loss slices and critical sharpness on architectures nobody here wrote.

A tied-embedding transformers GPT-2, a timm ViT and a ``torch.nn.Transformer``-based model:
the slice's losses are the model's own loss at the displaced weights (computed by
moving a copy of the model), the slice's quadratic term is the float64 reference Hessian's.
Critical sharpness needs no second derivative, so it runs through the fused CPU attention
kernel, which has none, where a model forces it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_curvature import critical_sharpness, loss_slice
from tests.zoo import zoo
from tests.zoo.reference import Reference
from tests.zoo.test_fused_attention import FLASH, ForcedFlash, _forced_loss, _Ops

OFFSETS = [-1.0, 0.0, 0.5, 1.0]


def _moved(model: nn.Module, step: torch.Tensor) -> nn.Module:
    """A copy of ``model`` (eval mode) with ``step`` added to its trainable parameters."""
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        start = 0
        for p in [p for p in twin.parameters() if p.requires_grad]:
            p.add_(step[start : start + p.numel()].view_as(p))
            start += p.numel()
    return twin


@pytest.mark.parametrize(
    "build",
    [lambda: zoo.gpt2("sdpa"), zoo.timm_vit, zoo.demo_transformer],
    ids=["gpt2", "vit", "torch_transformer"],
)
def test_slices_are_the_models_own_loss_and_the_reference_curvature(build: object) -> None:
    case = build()  # type: ignore[operator]
    size = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
    direction = torch.randn(size, generator=torch.Generator().manual_seed(0))
    direction = 0.05 * direction / direction.norm()
    out = loss_slice(case.model, case.loss_fn, case.batch, direction, OFFSETS)
    for t, value in zip(OFFSETS, out.losses[0].tolist(), strict=True):
        with torch.no_grad():
            exact = float(case.loss_fn(_moved(case.model, t * direction), case.batch))
        assert value == pytest.approx(exact, rel=1e-5)
    d = direction.double()
    form = float(d @ Reference(case, eval_mode=True).hvp(d))
    assert float(out.hessian_form[0, 0]) == pytest.approx(form, rel=1e-3, abs=1e-6 * abs(form))


def test_critical_sharpness_runs_through_the_fused_kernel() -> None:
    case = zoo.gpt2("sdpa")
    forced = ForcedFlash(case.model)
    with _Ops() as ops:
        fused = critical_sharpness(forced, _forced_loss, case.batch, lambda g: g, rtol=1e-3)
    assert FLASH in ops.names
    assert fused.converged
    math = critical_sharpness(case.model, case.loss_fn, case.batch, lambda g: g, rtol=1e-3)
    assert float(fused.value) == pytest.approx(float(math.value), rel=3e-3)
