"""The one functional-model adapter: its dtype policy, against dense double-backward Hessians.

Every reference here is built independently of the library: the model is copied and cast to
float64 as a whole (``.double()``: every floating parameter and buffer), the batch's floating
tensors too, and the dense Hessian over the measured parameters is assembled column by column
from double-backward products ``∂(∇L·e_j)/∂w``. The probe runs in float32 (any model that is
not all-float64 in its measured parameters) or float64, so the products must match the
reference to float32 or float64 accuracy.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_curvature.functional.coherence import gradient_coherence
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.model.batches import map_tensors
from lightning_curvature.functional.model.functional_model import FunctionalModel
from lightning_curvature.functional.model.parameters import select_parameters
from lightning_curvature.functional.operator.operator import HessianOperator

BF16 = torch.bfloat16


# -- the reference ---------------------------------------------------------------------------
def as_float64(model: nn.Module, batch: Any) -> tuple[nn.Module, Any]:
    twin = copy.deepcopy(model).double()
    return twin, map_tensors(batch, lambda t: t.double() if t.is_floating_point() else t)


def dense_hessian(model: nn.Module, loss_fn: Any, batch: Any, names: list[str]) -> torch.Tensor:
    """The float64 Hessian over ``names``, one double-backward product per column."""
    twin, batch64 = as_float64(model, batch)
    for p in twin.parameters():
        p.requires_grad_(False)
    params = dict(twin.named_parameters())
    measured = [params[name].requires_grad_(True) for name in names]
    grads = torch.autograd.grad(loss_fn(twin, batch64), measured, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    columns = []
    for j in range(flat.numel()):
        column = torch.autograd.grad(flat[j], measured, retain_graph=True, allow_unused=True)
        columns.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if c is None else c).reshape(-1)
                    for c, p in zip(column, measured, strict=True)
                ]
            )
        )
    return torch.stack(columns, dim=1)


def vectors(size: int, count: int = 3) -> torch.Tensor:
    return torch.randn(count, size, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def assert_products_match(
    model: nn.Module, loss_fn: Any, batch: Any, parameters: Any, dtype: torch.dtype
) -> torch.Tensor:
    names = [name for name, _ in select_parameters(model, parameters)]
    hessian = dense_hessian(model, loss_fn, batch, names)
    vs = vectors(hessian.shape[0])
    for backend in ("retained_graph", "double_backward", "forward_over_reverse"):
        with HessianOperator(model, loss_fn, batch, parameters=parameters, backend=backend) as op:
            assert (op.dtype, op.size) == (dtype, hessian.shape[0])
            products = torch.stack([op.matvec(v) for v in vs]).double()
        expected = vs @ hessian.T
        scale = expected.abs().max().item()
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(products, expected, rtol=0, atol=tol * scale)
    return hessian


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def classification(n: int = 8, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(n, 4, generator=generator).to(dtype), torch.randint(0, 3, (n,))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


# -- models ----------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update, as PEFT writes it.

    The update runs in the adapters' dtype (``x.to(lora_a.weight.dtype)``), its result is
    cast back to the base's.
    """

    def __init__(self, base: nn.Linear, rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False).to(dtype)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False).to(dtype)
        nn.init.normal_(self.lora_b.weight)  # PEFT starts at zero; any point will do here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        update = self.lora_b(self.lora_a(x.to(self.lora_a.weight.dtype)))
        return result + 0.5 * update.to(result.dtype)


def lora_mlp(base_dtype: torch.dtype, adapter_dtype: torch.dtype) -> nn.Module:
    base = mlp().to(base_dtype).requires_grad_(False)
    torch.manual_seed(1)
    base[0] = LoRALinear(base[0], 2, adapter_dtype)
    base[2] = LoRALinear(base[2], 2, adapter_dtype)
    return base


class BufferWeights(nn.Module):
    """Trainable float32 head on a frozen projection kept as a bf16 *buffer*.

    Its forward casts to the buffer's dtype (``x.to(self.proj.dtype)``), as code that matches
    dtypes to its weights does: outside the probe that layer runs in bf16.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.register_buffer("proj", torch.randn(5, 4).to(BF16))
        self.register_buffer("shift", torch.randn(5).to(BF16))
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(F.linear(x.to(self.proj.dtype), self.proj) + self.shift)
        return self.head(hidden.to(self.head.weight.dtype))


class ComplexFilter(nn.Module):
    """A real model with a complex parameter (a learned spectral filter)."""

    def __init__(self) -> None:
        super().__init__()
        self.filter = nn.Parameter(torch.randn(3, dtype=torch.cfloat))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(x, dim=-1) * self.filter
        return self.head(torch.fft.irfft(spectrum, n=4, dim=-1))


# -- the dtype policy ------------------------------------------------------------------------
def test_bf16_model_measured_on_some_parameters() -> None:
    """parameters="2.*" of a bf16 model: the unmeasured bf16 layer is promoted too."""
    model, batch = mlp().to(BF16), classification(dtype=BF16)
    assert_products_match(model, cross_entropy, batch, "2.*", torch.float32)
    assert all(p.dtype == BF16 and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("adapter_dtype", [BF16, torch.float32, torch.float64])
def test_frozen_bf16_base_with_trainable_adapters(adapter_dtype: torch.dtype) -> None:
    model = lora_mlp(BF16, adapter_dtype)
    batch = classification(dtype=BF16)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["0.lora_a.weight", "0.lora_b.weight", "2.lora_a.weight", "2.lora_b.weight"]
    expected = torch.float64 if adapter_dtype == torch.float64 else torch.float32
    assert_products_match(model, cross_entropy, batch, None, expected)
    assert_products_match(model, cross_entropy, batch, "2.*", expected)


def test_bf16_buffers_are_promoted() -> None:
    model, batch = BufferWeights(), classification()
    assert_products_match(model, cross_entropy, batch, None, torch.float32)
    assert model.proj.dtype == BF16


def test_float64_model_promotes_its_float32_and_bf16_parts() -> None:
    """fp64 adapters on a bf16 base: the probe is float64 and so is everything in it."""
    model = lora_mlp(BF16, torch.float64)
    batch = classification(dtype=torch.float32)
    assert_products_match(model, cross_entropy, batch, None, torch.float64)


def test_wider_frozen_parts_are_not_narrowed() -> None:
    model = mlp()
    model[0].double().requires_grad_(False)
    fm = FunctionalModel(model, cross_entropy, select_parameters(model, "2.*"))
    assert fm.dtype == torch.float32
    assert fm._fixed["model.0.weight"].dtype == torch.float64
    assert fm._fixed["model.0.weight"].data_ptr() == model[0].weight.data_ptr()  # no copy


def test_no_copies_for_a_float32_model() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval()
    named = select_parameters(model, "2.*")
    fm = FunctionalModel(model, cross_entropy, named)
    assert [p.data_ptr() for p in fm.primals] == [p.data_ptr() for _, p in named]
    assert all(not p.requires_grad for p in fm._fixed.values())
    assert {n: t.data_ptr() for n, t in fm._fixed.items()} == {
        f"model.{n}": p.data_ptr() for n, p in model.named_parameters() if not n.startswith("2.")
    }  # frozen: detached aliases; buffers: the module's own (not in the dict)


def test_inputs_are_promoted_and_inference_tensors_cloned() -> None:
    model = mlp().to(BF16)
    fm = FunctionalModel(model, cross_entropy, select_parameters(model))
    with torch.inference_mode():
        x = torch.ones(2, 4, dtype=BF16)
    ids = torch.arange(2)
    out = fm.inputs({"x": x, "ids": ids, "f64": torch.ones(1, dtype=torch.float64)})
    assert (out["x"].dtype, out["x"].is_inference()) == (torch.float32, False)
    assert out["ids"] is ids
    assert out["f64"].dtype == torch.float64


def test_gradient_coherence_on_a_bf16_model_measured_on_some_parameters() -> None:
    model, batch = mlp().to(BF16), classification(n=12, dtype=BF16)
    out = gradient_coherence(model, cross_entropy, batch, parameters="2.*")
    twin, batch64 = as_float64(model, batch)
    head = list(twin[2].parameters())
    rows = []
    for i in range(12):
        piece = (batch64[0][i : i + 1], batch64[1][i : i + 1])
        grads = torch.autograd.grad(cross_entropy(twin, piece), head)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    g = torch.stack(rows)
    coherence = (g.sum(0) @ g.sum(0)) / (g * g).sum()
    assert (out.mode, out.num_samples, out.coherence.dtype) == ("per_example", 12, torch.float32)
    assert out.coherence.item() == pytest.approx(coherence.item(), rel=1e-5)


def test_gradient_coherence_with_frozen_bf16_base_and_adapters() -> None:
    model, batch = lora_mlp(BF16, BF16), classification(n=10, dtype=BF16)
    out = gradient_coherence(model, cross_entropy, batch)
    twin, batch64 = as_float64(model, batch)
    trainable = [p for p in twin.parameters() if p.requires_grad]
    rows = []
    for i in range(10):
        piece = (batch64[0][i : i + 1], batch64[1][i : i + 1])
        grads = torch.autograd.grad(cross_entropy(twin, piece), trainable)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    g = torch.stack(rows)
    assert out.coherence.item() == pytest.approx(
        ((g.sum(0) @ g.sum(0)) / (g * g).sum()).item(), rel=1e-5
    )


# -- complex ---------------------------------------------------------------------------------
def test_complex_parameters_are_refused_up_front_naming_them() -> None:
    model, batch = ComplexFilter(), classification()
    match = r"complex parameters cannot be measured: \['filter'\]"
    with pytest.raises(ValueError, match=match):
        HessianOperator(model, cross_entropy, batch)
    with pytest.raises(ValueError, match=match):
        hessian_eigenvalues(model, cross_entropy, batch)
    with pytest.raises(ValueError, match=match):
        gradient_coherence(model, cross_entropy, batch)


def test_complex_parameters_left_out_and_complex_buffers_are_used_as_they_are() -> None:
    model, batch = ComplexFilter(), classification()
    filter_before = model.filter.detach().clone()
    assert_products_match(model, cross_entropy, batch, "head.*", torch.float32)
    frozen = ComplexFilter()
    frozen.filter.requires_grad_(False)
    assert_products_match(frozen, cross_entropy, batch, None, torch.float32)
    assert torch.equal(model.filter, filter_before)
    assert not math.isnan(gradient_coherence(frozen, cross_entropy, batch).coherence.item())


def test_names_must_be_the_models_own() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"model.named_parameters\(\); not so for \['weight'"):
        FunctionalModel(model, cross_entropy, list(model[2].named_parameters()))
