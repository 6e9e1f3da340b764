"""The operator's self-check: what it costs, and how often it cries wolf (issue 21).

Two parts, CPU, float32, one intra-op thread:

* **cost**, on a transformers GPT-2 (``GPT2LMHeadModel`` random-initialised from a config, no
  download; the 23M one of ``bench_hvp_backends.py`` by default, ``--small`` for 2 layers of
  width 256), next-token loss on 2 sequences of 32 tokens: the products of a cold
  ``hessian_eigenvalues`` (``tol=1e-3``), a warm one started from its ``warm_start`` and
  ``hessian_trace`` (8 products), by finite differences (the self-check adds one product,
  the first at half the step) and by the retained graph (none); the time it adds, from its
  parts timed on the model (one product of each backend; the symmetry test: four inner
  products and a copy of a vector of the model's size), each the minimum over
  ``--repeats``. Whole probes with and without the check differ by less than the shared
  machine's noise. The largest discrepancy the check saw, relative to its tolerance, says
  how far from a false alarm the model is.
* **false alarms**, on the smooth zoo of ``tests/zoo`` (transformers GPT-2 eager and sdpa,
  BERT, Llama, Mixtral, litgpt at two sizes, an LSTM): ``hessian_eigenvalues(k=3)``,
  ``hessian_trace(16)`` and ``spectral_density(20 steps)`` with ``--seeds`` start vectors
  each, by finite differences and by ``"auto"`` (the exact retained graph): the number of
  probes the self-check refused (a false alarm: every one of these models is smooth), and
  the largest discrepancy over its tolerance.

    nice -n 10 python benchmarks/bench_self_check.py            # about 15 minutes
    nice -n 10 python benchmarks/bench_self_check.py --small --seeds 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.zoo
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, summary

from lightning_curvature.errors import CurvatureCheckError, CurvatureWarning
from lightning_curvature.functional import hessian_eigenvalues, hessian_trace, spectral_density
from lightning_curvature.functional.linalg.sharded import VectorShards
from lightning_curvature.functional.operator import operator as operator_module
from lightning_curvature.functional.operator.operator import HessianOperator
from lightning_curvature.functional.operator.self_check import ProductCheck

BIG = {"vocab_size": 8192, "n_positions": 64, "n_embd": 512, "n_layer": 6, "n_head": 8}
SMALL = {"vocab_size": 2048, "n_positions": 64, "n_embd": 256, "n_layer": 2, "n_head": 4}
BATCH, LENGTH = 2, 32
ZOO = ["gpt2_eager", "gpt2_sdpa", "bert", "llama", "mixtral", "litgpt", "litgpt_eigsh", "demo_lstm"]


def _gpt2(config: dict[str, int]) -> tuple[torch.nn.Module, torch.Tensor]:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            **config, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"
        )
    ).train()
    ids = torch.randint(
        0, config["vocab_size"], (BATCH, LENGTH), generator=torch.Generator().manual_seed(1)
    )
    return model, ids


def _lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@contextlib.contextmanager
def _largest_seen(found: list[float]) -> Iterator[None]:
    """Record each operator's largest discrepancy over its tolerance when it closes."""
    close = operator_module.HessianOperator.__exit__

    def recording(self: Any, *args: Any) -> None:
        found.append(self._self_check.largest)
        close(self, *args)

    operator_module.HessianOperator.__exit__ = recording  # type: ignore[method-assign]
    try:
        yield
    finally:
        operator_module.HessianOperator.__exit__ = close  # type: ignore[method-assign]


def _gradient_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        torch.autograd.grad(_lm_loss(model, ids), params)
        best = min(best, time.perf_counter() - started)
    return best


def _minimum(function: Callable[[], object], repeats: int) -> float:
    """The least disturbed of ``repeats`` timed calls (the machine is shared)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def _product_seconds(
    model: torch.nn.Module, ids: torch.Tensor, backend: str, repeats: int
) -> float:
    """One product of ``backend`` (after the first, which finite differences take twice)."""
    with HessianOperator(model, _lm_loss, ids, backend=backend) as operator:  # type: ignore[arg-type]
        first, later = torch.randn(operator.size), torch.randn(operator.size)
        operator.matvec(first)
        return _minimum(lambda: operator.matvec(later), repeats)


def cost(config: dict[str, int], repeats: int) -> None:
    """What the self-check adds to a probe, from its parts timed on the model's size.

    Whole probes with and without the check differ by less than the shared machine's noise
    (a 70 s cold probe varied by 50% between runs), so the parts are timed instead, each
    the minimum over ``repeats``: one product of each backend, and the symmetry test on
    vectors of the model's size; the products a probe takes are counted on real probes.
    """
    model, ids = _gpt2(config)
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"\n## Cost on a GPT-2 {config}, batch {BATCH}x{LENGTH}, P = {size:,}\n")
    gradient = _gradient_seconds(model, ids)
    backends = ("finite_difference", "retained_graph")
    product = {backend: _product_seconds(model, ids, backend, repeats) for backend in backends}
    check = ProductCheck(VectorShards.single(size))
    u, hu, v, hv = (torch.randn(size) for _ in range(4))
    check.symmetric(u, hu)
    symmetry = _minimum(lambda: check.symmetric(v, hv), repeats)
    print(
        f"one gradient {gradient:.3f} s; one product: finite differences "
        f"{product['finite_difference']:.3f} s, retained graph {product['retained_graph']:.3f} s;"
        f" the symmetry test {symmetry * 1e3:.0f} ms (min of {repeats})\n",
        flush=True,
    )
    print("| backend | probe | HVPs (the check's) | time the check adds | largest / tolerance |")
    print("|---|---|---|---|---|")
    for backend in backends:
        largest: list[float] = []
        with warnings.catch_warnings(), _largest_seen(largest):
            warnings.simplefilter("ignore", CurvatureWarning)
            cold = hessian_eigenvalues(
                model,
                _lm_loss,
                ids,
                backend=backend,
                return_eigenvectors=True,  # type: ignore[arg-type]
            )
            warm = hessian_eigenvalues(model, _lm_loss, ids, backend=backend, init=cold.warm_start)  # type: ignore[arg-type]
            trace = hessian_trace(model, _lm_loss, ids, num_hvps=8, backend=backend)  # type: ignore[arg-type]
        extra = 1 if backend == "finite_difference" else 0
        probes = (("cold λ₁", cold.num_hvps), ("warm λ₁", warm.num_hvps), ("trace", trace.num_hvps))
        for (name, hvps), seen in zip(probes, largest, strict=True):
            asked = hvps - extra
            added = extra * product[backend] + asked * symmetry
            share = added / (asked * product[backend])
            print(
                f"| {backend} | {name} | {hvps} ({extra}) | +{share:.1%} | {seen:.3f} |", flush=True
            )


def false_alarms(seeds: int) -> None:
    from tests.zoo import zoo

    print(f"\n## False alarms on the smooth zoo ({seeds} seeds per estimator)\n")
    print("| model | P | backend | probes | refused | largest discrepancy / tolerance |")
    print("|---|---|---|---|---|---|")
    builders: dict[str, Callable[[], Any]] = {**zoo.BUILDERS, **_extra_zoo()}
    for name in ZOO:
        case = builders[name]()
        size = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
        for backend in ("finite_difference", "auto"):
            largest: list[float] = []
            refused = probes = 0
            for seed in range(seeds):
                calls = _estimators(case, backend)
                for call in calls:
                    probes += 1
                    with warnings.catch_warnings(), _largest_seen(largest):
                        warnings.simplefilter("ignore", CurvatureWarning)
                        try:
                            call(torch.Generator().manual_seed(seed))
                        except CurvatureCheckError:
                            refused += 1
            print(
                f"| {name} | {size:,} | {backend} | {probes} | {refused} | {max(largest):.3f} |",
                flush=True,
            )


def _estimators(case: Any, backend: str) -> list[Callable[[torch.Generator], Any]]:
    """λ₁…λ₃, the trace (16 products) and the density (20 steps) of ``case``."""
    model, loss_fn, batch = case.model, case.loss_fn, case.batch
    return [
        lambda g: hessian_eigenvalues(model, loss_fn, batch, k=3, backend=backend, generator=g),
        lambda g: hessian_trace(model, loss_fn, batch, num_hvps=16, backend=backend, generator=g),
        lambda g: spectral_density(
            model, loss_fn, batch, num_steps=20, backend=backend, generator=g
        ),
    ]


def _extra_zoo() -> dict[str, Callable[[], Any]]:
    """transformers Llama and Mixtral (eager attention and experts), as tiny as the zoo's."""
    import transformers

    from tests.zoo import zoo

    def llama() -> Any:
        config = transformers.LlamaConfig(
            vocab_size=zoo.VOCAB,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
            attn_implementation="eager",
        )
        with zoo.seeded(11) as generator:
            model = transformers.LlamaForCausalLM(config).train()
            return zoo.ZooCase(model, zoo._hf_lm_loss, zoo._tokens(generator))

    def mixtral() -> Any:
        config = transformers.MixtralConfig(
            vocab_size=zoo.VOCAB,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            attn_implementation="eager",
            experts_implementation="eager",
        )
        with zoo.seeded(12) as generator:
            model = transformers.MixtralForCausalLM(config).train()
            return zoo.ZooCase(model, zoo._hf_lm_loss, zoo._tokens(generator))

    return {"llama": llama, "mixtral": mixtral}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="GPT-2 of 2 layers, width 256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-zoo", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load = time.perf_counter(), load_average()
    print(machine("transformers", "litgpt"))
    if not args.skip_cost:
        cost(SMALL if args.small else BIG, args.repeats)
    if not args.skip_zoo:
        false_alarms(args.seeds)
    print(f"\n{summary(started, load)}")


if __name__ == "__main__":
    main()
