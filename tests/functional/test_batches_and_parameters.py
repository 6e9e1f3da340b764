"""One batch or many, on the model's device; which parameters are measured, and their layout."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature.functional.model.batches import (
    BatchList,
    batch_size,
    move_to_device,
    split_batches,
)
from lightning_curvature.functional.model.parameters import (
    ParameterLayout,
    layer_blocks,
    layer_parameters,
    select_parameters,
)
from lightning_curvature.functional.operator.hvp import hessian_vector_product
from lightning_curvature.functional.operator.operator import HessianOperator
from tests.functional.cases import CASES_BY_NAME, FrozenAndTied, reference

CPU = torch.device("cpu")
META = torch.device("meta")
Pair = namedtuple("Pair", ["x", "y"])


def _data(n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return torch.randn(n, 3, generator=generator), torch.randint(0, 2, (n,), generator=generator)


@pytest.mark.parametrize(
    "batch",
    [
        _data()[0],
        _data(),
        list(_data()),
        {"x": _data()[0], "y": _data()[1]},
        Pair(*_data()),
    ],
    ids=["tensor", "tuple", "list_of_tensors", "dict", "namedtuple"],
)
def test_one_batch(batch: Any) -> None:
    probe = split_batches(batch, CPU)
    assert len(probe.batches) == 1
    assert probe.weights == (1.0,)
    assert batch_size(probe.batches[0]) == 7
    assert type(probe.batches[0]) is type(batch)


def _several() -> dict[str, Any]:
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    return {
        "list_of_tuples": [(x[:3], y[:3]), (x[3:], y[3:])],
        "list_of_dicts": [{"x": x[:2], "y": y[:2]}, {"x": x[2:], "y": y[2:]}],
        "batch_list_of_tensors": BatchList([x[:4], x[4:]]),
        "generator": ((x[i : i + 2], y[i : i + 2]) for i in range(0, 7, 2)),
        "dataloader": loader,
    }


@pytest.mark.parametrize("kind", list(_several()))
def test_several_batches_weighted_by_size(kind: str) -> None:
    batches = _several()[kind]
    probe = split_batches(batches, CPU)
    sizes = [batch_size(b) for b in probe.batches]
    assert len(sizes) > 1
    assert sum(sizes) == 7
    assert probe.weights == pytest.approx([s / 7 for s in sizes])
    assert sum(probe.weights) == pytest.approx(1.0)


def test_batches_of_unknown_size_weigh_the_same() -> None:
    probe = split_batches([{"scale": 2.0}, {"scale": 3.0}, {"scale": 4.0}], CPU)
    assert probe.weights == pytest.approx([1 / 3] * 3)
    assert [batch_size(b) for b in probe.batches] == [None, None, None]
    assert batch_size({"scale": 2.0}) is None
    assert batch_size(torch.tensor(3.0)) is None


def _concatenated_cases() -> list[tuple[str, Any]]:
    tanh_x, tanh_y = CASES_BY_NAME["mlp_tanh"].build()[2]
    gelu = CASES_BY_NAME["mlp_gelu"].build()[2]
    squares_x, squares_y = CASES_BY_NAME["half_least_squares"].build()[2]
    return [
        ("mlp_tanh", [(tanh_x[:3], tanh_y[:3]), (tanh_x[3:], tanh_y[3:])]),
        ("mlp_tanh", DataLoader(TensorDataset(tanh_x, tanh_y), batch_size=3)),
        ("mlp_gelu", [{k: v[:5] for k, v in gelu.items()}, {k: v[5:] for k, v in gelu.items()}]),
        (
            "half_least_squares",
            BatchList([[squares_x[:7], squares_y[:7]], [squares_x[7:], squares_y[7:]]]),
        ),
    ]


@pytest.mark.parametrize(
    ("name", "batches"), _concatenated_cases(), ids=["tuples", "loader", "dicts", "lists"]
)
def test_operator_of_several_batches_is_the_hessian_of_their_union(name: str, batches: Any) -> None:
    """Uneven splits of a case's batch give exactly the Hessian of the whole batch."""
    model, loss_fn, _ = CASES_BY_NAME[name].build()
    hessian, _ = reference(name)
    vectors = torch.randn(
        2, hessian.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    for backend in ("retained_graph", "double_backward", "forward_over_reverse"):
        with HessianOperator(model, loss_fn, batches, backend=backend) as operator:
            products = torch.stack([operator.matvec(v) for v in vectors])
        torch.testing.assert_close(products, vectors @ hessian, atol=1e-12, rtol=0)


def test_move_to_device_keeps_structure_and_moves_every_tensor() -> None:
    x, y = _data()
    batch = {"pair": Pair(x, y), "list": [x, (y, 5)], "name": "probe"}
    moved = move_to_device(batch, META)
    assert isinstance(moved["pair"], Pair)
    assert moved["pair"].x.device == META
    assert moved["pair"].y.device == META
    assert moved["list"][0].device == META
    assert moved["list"][1][0].device == META
    assert moved["list"][1][1] == 5
    assert moved["name"] == "probe"
    assert moved["pair"].x.shape == x.shape


def test_split_batches_moves_to_the_given_device() -> None:
    x, y = _data()
    probe = split_batches(BatchList([(x[:3], y[:3]), {"x": x[3:], "y": y[3:]}]), META)
    assert probe.batches[0][0].device == META
    assert probe.batches[1]["y"].device == META


def test_operator_moves_batches_to_the_model_device() -> None:
    """The operator hands loss_fn the batch on the device of the model's parameters."""
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    devices = []

    def recording_loss(m: nn.Module, b: Any) -> torch.Tensor:
        devices.extend(t.device for t in b)
        return loss_fn(m, b)

    with HessianOperator(model, recording_loss, batch) as operator:
        assert operator.device == next(model.parameters()).device
    assert devices
    assert all(d == operator.device for d in devices)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_batch_with_cuda_model() -> None:
    model, loss_fn, batch = CASES_BY_NAME["mlp_tanh"].build()
    hessian, _ = reference("mlp_tanh")
    vector = torch.randn(hessian.shape[0], dtype=torch.float64)
    product = hessian_vector_product(model.cuda(), loss_fn, batch, vector.cuda())
    assert product.device.type == "cuda"
    torch.testing.assert_close(product.cpu(), hessian @ vector, atol=1e-10, rtol=0)


def test_select_parameters_trainable_shared_once_frozen_left_out() -> None:
    model = FrozenAndTied()
    names = [name for name, _ in select_parameters(model)]
    assert names == ["encode.weight", "head.weight", "head.bias"]  # decode.weight is encode's
    assert [name for name, _ in select_parameters(model, "head.*")] == ["head.weight", "head.bias"]
    assert [name for name, _ in select_parameters(model, ["*.bias", "encode.*"])] == [
        "encode.weight",
        "head.bias",
    ]


def test_layout_split_flatten_and_groups() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    layout = ParameterLayout.from_named(select_parameters(model))
    assert layout.size == sum(p.numel() for p in model.parameters()) == 11
    flat = torch.arange(11.0)
    pieces = layout.split(flat)
    assert [p.shape for p in pieces] == [p.shape for p in model.parameters()]
    assert torch.equal(layout.flatten(pieces), flat)
    assert layout.groups(True) == {
        "0": [slice(0, 6), slice(6, 8)],
        "2": [slice(8, 10), slice(10, 11)],
    }
    assert layout.groups(["*.bias"]) == {"*.bias": [slice(6, 8), slice(10, 11)]}


# -- per_layer: the one grammar of blocks ---------------------------------------------------------
def test_layer_blocks_reads_every_form_of_per_layer() -> None:
    assert layer_blocks(False) == layer_blocks(None) == layer_blocks([]) == {}
    assert layer_blocks(True) is True
    assert layer_blocks(("a.*", "b")) == {"a.*": ("a.*",), "b": ("b",)}
    assert layer_blocks({"x": "a.*", "y": ["b", "c.*"]}) == {"x": ("a.*",), "y": ("b", "c.*")}


@pytest.mark.parametrize(
    "per_layer",
    ["a.*", 3, [1], ["a", None], {"x": []}, {"x": 2}, {"x": ["a", 3]}, {4: "a"}, {"x": [["a"]]}],
    ids=repr,
)
def test_layer_blocks_refuses_anything_else_naming_the_grammar(per_layer: Any) -> None:
    with pytest.raises(ValueError, match="`per_layer` must be a bool or glob patterns") as raised:
        layer_blocks(per_layer)
    assert f"got {per_layer!r}" in str(raised.value)
    if isinstance(per_layer, str):
        assert "one pattern goes in a list: ['a.*']" in str(raised.value)


def test_layer_parameters_resolves_blocks_among_the_measured_names() -> None:
    names = ["enc.0.weight", "enc.0.bias", "enc.1.weight", "head.weight"]
    blocks = layer_parameters({"enc": "enc.*", "w": ["head.*", "*.weight"]}, names)
    # each block in the measured order, a parameter that two patterns match once
    assert blocks == {"enc": names[:3], "w": ["enc.0.weight", "enc.1.weight", "head.weight"]}
    assert layer_parameters(True, names) == {
        "enc.0": ["enc.0.weight", "enc.0.bias"],
        "enc.1": ["enc.1.weight"],
        "head": ["head.weight"],
    }
    with pytest.raises(ValueError, match=r"`per_layer` pattern 'dec\.\*' matches none"):
        layer_parameters({"enc": "enc.*", "dec": ["dec.*"]}, names)
