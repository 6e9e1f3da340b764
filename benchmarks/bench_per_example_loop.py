"""Per-example gradients: ``vmap`` against the loop over examples that replaces it (issue 10/11).

Where ``torch.func.vmap`` cannot trace a model (Hugging Face attention masks, packed LSTMs,
``.item()``), ``GradientSampler.per_example`` computes the same gradients one example at a
time. This times, per model: ``vmap`` (where it runs), the loop, and the old fallback
(gradients of micro-batches of 8, which changed what the statistics mean), on the
2.1k-parameter digits MLP of ``common.py`` (batch 64), a tiny GPT-2 from ``transformers``
(2 layers, width 32, 8 tokens, batch 16), a tiny ``BertModel`` with a padding mask (same
sizes; vmap fails on it) and a 2-layer LSTM language model (Lightning's ``SimpleLSTM``,
width 32, 8 tokens, batch 16; vmap has no batching rule for ``mkldnn_rnn_layer`` and runs
its own loop). Each entry: the minimum over repeats of the seconds to turn the batch into
gradient sums (sampler and ``GradientSums.add``), one intra-op thread.

    python benchmarks/bench_per_example_loop.py --repeats 5  # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import digits, head, load_average, machine, make_mlp, summary
from torch import nn

from lightning_curvature.functional.gradients.accumulator import GradientSums
from lightning_curvature.functional.gradients.per_example import GradientSampler
from lightning_curvature.functional.model.parameters import ParameterLayout, select_parameters
from lightning_curvature.functional.model.probe import probe_context

Case = tuple[nn.Module, Callable[[nn.Module, Any], torch.Tensor], Any]


def mlp_case() -> Case:
    x, y = head(digits(), 64)
    return make_mlp(), lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y)


def gpt2_case() -> Case:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(1))
    model = transformers.GPT2LMHeadModel(config)
    return model, lambda m, b: m(input_ids=b, labels=b).loss, ids


def bert_case() -> Case:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[::2, 5:] = 0

    def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return m(input_ids=b[0], attention_mask=b[1]).pooler_output.pow(2).mean()

    return transformers.BertModel(config), loss_fn, (ids, mask)


def lstm_case() -> Case:
    from lightning.pytorch.demos import SimpleLSTM

    torch.manual_seed(0)
    model = SimpleLSTM(vocab_size=64, ninp=32, nhid=32, nlayers=2, dropout=0.0)
    ids = torch.randint(0, 64, (16, 9), generator=torch.Generator().manual_seed(1))

    def loss_fn(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        out, _ = m(b[:, :-1], m.init_hidden(b.shape[0]))
        return F.nll_loss(out, b[:, 1:].reshape(-1))

    return model, loss_fn, ids


def timed_sums(case: Case, how: str, chunk: int) -> tuple[float, GradientSums]:
    """Seconds to sum the batch's gradient samples ``how``: vmap, loop or micro-batches of 8."""
    model, loss_fn, batch = case
    named = select_parameters(model)
    size = ParameterLayout.from_named(named).size
    started = time.perf_counter()
    with probe_context(model):
        sampler = GradientSampler(model, loss_fn, named)
        if how == "loop":
            sampler.vmap_error = RuntimeError("benchmark: the loop over examples")
        samples = (
            sampler.micro_batches(batch, 8) if how == "mb8" else sampler.per_example(batch, chunk)
        )
        sums = GradientSums.zeros(size, dtype=sampler.dtype)
        for grads, sample_size in samples:
            sums.add(grads, sample_size)
    if how == "vmap" and sampler.vmap_error is not None:
        return math.nan, sums
    return time.perf_counter() - started, sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load, started = load_average(), time.perf_counter()
    print(machine("transformers"))
    cases = {
        "digits MLP": mlp_case,
        "GPT-2 (sdpa)": gpt2_case,
        "BERT + mask": bert_case,
        "SimpleLSTM": lstm_case,
    }
    ways = ("vmap", "loop", "mb8")
    header = ("model", "params", "batch", "vmap s", "loop s", "mb8 s", "loop/vmap")
    print(f"{header[0]:<13}" + "".join(f" {h:>8}" for h in header[1:]))
    for name, build in cases.items():
        case = build()
        times: dict[str, list[float]] = {how: [] for how in ways}
        results = {}
        for _ in range(args.repeats):  # interleaved, so drift hits every way alike
            for how in ways:
                seconds, results[how] = timed_sums(case, how, args.chunk)
                times[how].append(seconds)
        assert results["vmap"].num_samples == results["loop"].num_samples
        torch.testing.assert_close(results["vmap"].sum, results["loop"].sum, rtol=1e-4, atol=1e-6)
        best = {how: min(times[how]) for how in ways}
        params, samples = results["loop"].size, results["loop"].num_samples
        print(
            f"{name:<13} {params:>8} {samples:>8} {best['vmap']:>8.4f} {best['loop']:>8.4f} "
            f"{best['mb8']:>8.4f} {best['loop'] / best['vmap']:>8.2f}x"
        )
    print("vmap s = nan: vmap cannot trace the model (the loop is what runs).")
    print(summary(started, load))


if __name__ == "__main__":
    main()
