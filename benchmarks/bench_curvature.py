"""lightning_curvature against PyHessian, side by side in one process (issue 2).

On the same model and probe batch:

1. **Top eigenvalue.** PyHessian's power iteration at its defaults (``maxIter=100,
   tol=1e-3``; and at ``tol=1e-4``, which actually reaches 1e-3 accuracy) against our
   Lanczos (``hessian_eigenvalues(tol=1e-3)``) from a random start and warm-started from
   a probe taken 30 SGD steps earlier: from its eigenvector, and from its ``warm_start``
   (the eigenvector and the Ritz vector below it, what the monitor keeps). HVPs, wall time
   (minimum over interleaved repeats of each seed, median over seeds) and the relative
   error to the true top eigenvalue: the dense ``torch.func.hessian`` (float64) for the
   MLP, a float64 Lanczos at ``tol=1e-10`` with an explicitly computed residual for the CNN.
2. **Trace at equal HVP count** on the MLP (exact trace known): Hutchinson against Hutch++
   at 10/40/100 HVPs over many seeds; relative RMSE and coverage of ±2 standard errors.
   PyHessian's ``trace()`` at its defaults for reference.
3. **One HVP / one gradient** for each backend, on both models (minimum over interleaved
   repeats; the spread max/min shows how noisy the machine was).
4. **Peak memory** (``--memory``): extra peak RSS of one top-eigenvalue run over a plain
   gradient, ours against PyHessian, each in a fresh subprocess.

It ends with the issue's targets, each with its measured value and a verdict.

Both tools see the model in eval mode (PyHessian calls ``model.eval()`` itself and leaves
graph-carrying ``.grad`` tensors behind, which are cleared after each of its runs).

    python benchmarks/bench_curvature.py --memory   # about 5 minutes on 2 CPU cores
    python benchmarks/bench_curvature.py --quick    # about 2 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Batch,
    Timings,
    clear_grads,
    dense_hessian,
    digits,
    fmt_range,
    head,
    load_average,
    loss_fn,
    machine,
    make_cnn,
    make_mlp,
    minibatches,
    num_parameters,
    per_call_seconds,
    relative_error,
    summary,
    synthetic_images,
    train_sgd,
    trainable,
)

from lightning_curvature import (
    CurvatureWarning,
    HessianOperator,
    hessian_eigenvalues,
    hessian_trace,
)

GAP_STEPS = 30  # SGD steps between the probe that gives the warm start and the measured one
TRACE_BUDGETS = (10, 40, 100)
BACKENDS = ("retained_graph", "double_backward", "forward_over_reverse")


# -- PyHessian ---------------------------------------------------------------------------
def pyhessian_module():
    """``pyhessian/hessian.py`` (``import pyhessian.hessian`` gives the class, not the module)."""
    return importlib.import_module("pyhessian.hessian")


@contextlib.contextmanager
def count_pyhessian_hvps() -> Iterator[list[int]]:
    """Count calls of PyHessian's ``hessian_vector_product`` (one per HVP) while open."""
    module = pyhessian_module()
    original = module.hessian_vector_product
    counter = [0]

    def counting(*args: object) -> object:
        counter[0] += 1
        return original(*args)

    module.hessian_vector_product = counting
    try:
        yield counter
    finally:
        module.hessian_vector_product = original


def pyhessian_for(model: nn.Module, batch: Batch) -> object:
    """PyHessian's ``hessian`` object on one batch, on the CPU (builds its gradient graph)."""
    return pyhessian_module().hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=False)


# -- problems ----------------------------------------------------------------------------
@dataclass
class Problem:
    """A model at a probe point, the previous probe's ``warm_start`` and the truth."""

    name: str
    model: nn.Module
    batch: Batch
    previous: torch.Tensor
    truth: float
    truth_note: str
    hessian: torch.Tensor | None = None

    @property
    def label(self) -> str:
        """Name, parameter count and batch size."""
        return f"{self.name} (P={num_parameters(self.model):,}, batch {self.batch[0].shape[0]})"


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def previous_probe(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``warm_start`` of a cold ``tol=1e-3`` probe: its eigenvector, then the Ritz vector
    below it (what a monitor keeps between probes)."""
    found = hessian_eigenvalues(
        model, loss_fn, batch, tol=1e-3, return_eigenvectors=True, generator=seeded(999)
    )
    assert found.warm_start is not None
    return found.warm_start


def lanczos_truth(model: nn.Module, batch: Batch, steps: int = 20) -> tuple[float, float]:
    """Top eigenvalue of a float64 copy of ``model`` by Lanczos at ``tol=1e-10``, and its bound.

    At least ``steps`` products (a stopping test cannot see an eigenvalue the Krylov space
    has not found yet; see ``bench_lanczos_stopping.py``). The returned relative bound
    ``min(r, r²/gap)/θ`` uses the residual ``r = ‖Hy − θy‖`` from one extra, explicit product
    and the gap to the second Ritz value.
    """
    model64 = copy.deepcopy(model).to(torch.float64)
    batch64 = (batch[0].to(torch.float64), batch[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)
        found = hessian_eigenvalues(
            model64,
            loss_fn,
            batch64,
            k=2,
            tol=1e-10,
            min_iter=steps,
            max_iter=2 * steps,
            return_eigenvectors=True,
            generator=seeded(12345),
        )
    assert found.eigenvectors is not None
    theta, second = (float(v) for v in found.eigenvalues)
    vector = found.eigenvectors[0]
    with HessianOperator(model64, loss_fn, batch64) as operator:
        residual = float(torch.linalg.vector_norm(operator.matvec(vector) - theta * vector))
    bound = min(residual, residual**2 / max(theta - second - residual, 1e-30))
    return theta, bound / abs(theta)


def prepare(
    name: str, model: nn.Module, data: Batch, probe: Batch, lr: float, warmup: int
) -> tuple[nn.Module, Batch, torch.Tensor]:
    """Train ``warmup`` steps, take the previous probe, train ``GAP_STEPS`` more."""
    stream = minibatches(data, 128, seed=1)
    train_sgd(model, stream, warmup, lr)
    previous = previous_probe(model, probe)
    train_sgd(model, stream, GAP_STEPS, lr)
    loss = float(loss_fn(model, probe).detach())
    print(f"[{name}] trained {warmup}+{GAP_STEPS} SGD steps, probe loss {loss:.3f}", flush=True)
    return model, probe, previous


def cnn_problem() -> Problem:
    """The BatchNorm CNN, trained in train mode and probed in eval mode."""
    data = synthetic_images(4096)
    model, probe, previous = prepare("CNN", make_cnn(), data, head(data, 128), 0.02, 50)
    truth, bound = lanczos_truth(model, probe)
    note = f"float64 Lanczos, ≥ 20 steps, tol=1e-10; explicit-residual error bound {bound:.0e}"
    return Problem("CNN + BatchNorm (eval)", model, probe, previous, truth, note)


def mlp_problem() -> Problem:
    """The tanh MLP on digits, with its dense float64 Hessian."""
    data = digits()
    model, probe, previous = prepare("MLP", make_mlp(), data, head(data, 512), 0.05, 60)
    hessian = dense_hessian(model, probe)
    truth = float(torch.linalg.eigvalsh(hessian)[-1])
    lanczos, _ = lanczos_truth(model, probe)
    note = (
        f"dense torch.func.hessian (float64); the CNN's float64 Lanczos recipe is "
        f"{relative_error(lanczos, truth):.0e} from it"
    )
    return Problem("MLP tanh (digits)", model, probe, previous, truth, note, hessian)


# -- 1. top eigenvalue ---------------------------------------------------------------------
@dataclass
class Run:
    """One top-eigenvalue run."""

    value: float
    hvps: int
    seconds: float
    converged: bool = True


def run_pyhessian(problem: Problem, seed: int, tol: float = 1e-3) -> Run:
    """PyHessian's power iteration (``maxIter=100``), timed from building its graph."""
    torch.manual_seed(seed)  # PyHessian draws its start vector from the global RNG
    with count_pyhessian_hvps() as counter:
        started = time.perf_counter()
        engine = pyhessian_for(problem.model, problem.batch)
        values, _ = engine.eigenvalues(maxIter=100, tol=tol, top_n=1)  # type: ignore[attr-defined]
        seconds = time.perf_counter() - started
    del engine
    clear_grads(problem.model)
    return Run(float(values[0]), counter[0], seconds)


def run_ours(problem: Problem, seed: int, warm: int) -> Run:
    """``hessian_eigenvalues(tol=1e-3)``, cold (``warm=0``) or warm-started from the first
    ``warm`` vectors of the previous probe's ``warm_start``."""
    init = problem.previous[:warm] if warm else None
    started = time.perf_counter()
    found = hessian_eigenvalues(
        problem.model, loss_fn, problem.batch, tol=1e-3, init=init, generator=seeded(seed)
    )
    seconds = time.perf_counter() - started
    return Run(float(found.eigenvalues[0]), found.num_hvps, seconds, bool(found.converged.all()))


EigenMethod = Callable[[Problem, int], Run]


def eigen_methods() -> dict[str, EigenMethod]:
    """The compared methods, by table label."""
    methods: dict[str, EigenMethod] = {
        "PyHessian power iteration, defaults (tol=1e-3)": run_pyhessian,
        "ours: Lanczos tol=1e-3, cold": lambda p, s: run_ours(p, s, warm=0),
        f"ours: Lanczos tol=1e-3, warm from the eigenvector ({GAP_STEPS} steps old)": (
            lambda p, s: run_ours(p, s, warm=1)
        ),
        f"ours: Lanczos tol=1e-3, warm from `warm_start`, k+1 vectors ({GAP_STEPS} steps old)": (
            lambda p, s: run_ours(p, s, warm=2)
        ),
        "PyHessian power iteration, tol=1e-4": lambda p, s: run_pyhessian(p, s, 1e-4),
    }
    return methods


@dataclass
class EigenRow:
    """Aggregated runs of one method on one problem."""

    method: str
    hvps: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per seed: min over repeats
    unconverged: int = 0

    @property
    def time(self) -> float:
        """Median over seeds of the per-seed minimum wall time."""
        return statistics.median(self.seconds)


def eigen_rows(problem: Problem, seeds: int, repeats: int) -> list[EigenRow]:
    """Run every method ``repeats`` times per seed, interleaved and in rotating order."""
    methods = eigen_methods()
    rows = {name: EigenRow(name) for name in methods}
    for seed in range(seeds):
        times = Timings()
        for repeat in range(repeats):
            names = list(methods)
            names = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in names:
                run = methods[name](problem, seed)
                times.add(name, run.seconds)
                if repeat == 0:
                    rows[name].hvps.append(run.hvps)
                    rows[name].errors.append(relative_error(run.value, problem.truth))
                    rows[name].unconverged += not run.converged
        for name in methods:
            rows[name].seconds.append(times.best(name))
    print(f"[{problem.name}] top eigenvalue done", flush=True)
    return list(rows.values())


def eigen_table(problem: Problem, rows: list[EigenRow]) -> str:
    """Markdown rows for one problem."""
    reference = rows[0].time
    lines = []
    for row in rows:
        flag = f" ({row.unconverged} not converged)" if row.unconverged else ""
        within = sum(e <= 1e-3 for e in row.errors)
        lines.append(
            f"| {problem.name} | {row.method}{flag} | {fmt_range(row.hvps)} | "
            f"{row.time:.3f} | {fmt_range(row.errors, '.1e')} | {within}/{len(row.errors)} | "
            f"{reference / row.time:.2f}x |"
        )
    return "\n".join(lines)


# -- 2. trace ------------------------------------------------------------------------------
@dataclass
class TraceRow:
    """Errors of one estimator at one budget over seeds."""

    method: str
    budget: str
    estimates: list[float]
    std_errors: list[float] | None
    hvps: list[int]


def trace_rows(problem: Problem, seeds: int) -> list[TraceRow]:
    """Hutchinson and Hutch++ at each budget, plus PyHessian's ``trace()`` defaults."""
    rows = []
    for budget in TRACE_BUDGETS:
        for method in ("hutchinson", "hutch++"):
            found = [
                hessian_trace(
                    problem.model,
                    loss_fn,
                    problem.batch,
                    num_hvps=budget,
                    method=method,
                    generator=seeded(seed),
                )
                for seed in range(seeds)
            ]
            rows.append(
                TraceRow(
                    method,
                    str(budget),
                    [float(f.estimate) for f in found],
                    [float(f.std_error) for f in found],
                    [f.num_hvps for f in found],
                )
            )
    rows.append(pyhessian_trace_row(problem, seeds))
    print(f"[{problem.name}] trace done", flush=True)
    return rows


def pyhessian_trace_row(problem: Problem, seeds: int) -> TraceRow:
    """PyHessian's Hutchinson with its stopping rule (``maxIter=100, tol=1e-3``)."""
    estimates, hvps = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        engine = pyhessian_for(problem.model, problem.batch)
        samples = engine.trace(maxIter=100, tol=1e-3)  # type: ignore[attr-defined]
        estimates.append(float(statistics.fmean(samples)))
        hvps.append(len(samples))
        del engine
        clear_grads(problem.model)
    return TraceRow("PyHessian trace(), defaults", "its stop", estimates, None, hvps)


def hutchinson_expected_rmse(hessian: torch.Tensor, budget: int) -> float:
    """Relative RMSE of Rademacher Hutchinson: ``sqrt(2(‖H‖_F² − Σ H_ii²)/m) / |tr H|``."""
    off_diagonal = float(hessian.pow(2).sum() - hessian.diagonal().pow(2).sum())
    return (2 * off_diagonal / budget) ** 0.5 / abs(float(hessian.trace()))


def relative_rmse(row: TraceRow, exact: float) -> float:
    """Root-mean-square error of the estimates over seeds, relative to ``|exact|``."""
    errors = torch.tensor(row.estimates, dtype=torch.float64) - exact
    return float(errors.pow(2).mean().sqrt()) / abs(exact)


def coverage(row: TraceRow, exact: float) -> float | None:
    """Share of seeds whose ``estimate ± 2 std_error`` contains ``exact`` (None: no SE)."""
    if row.std_errors is None:
        return None
    errors = (torch.tensor(row.estimates, dtype=torch.float64) - exact).abs()
    return float((errors <= 2 * torch.tensor(row.std_errors, dtype=torch.float64)).double().mean())


def trace_table(problem: Problem, rows: list[TraceRow]) -> str:
    """Markdown rows: relative RMSE, coverage of ±2 SE, and Hutchinson's theory."""
    assert problem.hessian is not None
    exact = float(problem.hessian.trace())
    lines = []
    for row in rows:
        covered = coverage(row, exact)
        shown = "n/a (none reported)" if covered is None else f"{100 * covered:.0f}%"
        theory = "–"
        if row.method == "hutchinson":
            theory = f"{hutchinson_expected_rmse(problem.hessian, int(row.budget)):.3f}"
        lines.append(
            f"| {row.method} | {fmt_range(row.hvps)} | {relative_rmse(row, exact):.3f} | "
            f"{theory} | {shown} |"
        )
    return "\n".join(lines)


# -- 3. HVP / gradient -------------------------------------------------------------------------
def gradient_call(model: nn.Module, batch: Batch) -> Callable[[], object]:
    """One plain gradient: forward, loss, ``torch.autograd.grad`` over the parameters."""
    params = trainable(model)
    return lambda: torch.autograd.grad(loss_fn(model, batch), params)


def functional_gradient_call(problem: Problem) -> Callable[[], object]:
    """Gradient of ``loss_fn`` with parameters passed through ``functional_call``."""
    model, batch = problem.model, problem.batch
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    class _Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: Batch) -> torch.Tensor:
            return loss_fn(self.model, batch)

    wrapped = _Wrapped()

    def call() -> object:
        leaves = {
            f"model.{n}": p.detach().requires_grad_(True) for n, p in model.named_parameters()
        }
        loss = torch.func.functional_call(wrapped, leaves, (batch,))
        return torch.autograd.grad(loss, [leaves[f"model.{n}"] for n in names])

    return call


def measure_backend(problem: Problem, backend: str, calls: int, times: Timings) -> None:
    """Time the operator's setup and one product of ``backend``."""
    vector = torch.randn(num_parameters(problem.model), generator=seeded(0))
    started = time.perf_counter()
    with HessianOperator(problem.model, loss_fn, problem.batch, backend=backend) as operator:
        times.add(f"{backend}: setup (enter the operator)", time.perf_counter() - started)
        times.add(
            f"{backend}: one product", per_call_seconds(lambda: operator.matvec(vector), calls)
        )


def measure_pyhessian_hvp(problem: Problem, calls: int, times: Timings) -> None:
    """Time one product through PyHessian's retained ``.grad`` graph."""
    engine = pyhessian_for(problem.model, problem.batch)
    params, gradients = engine.params, engine.gradsH  # type: ignore[attr-defined]
    vector = [torch.randn(p.shape, generator=seeded(0)) for p in params]
    product = pyhessian_module().hessian_vector_product
    seconds = per_call_seconds(lambda: product(gradients, params, vector), calls)
    times.add("PyHessian: one product", seconds)
    del engine
    clear_grads(problem.model)


def hvp_timings(problem: Problem, repeats: int, calls: int) -> Timings:
    """All HVP and gradient timings of one problem, interleaved over ``repeats``."""
    gradient = gradient_call(problem.model, problem.batch)
    functional = functional_gradient_call(problem)
    tasks: list[Callable[[Timings], None]] = [
        lambda t: t.add("gradient (loss + autograd.grad)", per_call_seconds(gradient, calls)),
        lambda t: t.add("gradient via functional_call", per_call_seconds(functional, calls)),
        lambda t: measure_pyhessian_hvp(problem, calls, t),
    ]
    tasks += [lambda t, b=b: measure_backend(problem, b, calls, t) for b in BACKENDS]
    times = Timings()
    for repeat in range(repeats):
        for task in tasks[repeat % len(tasks) :] + tasks[: repeat % len(tasks)]:
            task(times)
    print(f"[{problem.name}] HVP timings done", flush=True)
    return times


def hvp_table(problem: Problem, times: Timings) -> str:
    """Markdown rows: minimum time per call, ratio to a gradient, spread."""
    base = times.best("gradient (loss + autograd.grad)")
    lines = []
    for label in sorted(times.seconds, key=_hvp_order):
        best = times.best(label)
        lines.append(
            f"| {problem.name} | {label} | {1e3 * best:.1f} | {best / base:.2f}x | "
            f"{times.spread(label):.2f} |"
        )
    return "\n".join(lines)


def _hvp_order(label: str) -> tuple[int, str]:
    order = (
        "gradient (",
        "gradient via",
        "retained_graph: one",
        "retained_graph: setup",
        "double_backward: one",
        "double_backward: setup",
        "forward_over_reverse: one",
        "forward_over_reverse: setup",
        "PyHessian",
    )
    for index, prefix in enumerate(order):
        if label.startswith(prefix):
            return index, label
    return len(order), label


# -- 4. memory (subprocesses) ----------------------------------------------------------------
def peak_rss_mib() -> float:
    """This process' peak RSS in MiB (``VmHWM``: unlike ``ru_maxrss``, not inherited on exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def memory_child(method: str) -> None:
    """In a fresh process: extra peak RSS (MiB) of one top-eigenvalue run over one gradient."""
    model = make_cnn().eval()
    batch = head(synthetic_images(256), 128)
    gradient_call(model, batch)()
    before = peak_rss_mib()
    if method == "pyhessian":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pyhessian_for(model, batch).eigenvalues(maxIter=20, tol=1e-12)  # type: ignore[attr-defined]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CurvatureWarning)
            hessian_eigenvalues(
                model, loss_fn, batch, tol=1e-12, min_iter=20, max_iter=20, backend=method
            )
    after = peak_rss_mib()
    print(json.dumps({"method": method, "extra_mib": after - before}))


def memory_table(threads: int) -> str:
    """Run :func:`memory_child` for PyHessian and each of our backends."""
    lines = []
    for method in ("pyhessian", *BACKENDS):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", method, "--threads", str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        extra = json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]
        name = "PyHessian" if method == "pyhessian" else f"ours, backend={method}"
        lines.append(f"| {name} | {extra:.0f} |")
    print("[memory] done", flush=True)
    return "\n".join(lines)


# -- report --------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds and repeats (~2 min)")
    parser.add_argument("--seeds", type=int, default=5, help="start vectors per method, CNN")
    parser.add_argument("--mlp-seeds", type=int, default=20, help="start vectors, MLP")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per eigen seed")
    parser.add_argument("--hvp-repeats", type=int, default=7, help="interleaved HVP timings")
    parser.add_argument("--trace-seeds", type=int, default=100, help="seeds per trace estimator")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared machine, 2 threads made timings 10-30x noisier)",
    )
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.mlp_seeds, args.repeats, args.hvp_repeats = 2, 5, 2, 5
        args.trace_seeds = 30
    return args


def main() -> None:
    """Run every section and print the markdown tables."""
    args = parse_args()
    # PyHessian builds its graph with loss.backward(create_graph=True); we clear .grad after.
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    started = time.perf_counter()
    load = load_average()
    problems = [mlp_problem(), cnn_problem()]
    mlp, cnn = problems
    mlp_rows = eigen_rows(mlp, args.mlp_seeds, args.repeats)
    cnn_rows = eigen_rows(cnn, args.seeds, args.repeats)
    eigen = [eigen_table(mlp, mlp_rows), eigen_table(cnn, cnn_rows)]
    traces = trace_rows(mlp, args.trace_seeds)
    mlp_times = hvp_timings(mlp, args.hvp_repeats, 20)
    cnn_times = hvp_timings(cnn, args.hvp_repeats, 3)
    hvp = [hvp_table(mlp, mlp_times), hvp_table(cnn, cnn_times)]
    memory = memory_table(args.threads) if args.memory else None
    report(args, problems, eigen, trace_table(mlp, traces), hvp, memory)
    assert mlp.hessian is not None
    print("\n### Targets of issue 2\n")
    print(targets(cnn_rows, traces, float(mlp.hessian.trace()), cnn_times))
    print(f"\n{summary(started, load)}")


def targets(
    cnn_rows: list[EigenRow], traces: list[TraceRow], exact_trace: float, cnn_times: Timings
) -> str:
    """The issue's targets with the measured values (CNN for time, MLP for the trace)."""
    pyhessian, cold, warm, warm_ritz, tight = cnn_rows
    hvp = cnn_times.best("retained_graph: one product")
    grad = cnn_times.best("gradient (loss + autograd.grad)")
    speed_cold, speed_warm = pyhessian.time / cold.time, pyhessian.time / warm.time
    hvp_cut = statistics.median(cold.hvps) / statistics.median(warm.hvps)
    checks = [
        ("CNN: cold Lanczos ≥ 1.7x less wall time than PyHessian", speed_cold, speed_cold >= 1.7),
        ("CNN: warm Lanczos ≥ 3x less wall time than PyHessian", speed_warm, speed_warm >= 3.0),
        ("CNN: warm start cuts HVPs ≥ 1.5x (median cold / median warm)", hvp_cut, hvp_cut >= 1.5),
        ("CNN: retained-graph HVP ≤ 2.2x one gradient", hvp / grad, hvp / grad <= 2.2),
        (
            "(context) CNN: warm from `warm_start` (the monitor's start), speed-up",
            pyhessian.time / warm_ritz.time,
            pyhessian.time / warm_ritz.time >= 3.0,
        ),
        (
            "(context) CNN: warm from `warm_start`, HVP cut",
            statistics.median(cold.hvps) / statistics.median(warm_ritz.hvps),
            statistics.median(cold.hvps) / statistics.median(warm_ritz.hvps) >= 1.5,
        ),
    ]
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [
        f"| {label} | {value:.2f}x | {'yes' if met else 'NO'} |" for label, value, met in checks
    ]
    for row in (cold, warm, warm_ritz):
        accurate = sum(e <= 1e-3 for e in row.errors)
        lines.append(
            f"| (context) {row.method}: runs within 1e-3 of the truth | "
            f"{accurate}/{len(row.errors)} | – |"
        )
    reached = sum(e <= 1e-3 for e in tight.errors)
    for row, kind in ((cold, "cold"), (warm, "warm"), (warm_ritz, "warm from `warm_start`")):
        lines.append(
            f"| (context) CNN: {kind} Lanczos vs PyHessian at tol=1e-4, which reaches 1e-3 in "
            f"{reached}/{len(tight.errors)} runs | {tight.time / row.time:.2f}x | – |"
        )
    for row in traces:
        covered = coverage(row, exact_trace)
        if covered is not None:
            met = "yes" if covered >= 0.9 else "NO"
            lines.append(
                f"| MLP: {row.method} ±2 SE covers the exact trace in ≥ 90% of seeds, "
                f"{row.budget} HVPs | {100 * covered:.0f}% | {met} |"
            )
    return "\n".join(lines)


def report(
    args: argparse.Namespace,
    problems: list[Problem],
    eigen: list[str],
    trace: str,
    hvp: list[str],
    memory: str | None,
) -> None:
    """Print the markdown report."""
    print(f"\nMachine: {machine('lightning', 'PyHessian')}\n")
    for p in problems:
        print(f"- {p.label}: true top eigenvalue {p.truth:.6g} ({p.truth_note})")
    print(
        f"\n### Top eigenvalue ({args.mlp_seeds} (MLP) / {args.seeds} (CNN) seeds × "
        f"{args.repeats} interleaved repeats; HVPs and error: median [min–max] over seeds; "
        "time: median over seeds of the minimum over repeats)\n"
    )
    print(
        "| model | method | HVPs | wall time (s) | rel. error | runs ≤ 1e-3 | "
        "speed-up vs PyHessian |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(eigen))
    assert problems[0].hessian is not None
    exact = float(problems[0].hessian.trace())
    print(
        f"\n### Trace at equal HVP count ({problems[0].label}, exact trace {exact:.4g}, "
        f"{args.trace_seeds} seeds)\n"
    )
    print("| estimator | HVPs | rel. RMSE | Hutchinson theory | ±2 SE coverage |")
    print("|---|---|---|---|---|")
    print(trace)
    print(f"\n### One HVP / one gradient (min over {args.hvp_repeats} interleaved repeats)\n")
    print("| model | what | time per call (ms) | / gradient | spread (max/min) |")
    print("|---|---|---|---|---|")
    print("\n".join(hvp))
    if memory is not None:
        print("\n### Extra peak RSS of 20 HVPs over one gradient (CNN, batch 128, MiB)\n")
        print("| tool | extra peak RSS (MiB) |")
        print("|---|---|")
        print(memory)


if __name__ == "__main__":
    main()
