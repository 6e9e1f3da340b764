"""Per-example gradients: ``vmap`` against the loop over examples that replaces it (issue 10/11).

Where ``torch.func.vmap`` cannot trace a model (Hugging Face attention masks, packed LSTMs,
``.item()``), ``GradientSampler.per_example`` computes the same gradients one example at a
time. This times both on models where ``vmap`` works, so the cost of the fallback is known:
the 2.1k-parameter digits MLP of ``common.py`` (batch 64), a tiny GPT-2 from
``transformers`` (2 layers, width 32, 8 tokens, batch 16) and a 2-layer LSTM language model
(Lightning's ``SimpleLSTM``, width 32, 8 tokens, batch 16; vmap has no batching rule for
``mkldnn_rnn_layer`` and runs its own loop). Each row: the minimum over repeats of the time
to turn the batch into per-example gradient sums (``gradient_sums`` internals: sampler and
``GradientSums.add``), in seconds, one intra-op thread, and the loop's time over vmap's.

    python benchmarks/bench_per_example_loop.py --repeats 5  # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import digits, head, load_average, machine, make_mlp, summary
from torch import nn

from lightning_curvature.functional.gradient_statistics import GradientSums
from lightning_curvature.functional.parameters import ParameterLayout, select_parameters
from lightning_curvature.functional.per_example import GradientSampler
from lightning_curvature.functional.probe import probe_context

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


def lstm_case() -> Case:
    from lightning.pytorch.demos import SimpleLSTM

    torch.manual_seed(0)
    model = SimpleLSTM(vocab_size=64, ninp=32, nhid=32, nlayers=2, dropout=0.0)
    ids = torch.randint(0, 64, (16, 9), generator=torch.Generator().manual_seed(1))

    def loss_fn(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        out, _ = m(b[:, :-1], m.init_hidden(b.shape[0]))
        return F.nll_loss(out, b[:, 1:].reshape(-1))

    return model, loss_fn, ids


def per_example_sums(case: Case, loop: bool, chunk: int) -> tuple[float, GradientSums]:
    model, loss_fn, batch = case
    named = select_parameters(model)
    size = ParameterLayout.from_named(named).size
    started = time.perf_counter()
    with probe_context(model):
        sampler = GradientSampler(model, loss_fn, named)
        if loop:
            sampler.vmap_error = RuntimeError("benchmark: the loop over examples")
        sums = GradientSums.zeros(size, dtype=sampler.dtype)
        for grads, sample_size in sampler.per_example(batch, chunk):
            sums.add(grads, sample_size)
    return time.perf_counter() - started, sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load, started = load_average(), time.perf_counter()
    print(machine("transformers"))
    cases = {"digits MLP": mlp_case, "GPT-2 (sdpa)": gpt2_case, "SimpleLSTM": lstm_case}
    print(f"{'model':<14} {'params':>7} {'batch':>5} {'vmap s':>8} {'loop s':>8} {'loop/vmap':>9}")
    for name, build in cases.items():
        case = build()
        times: dict[bool, list[float]] = {False: [], True: []}
        results = {}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for loop in (False, True):
                seconds, results[loop] = per_example_sums(case, loop, args.chunk)
                times[loop].append(seconds)
        assert results[False].num_samples == results[True].num_samples
        torch.testing.assert_close(results[False].sum, results[True].sum, rtol=1e-4, atol=1e-6)
        vmap_s, loop_s = min(times[False]), min(times[True])
        params = results[False].size
        samples = results[False].num_samples
        print(
            f"{name:<14} {params:>7} {samples:>5} {vmap_s:>8.4f} {loop_s:>8.4f} "
            f"{loop_s / vmap_s:>8.2f}x"
        )
    print(summary(started, load))


if __name__ == "__main__":
    main()
