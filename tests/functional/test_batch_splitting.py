"""The "one batch or several" rule on what DataLoaders really yield (``default_collate``).

A batch a loader yields must always be one batch, whatever its samples hold (strings,
dicts, nested tuples); a list of such batches, as ``list(loader)`` gives it, several.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, default_collate

from lightning_curvature.functional import hessian_trace
from lightning_curvature.functional.model.batches import BatchList, batch_size, split_batches

CPU = torch.device("cpu")
Sample = namedtuple("Sample", ["x", "y"])
N = 6


def _samples(kind: str) -> list[Any]:
    generator = torch.Generator().manual_seed(0)
    out: list[Any] = []
    for i in range(N):
        ids = torch.randint(0, 10, (5,), generator=generator)
        x = torch.randn(3, generator=generator)
        out.append(
            {
                "ids_mask_label_text": (ids, torch.ones(5, dtype=torch.long), i % 2, f"text {i}"),
                "tensor_and_text": (x, f"text {i}"),
                "tensor_and_dict": (x, {"label": i % 2, "weight": 1.0}),
                "nested_tuple": ((x, 2 * x), i % 2),
                "inputs_and_targets_dicts": ({"x": x}, {"y": float(i)}),
                "pairs_of_different_rank": ((x, x[:2]), (i % 2, float(i))),
                "tensor_and_tokens": (x, ["a", "b", str(i)]),
                "namedtuple": Sample(x, i % 2),
                "dict": {"x": x, "y": i % 2, "name": f"n{i}"},
            }[kind]
        )
    return out


ONE_BATCH_KINDS = [
    "ids_mask_label_text",
    "tensor_and_text",
    "tensor_and_dict",
    "nested_tuple",
    "inputs_and_targets_dicts",
    "pairs_of_different_rank",
    "tensor_and_tokens",
    "namedtuple",
    "dict",
]


@pytest.mark.parametrize("kind", ONE_BATCH_KINDS)
def test_what_default_collate_yields_is_one_batch(kind: str) -> None:
    batch = default_collate(_samples(kind))
    probe = split_batches(batch, CPU)
    assert len(probe.batches) == 1
    assert probe.weights == (1.0,)
    assert batch_size(probe.batches[0]) == N
    assert type(probe.batches[0]) is type(batch)


@pytest.mark.parametrize("kind", ONE_BATCH_KINDS)
def test_list_of_loader_batches_is_several(kind: str) -> None:
    batches = list(DataLoader(_samples(kind), batch_size=4))  # sizes 4 and 2
    probe = split_batches(batches, CPU)
    assert len(probe.batches) == 2
    assert probe.weights == pytest.approx([4 / 6, 2 / 6])
    assert [batch_size(b) for b in probe.batches] == [4, 2]


def test_variable_padding_lengths_are_still_several_batches() -> None:
    batches = [{"ids": torch.zeros(4, 7, dtype=torch.long)}, {"ids": torch.zeros(2, 3).long()}]
    assert len(split_batches(batches, CPU).batches) == 2


@pytest.mark.parametrize(
    "batch",
    [
        [torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 7],  # a plain value among them
        [(torch.zeros(4, 3),), {"x": torch.zeros(4, 3)}],  # items of different structure
        [(torch.zeros(4, 3), torch.zeros(4)), (torch.zeros(4, 3), torch.zeros(4).long())],
        [["a", "b"], ["c", "d"]],  # text only: its fields
    ],
    ids=["plain_value", "different_containers", "different_dtypes", "text_fields"],
)
def test_lists_that_are_not_lists_of_batches(batch: list[Any]) -> None:
    assert len(split_batches(batch, CPU).batches) == 1


def test_the_ambiguous_case_and_its_two_escapes() -> None:
    """Fields that are all containers of one structure read as batches; tuple / BatchList
    say which is meant."""
    batch = default_collate([((torch.ones(3), torch.ones(3)), (torch.ones(3), torch.ones(3)))])
    assert len(split_batches(batch, CPU).batches) == 2
    assert len(split_batches(tuple(batch), CPU).batches) == 1
    assert len(split_batches(BatchList(batch), CPU).batches) == 2


def test_text_batch_reaches_the_loss_whole() -> None:
    """The issue's case: hessian_trace on ``[ids, mask, labels, texts]`` used to split it
    into four batches and fail inside the model; it now equals the exact trace."""
    torch.manual_seed(0)  # the embedding's init and the probes: not the order tests ran in
    embedding = torch.nn.Embedding(10, 2).double()
    samples = _samples("ids_mask_label_text")
    batch = default_collate(samples)
    seen: list[int] = []

    def loss_fn(model: torch.nn.Module, b: Any) -> torch.Tensor:
        ids, mask, labels, texts = b
        seen.append(len(texts))
        logits = (model(ids) * mask.unsqueeze(-1)).sum(1)
        return F.cross_entropy(logits, labels)

    out = hessian_trace(embedding, loss_fn, batch, num_hvps=32)
    assert set(seen) == {N}
    weight = embedding.weight.detach().clone().requires_grad_(True)

    def flat_loss(w: torch.Tensor) -> torch.Tensor:
        return loss_fn(lambda ids: F.embedding(ids, w.view(10, 2)), batch)  # type: ignore[arg-type]

    exact = torch.autograd.functional.hessian(flat_loss, weight.reshape(-1)).trace()
    assert abs(float(out.estimate) - float(exact)) <= 3 * float(out.std_error) + 1e-12
