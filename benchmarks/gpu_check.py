"""The CUDA figures of issue 23 in one run of under 8 minutes, for a lent GPU.

On a GPU (``--device cuda``, the default) this measures, on transformers GPT-2 models built
from a config (no download: 23M parameters, 6 layers of width 512, and the 124M GPT-2, 12
layers of width 768; next-token loss on 8 sequences of 256 tokens; SDPA attention, whose
flash kernel runs in bf16):

1. **products**: per backend, one Hessian-vector product's time over one gradient's
   (medians of interleaved repeats, ``torch.cuda.synchronize`` around each), in float32 and
   under bf16 autocast (the loss computed as ``bf16-mixed`` training computes it), and the
   operator's set-up; the error of each product against ``double_backward``'s in float32;
2. **batched products**: 8 products through one backward of the retained gradient graph
   (``is_grads_batched``) against 8 single ones, time and peak memory;
3. **probe memory**: peak CUDA memory of a default ``hessian_eigenvalues`` (k=1) and of a
   16-product ``hessian_trace``, in multiples of a gradient's increment;
4. **in-loop overhead**: a Lightning fit of the 23M model (bf16-mixed, AdamW, 120 steps)
   without monitors and with each monitor probing every 30 steps: wall time over the plain
   fit.

It prints a markdown table per part (for ``benchmarks/README.md``) and writes them to
``--out``. ``--quick`` runs a tiny GPT-2 on the CPU in a minute, to check the script itself
where no GPU is lent::

    python benchmarks/gpu_check.py --out gpu_check.md            # on the GPU, < 8 min
    python benchmarks/gpu_check.py --quick --device cpu          # the script's own check
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("retained_graph", "double_backward", "forward_over_reverse", "finite_difference")
MODELS = {
    "GPT-2 23M": {"vocab_size": 8192, "n_embd": 512, "n_layer": 6, "n_head": 8},
    "GPT-2 124M": {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12},
}
TINY = {"GPT-2 tiny": {"vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 2}}
Loss = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def build(
    config: dict[str, int], length: int, batch: int, device: torch.device
) -> tuple[nn.Module, torch.Tensor]:
    """A GPT-2 random-initialised from ``config`` and a batch of random token ids."""
    import transformers

    transformers.logging.set_verbosity_error()
    gpt = transformers.GPT2Config(
        **config, n_positions=length, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt).to(device)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config["vocab_size"], (batch, length), generator=generator)
    return model, ids.to(device)


def next_token_loss(autocast: bool) -> Loss:
    """The next-token loss, under bf16 autocast where ``autocast`` (as bf16-mixed trains)."""

    def loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        device = ids.device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits[:, :-1]
        flat = logits.float().reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, ids[:, 1:].reshape(-1))

    return loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(call: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def peak(device: torch.device) -> Iterator[dict[str, float]]:
    """The peak memory above the start, in bytes, under ``found["bytes"]`` (CUDA only)."""
    found = {"bytes": float("nan")}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    yield found
    if device.type == "cuda":
        sync(device)
        found["bytes"] = float(torch.cuda.max_memory_allocated(device) - before)


def gradient(model: nn.Module, loss: Loss, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss(model, ids), params)


def products(name: str, model: nn.Module, ids: torch.Tensor, repeats: int) -> list[str]:
    """Part 1: each backend's product over a gradient, float32 and bf16 autocast."""
    from lightning_curvature.functional.operator.operator import HessianOperator

    device = ids.device
    size = sum(p.numel() for p in model.parameters())
    vector = torch.randn(size, generator=torch.Generator().manual_seed(2)).to(device)
    rows = []
    for autocast in (False, True):
        loss = next_token_loss(autocast)
        reference = None
        for backend in BACKENDS:
            try:
                setup_start = time.perf_counter()
                with (
                    warnings.catch_warnings(),
                    HessianOperator(
                        model,
                        loss,
                        ids,
                        backend=backend,  # type: ignore[arg-type]
                    ) as operator,
                ):
                    warnings.simplefilter("ignore")
                    setup = time.perf_counter() - setup_start
                    product = operator.matvec(vector)
                    ratios = []
                    for _ in range(repeats):  # interleaved: both see the same clocks
                        hvp = seconds(lambda: operator.matvec(vector), device)
                        grad = seconds(lambda: gradient(model, loss, ids), device)  # noqa: B023
                        ratios.append((hvp, grad))
            except Exception as err:  # a backend that cannot run here says why
                rows.append(f"| {name} | {'bf16' if autocast else 'fp32'} | {backend} | "
                            f"{type(err).__name__}: {str(err)[:60]} | | | |")  # fmt: skip
                continue
            if backend == "double_backward" and not autocast:
                reference = product
            hvp = statistics.median(r[0] for r in ratios)
            grad = statistics.median(r[1] for r in ratios)
            error = "" if reference is None or autocast else (
                f"{float((product - reference).norm() / reference.norm()):.1e}"
            )  # fmt: skip
            rows.append(
                f"| {name} | {'bf16' if autocast else 'fp32'} | {backend} | {hvp * 1e3:.1f} | "
                f"{grad * 1e3:.1f} | {hvp / grad:.2f} | {setup * 1e3:.0f} | {error} |"
            )
    return rows


def batched(name: str, model: nn.Module, ids: torch.Tensor, count: int = 8) -> list[str]:
    """Part 2: ``count`` products through one backward against ``count`` single ones."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = ids.device
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no second derivative
        loss = next_token_loss(False)(model, ids)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vectors = [torch.randn((count, *p.shape), device=device) for p in params]

    def dot(i: int) -> torch.Tensor:
        """gᵀv_i, whose gradient is H v_i."""
        return torch.stack([(g * v[i]).sum() for g, v in zip(grads, vectors, strict=True)]).sum()

    def single() -> None:
        for i in range(count):
            torch.autograd.grad(dot(i), params, retain_graph=True)

    def together() -> None:
        dots = torch.stack([dot(i) for i in range(count)])
        torch.autograd.grad(dots, params, torch.eye(count, device=device), retain_graph=True,
                            is_grads_batched=True)  # fmt: skip

    rows = []
    for label, call in (("one at a time", single), ("one batched backward", together)):
        call()  # warm-up
        with peak(device) as used:
            took = min(seconds(call, device) for _ in range(3))
        rows.append(f"| {name} | {label} | {count} | {took * 1e3:.1f} | "
                    f"{used['bytes'] / 2**20:.0f} |")  # fmt: skip
    return rows


def memory(name: str, model: nn.Module, ids: torch.Tensor) -> list[str]:
    """Part 3: a default λ₁ probe and a 16-product trace over a gradient's increment."""
    from lightning_curvature import hessian_eigenvalues, hessian_trace

    device = ids.device
    loss = next_token_loss(False)
    with peak(device) as unit:
        gradient(model, loss, ids)
    rows = []
    calls: dict[str, Callable[[], Any]] = {
        "λ₁ (k=1, defaults)": lambda: hessian_eigenvalues(model, loss, ids),
        "trace (16 products)": lambda: hessian_trace(model, loss, ids, num_hvps=16),
    }
    for label, call in calls.items():
        with warnings.catch_warnings(), peak(device) as used:
            warnings.simplefilter("ignore")
            took = seconds(call, device)
        rows.append(f"| {name} | {label} | {used['bytes'] / 2**20:.0f} | "
                    f"{used['bytes'] / unit['bytes']:.1f}x | {took:.2f} |")  # fmt: skip
    return rows


def in_loop(config: dict[str, int], length: int, batch: int, device: torch.device,
            steps: int) -> list[str]:  # fmt: skip
    """Part 4: a bf16-mixed fit with each monitor against the plain fit."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_curvature as lc

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, _ = build(config, length, 1, torch.device("cpu"))

        def training_step(self, ids: Any, batch_idx: int) -> torch.Tensor:
            return next_token_loss(False)(self.model, ids[0])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    generator = torch.Generator().manual_seed(3)
    data = torch.randint(0, config["vocab_size"], (steps * batch, length), generator=generator)
    every = max(steps // 4, 1)
    monitors: dict[str, Callable[[], list[pl.Callback]]] = {
        "none": list,
        "HessianEigenvalueMonitor": lambda: [lc.HessianEigenvalueMonitor(every_n_steps=every)],
        "HessianTraceMonitor": lambda: [lc.HessianTraceMonitor(every_n_steps=every)],
        "SpectralDensityMonitor": lambda: [lc.SpectralDensityMonitor(every_n_steps=every)],
        "GradientCoherenceMonitor": lambda: [lc.GradientCoherenceMonitor(every_n_steps=every)],
        "BatchSharpnessMonitor": lambda: [lc.BatchSharpnessMonitor(every_n_steps=every)],
    }
    walls = {}
    for label, callbacks in monitors.items():
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
            precision="bf16-mixed", max_steps=steps, callbacks=callbacks(), logger=pl.loggers
            .CSVLogger("/tmp/gpu_check_logs", name=label), enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        )  # fmt: skip
        loader = DataLoader(TensorDataset(data), batch_size=batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            walls[label] = seconds(lambda: trainer.fit(Module(), loader), device)  # noqa: B023
    base = walls["none"]
    return [f"| {label} | {wall:.1f} | {wall / base - 1:+.1%} |" for label, wall in walls.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny GPT-2 (checks the script)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    models, length, batch, steps = (TINY, 16, 2, 8) if args.quick else (MODELS, 256, 8, 120)
    started = time.perf_counter()
    lines = [f"Device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
             f"torch {torch.__version__}", ""]  # fmt: skip
    parts: list[tuple[str, str, list[str]]] = [
        ("Products (ms; ratio: product over gradient; error against double_backward)",
         "| model | loss | backend | product | gradient | ratio | set-up | error |", []),
        ("Batched products (8 vectors)", "| model | products | vectors | ms | peak MiB |", []),
        ("Probe memory", "| model | probe | peak MiB | over a gradient's | s |", []),
    ]  # fmt: skip
    for name, config in models.items():
        model, ids = build(config, length, batch, device)
        parts[0][2].extend(products(name, model, ids, args.repeats))
        parts[1][2].extend(batched(name, model, ids))
        parts[2][2].extend(memory(name, model, ids))
        del model, ids
        if device.type == "cuda":
            torch.cuda.empty_cache()
    first = next(iter(models.values()))
    parts.append(("In-loop overhead (bf16-mixed fit, each monitor every steps/4)",
                  "| monitors | wall s | over none |", in_loop(first, length, batch, device,
                                                                 steps)))  # fmt: skip
    for title, header, rows in parts:
        separator = "|" + "---|" * (header.count("|") - 1)
        lines += [f"### {title}", "", header, separator, *rows, ""]
    lines.append(f"{time.perf_counter() - started:.0f} s in all")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()
