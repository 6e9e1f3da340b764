"""Architectures nobody here wrote, random-initialised from tiny configs (no downloads).

Each builder returns a :class:`ZooCase`: a float32 model in train mode (the mode and dtype
the monitors see during training), its loss and a batch, seeded without touching the global
RNG. ``dropout`` is the probability given to every dropout the architecture has (0 for the
exactness tests, where the probe must see the same function as the reference). A builder
skips the test when its package is missing or cannot be imported.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]
VOCAB, LENGTH, BATCH = 13, 6, 4


@dataclass(frozen=True)
class ZooCase:
    """A model, its loss, a batch of ``BATCH`` examples and the measured parameters."""

    model: nn.Module
    loss_fn: LossFn
    batch: Any
    parameters: list[str] | None = None


def require(module: str) -> ModuleType:
    """Import ``module`` or skip: missing, or unimportable (torchvision's CUDA-built wheel
    raises ``RuntimeError`` against the CPU torch)."""
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError, OSError) as err:
        pytest.skip(f"{module} cannot be imported here: {type(err).__name__}: {err}")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[torch.Generator]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def _tokens(generator: torch.Generator, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, length), generator=generator)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (equal lengths: the mean of the per-example means)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _hf_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return next_token_loss(model(input_ids=ids).logits, ids)


def gpt2(attn_implementation: str = "eager", dropout: float = 0.0) -> ZooCase:
    """transformers GPT-2 LM with tied input/output embeddings: 1,040 parameters."""
    transformers = require("transformers")
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        attn_implementation=attn_implementation,
    )
    with seeded(1) as generator:
        model = transformers.GPT2LMHeadModel(config).train()
        batch = _tokens(generator)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return ZooCase(model, _hf_lm_loss, batch)


def _bert_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"])


def bert(dropout: float = 0.0) -> ZooCase:
    """transformers BERT sequence classifier (sdpa attention, a padded batch): 883 params."""
    transformers = require("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=LENGTH,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with seeded(2) as generator:
        model = transformers.BertForSequenceClassification(config).train()
        mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
        mask[1, 4:] = mask[3, 3:] = 0
        # The pad token only where masked, as a tokenizer pads: torch gives its embedding row
        # (padding_idx) no gradient, so double backward measures the Hessian with that row
        # frozen, while finite differences would move it (they differ where it is unmasked).
        ids = torch.randint(1, VOCAB, (BATCH, LENGTH), generator=generator)
        ids[mask == 0] = config.pad_token_id
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.randint(0, 3, (BATCH,), generator=generator),
        }
    return ZooCase(model, _bert_loss, batch)


def _litgpt_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return next_token_loss(model(ids), ids)


def litgpt_gpt(n_layer: int = 1, n_embd: int = 8, n_head: int = 2, vocab: int = VOCAB) -> ZooCase:
    """A litgpt GPT (rotary, LayerNorm, GPT-NeoX MLP): 1,096 parameters by default."""
    litgpt = require("litgpt")
    config = litgpt.Config(
        block_size=16,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        bias=True,
        rotary_percentage=1.0,
    )
    with seeded(3) as generator:
        model = litgpt.GPT(config).train()
        batch = torch.randint(0, vocab, (BATCH, 16), generator=generator)
    return ZooCase(model, _litgpt_loss, batch)


def demo_transformer_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
    inputs, target = batch
    return F.nll_loss(model(inputs, target), target.reshape(-1))


def demo_transformer(dropout: float = 0.0) -> ZooCase:
    """``lightning.pytorch.demos.Transformer`` (nn.Transformer, encoder and decoder): 565."""
    demos = require("lightning.pytorch.demos")
    with seeded(4) as generator:
        model = demos.Transformer(
            vocab_size=VOCAB, ninp=4, nhead=2, nhid=8, nlayers=1, dropout=dropout
        ).train()
        tokens = _tokens(generator, LENGTH + 1)
    return ZooCase(model, demo_transformer_loss, (tokens[:, :-1], tokens[:, 1:]))


def _demo_lstm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
    inputs, target = batch
    output, _ = model(inputs, model.init_hidden(inputs.shape[0]))  # type: ignore[operator]
    return F.nll_loss(output, target.reshape(-1))


def demo_lstm(dropout: float = 0.0) -> ZooCase:
    """``lightning.pytorch.demos.SimpleLSTM`` (LightningLSTM's network), two layers: 841."""
    demos = require("lightning.pytorch.demos")
    with seeded(5) as generator:
        model = demos.SimpleLSTM(vocab_size=VOCAB, ninp=6, nhid=6, nlayers=2, dropout=dropout)
        tokens = _tokens(generator, LENGTH + 1)
    return ZooCase(model.train(), _demo_lstm_loss, (tokens[:, :-1], tokens[:, 1:]))


def _image_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def timm_vit(drop_path: float = 0.0) -> ZooCase:
    """A timm VisionTransformer with stochastic depth (DropPath)."""
    vision_transformer = require("timm.models.vision_transformer")
    with seeded(6) as generator:
        model = vision_transformer.VisionTransformer(
            img_size=8,
            patch_size=4,
            in_chans=1,
            num_classes=3,
            embed_dim=8,
            depth=1,
            num_heads=2,
            mlp_ratio=2.0,
            drop_path_rate=drop_path,
        ).train()
        batch = (torch.randn(BATCH, 1, 8, 8, generator=generator), torch.arange(BATCH) % 3)
    return ZooCase(model, _image_loss, batch)


def resnet18() -> ZooCase:
    """torchvision's ResNet-18 (train-mode BatchNorm); its head and last BatchNorm measured."""
    models = require("torchvision.models")
    with seeded(7) as generator:
        model = models.resnet18(num_classes=3).train()
        batch = (torch.randn(BATCH, 3, 32, 32, generator=generator), torch.arange(BATCH) % 3)
    return ZooCase(model, _image_loss, batch, parameters=["layer4.1.bn2.*", "fc.*"])


BUILDERS: dict[str, Callable[[], ZooCase]] = {
    "gpt2_eager": lambda: gpt2("eager"),
    "gpt2_sdpa": lambda: gpt2("sdpa"),
    "bert": bert,
    "litgpt": litgpt_gpt,
    "litgpt_eigsh": lambda: litgpt_gpt(n_layer=2, n_embd=16, n_head=2, vocab=32),
    "demo_transformer": demo_transformer,
    "demo_lstm": demo_lstm,
    "timm_vit": timm_vit,
    "torchvision_resnet18": resnet18,
}
