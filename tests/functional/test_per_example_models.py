"""Per-example gradients on models nobody here wrote, against a brute-force loop.

Hugging Face ``BertModel`` with an attention mask (vmap cannot trace it: ``.item()`` in the
mask handling), ``GPT2LMHeadModel`` with eager and SDPA attention in train mode, and an LSTM
over packed variable-length sequences (vmap cannot batch ``pack_padded_sequence``): all
random-init from configs, no download. Dropout probabilities are 0 in the configs (switching
stochastic layers off inside a probe is the probe context's job). The reference takes one
``torch.autograd.grad`` per example on a float64 copy of the model and computes every
statistic from its definition (:func:`tests.functional.test_gradient_coherence.reference`).
Whatever path the library takes (vmap, or its loop over examples), 16 examples must give 16
samples with the per-example values.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_curvature.functional.coherence import gradient_coherence, gradient_sums
from lightning_curvature.functional.model.batches import map_tensors
from tests.functional.test_gradient_coherence import FIELDS, reference

N = 16
Built = tuple[nn.Module, Callable[[nn.Module, Any], torch.Tensor], Any]


def _transformers() -> Any:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def bert() -> Built:
    transformers = _transformers()
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).train()
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(N, 8, dtype=torch.long)
    mask[::2, 5:] = 0  # every other example is padded after 5 tokens
    batch = {
        "input_ids": torch.randint(0, 40, (N, 8), generator=generator),
        "attention_mask": mask,
        "target": torch.randn(N, generator=generator),
    }

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
        return F.mse_loss(pooled.sum(-1), batch["target"].to(pooled.dtype))

    return model, loss_fn, batch


def gpt2(attention: str) -> Built:
    transformers = _transformers()
    config = transformers.GPT2Config(
        vocab_size=40,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 40, (N, 8), generator=torch.Generator().manual_seed(1))
    return model, lambda m, b: m(input_ids=b, labels=b).loss, ids


class PackedLSTM(nn.Module):
    """An LSTM classifier over padded sequences of different lengths, packed."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.rnn(packed)
        return self.head(hidden[-1])


def packed_lstm() -> Built:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(N, 5, 3, generator=generator),
        torch.randint(1, 6, (N,), generator=generator),
        torch.randint(0, 2, (N,), generator=generator),
    )
    return PackedLSTM().train(), lambda m, b: F.cross_entropy(m(b[0], b[1]), b[2]), batch


MODELS: dict[str, Callable[[], Built]] = {
    "bert_with_mask": bert,
    "gpt2_eager": lambda: gpt2("eager"),
    "gpt2_sdpa": lambda: gpt2("sdpa"),
    "packed_lstm": packed_lstm,
}
VMAP_FAILS = {"bert_with_mask": "item()", "packed_lstm": "stack expects"}


def as_dtype(model: nn.Module, batch: Any, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    cast = copy.deepcopy(model).to(dtype)
    return cast, map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)


def example(batch: Any, i: int) -> Any:
    return map_tensors(batch, lambda t: t[i : i + 1])


def brute_force(model: nn.Module, loss_fn: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients ``(N, P)`` and the whole batch's gradient, in float64."""
    twin, batch64 = as_dtype(model, batch, torch.float64)
    params = [p for p in twin.parameters() if p.requires_grad]

    def flat_gradient(piece: Any) -> torch.Tensor:
        grads = torch.autograd.grad(loss_fn(twin, piece), params, materialize_grads=True)
        return torch.cat([g.reshape(-1) for g in grads])

    rows = torch.stack([flat_gradient(example(batch64, i)) for i in range(N)])
    return rows, flat_gradient(batch64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_per_example_statistics_match_a_brute_force_loop(name: str, dtype: torch.dtype) -> None:
    model, loss_fn, batch = MODELS[name]()
    model, batch = as_dtype(model, batch, dtype)
    rows, whole = brute_force(model, loss_fn, batch)
    expected = reference(rows, eps=torch.finfo(dtype).eps)

    out = gradient_coherence(model, loss_fn, batch)

    assert (out.mode, out.num_samples, out.sample_size) == ("per_example", N, 1.0)
    if name in VMAP_FAILS:
        assert out.fallback.startswith("a loop over single examples instead of vmap")
        assert VMAP_FAILS[name] in out.fallback
    rtol = 1e-9 if dtype == torch.float64 else 2e-4
    for field in FIELDS:
        # (noise_scale is NaN in both where the unbiased ‖G‖² estimate is not positive)
        assert getattr(out, field).item() == pytest.approx(
            expected[field], rel=rtol, nan_ok=True
        ), field
    # The examples were cut right (masks and lengths with their example): Σ g_i / N is the
    # gradient of the whole batch, as the loss is a mean over examples.
    sums = gradient_sums(model, loss_fn, batch)
    assert sums.sum is not None
    scale = whole.abs().max().item()
    atol = (1e-12 if dtype == torch.float64 else 1e-5) * scale
    torch.testing.assert_close(sums.sum.double() / N, whole, rtol=0, atol=atol)


def test_model_is_untouched_and_training_mode_kept() -> None:
    model, loss_fn, batch = bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    gradient_coherence(model, loss_fn, batch)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


def test_hvp_of_a_bf16_bert_equals_float64_double_backward() -> None:
    """Every parameter, buffer and input of a bf16 BertModel promoted: the probe is float32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lightning_curvature.functional.operator.operator import HessianOperator

    model, loss_fn, batch = bert()
    model, batch = as_dtype(model, batch, torch.bfloat16)
    twin, batch64 = as_dtype(model, batch, torch.float64)
    params = [p for p in twin.parameters() if p.requires_grad]
    vector = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    sizes = [p.numel() for p in params]
    pieces = [v.view_as(p) for v, p in zip(vector.double().split(sizes), params, strict=True)]
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
        grads = torch.autograd.grad(loss_fn(twin, batch64), params, create_graph=True)
        expected = torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads, params, pieces)])
    with HessianOperator(model, loss_fn, batch) as operator:
        assert operator.dtype == torch.float32
        product = operator.matvec(vector).double()
    scale = expected.abs().max().item()
    torch.testing.assert_close(product, expected, rtol=0, atol=1e-5 * scale)
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in model.parameters())
