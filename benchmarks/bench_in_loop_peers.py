"""The eigenvalue monitor in a training loop against PyHessian called from a callback (issue 23).

The edge-of-stability run of ``examples/edge_of_stability.py`` (the tanh MLP of 8,970
parameters, full-batch gradient descent on 1000 digits, lr 0.2, MSE), 1500 steps, with the
top Hessian eigenvalue measured every 50 steps (30 probes) by:

* ``HessianEigenvalueMonitor(every_n_steps=50)`` at its defaults (``tol=1e-3``, warm starts
  from the previous probe's Ritz vectors, the stability threshold and its logging);
* a callback calling PyHessian 0.1's ``hessian(...).eigenvalues(top_n=1)`` on the same full
  batch and loss at the same steps, at its defaults (``maxIter=100, tol=1e-3``), and at
  ``tol=1e-4`` (the tolerance at which its λ₁ reached 1e-3 on the MLP of
  ``bench_peers.py``), ``1e-5`` and ``1e-6``, looking for the first that reaches 1e-3 on
  every probe here ("equal accuracy"). PyHessian puts the model in eval mode and leaves a
  graph in every ``.grad``: the callback sets the mode back and the gradients to ``None``.

Seconds are those spent inside each callback's hooks (``time.perf_counter`` around every
``on_*`` method), so the rest of the step is the same for all; the runs are interleaved,
one intra-op thread, and the median over repeats is reported with the fits' wall times.
Accuracy: every probe against a reference λ₁ at the same step (``hessian_eigenvalues`` at
``tol=1e-8`` on a float64 copy of the model, in a separate fit whose trajectory is the same:
the callbacks change no weight, which the script checks with ``torch.equal``).

Needs PyHessian: run it with the peers' venv of ``bench_peers.py``:

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=.. /work/peers-venv/bin/python \\
        bench_in_loop_peers.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package
sys.path.insert(0, str(ROOT / "examples"))
from common import load_average, machine, summary  # noqa: E402
from edge_of_stability import DigitsRegressor, digits_dataset  # noqa: E402

from lightning_curvature import HessianEigenvalueMonitor, hessian_eigenvalues  # noqa: E402

LR, STEPS, EVERY = 0.2, 1500, 50


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The regressor's loss, as a PyHessian criterion."""
    return 0.5 * (outputs - targets).pow(2).sum(dim=1).mean()


class Timed:
    """Wraps every ``on_*`` hook of a callback to add up the seconds spent inside."""

    def __init__(self, callback: pl.Callback) -> None:
        self.seconds = 0.0
        for name in dir(callback):
            if name.startswith("on_") and callable(getattr(callback, name)):
                setattr(callback, name, self._wrap(getattr(callback, name)))

    def _wrap(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


class EveryN(pl.Callback):
    """Calls ``measure(module, batch)`` after every ``EVERY``-th optimizer step."""

    def __init__(self, measure: Callable[[pl.LightningModule, Any], float]) -> None:
        self.measure, self.values = measure, {}

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if trainer.global_step % EVERY == 0:
            self.values[trainer.global_step] = self.measure(module, batch)


def pyhessian_measure(pyhessian: Any, tol: float) -> Callable[[pl.LightningModule, Any], float]:
    def measure(module: pl.LightningModule, batch: Any) -> float:
        engine = pyhessian.hessian(module.net, mse, data=tuple(batch), cuda=False)
        values, _ = engine.eigenvalues(maxIter=100, tol=tol, top_n=1)
        del engine
        module.train()
        module.zero_grad(set_to_none=True)
        return float(values[0])

    return measure


def reference(module: pl.LightningModule, batch: Any) -> float:
    twin = copy.deepcopy(module.net).double()
    x, y = (t.double() for t in batch)
    found = hessian_eigenvalues(
        twin, lambda m, b: mse(m(b[0]), b[1]), (x, y), tol=1e-8, max_iter=300,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    return float(found.eigenvalues[0])


class Recorded(HessianEigenvalueMonitor):
    """The monitor as users add it, keeping each probe's λ₁ for the accuracy column."""

    def __init__(self) -> None:
        super().__init__(every_n_steps=EVERY)
        self.values: dict[int, float] = {}

    def measure(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
        result = super().measure(trainer, *args, **kwargs)
        self.values[trainer.global_step] = float(result.metrics["curvature/eigenvalue_1"])
        return result


def fit(callback: pl.Callback | None) -> tuple[float, float, pl.LightningModule]:
    pl.seed_everything(0, verbose=False)
    dataset = digits_dataset(1000)
    timer = Timed(callback) if callback is not None else None
    trainer = pl.Trainer(
        max_steps=STEPS, callbacks=[callback] if callback else [],
        logger=CSVLogger(tempfile.mkdtemp()), log_every_n_steps=EVERY,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
    )  # fmt: skip
    module = DigitsRegressor(LR)
    start = time.perf_counter()
    trainer.fit(module, DataLoader(dataset, batch_size=len(dataset)))
    return time.perf_counter() - start, timer.seconds if timer else 0.0, module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from pyhessian import hessian as pyhessian_module  # noqa: F401

    pyhessian = sys.modules["pyhessian.hessian"]
    started, load = time.perf_counter(), load_average()
    print(machine("pyhessian"))
    _, _, plain = fit(None)
    truth_callback = EveryN(reference)
    _, _, with_truth = fit(truth_callback)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), with_truth.parameters(),
                                                 strict=True))  # fmt: skip
    truth = truth_callback.values
    makers: dict[str, Callable[[], pl.Callback | None]] = {
        "no callback": lambda: None,
        "this project, HessianEigenvalueMonitor(every_n_steps=50)": Recorded,
        "PyHessian eigenvalues() defaults (tol=1e-3)": lambda: EveryN(
            pyhessian_measure(pyhessian, 1e-3)
        ),
        "PyHessian eigenvalues(tol=1e-4)": lambda: EveryN(pyhessian_measure(pyhessian, 1e-4)),
        "PyHessian eigenvalues(tol=1e-5)": lambda: EveryN(pyhessian_measure(pyhessian, 1e-5)),
        "PyHessian eigenvalues(tol=1e-6)": lambda: EveryN(pyhessian_measure(pyhessian, 1e-6)),
    }
    walls: dict[str, list[float]] = {name: [] for name in makers}
    inside: dict[str, list[float]] = {name: [] for name in makers}
    errors: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, make in makers.items():
            callback = make()
            wall, seconds, module = fit(callback)
            assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), module.parameters(),
                                                         strict=True)), name  # fmt: skip
            walls[name].append(wall)
            inside[name].append(seconds)
            if callback is not None:
                values = callback.values  # type: ignore[attr-defined]
                common = sorted(set(values) & set(truth))  # the monitor's steps may be offset
                errors[name] = [abs(values[s] - truth[s]) / abs(truth[s]) for s in common]
                print(f"{name}: steps {min(values)}..{max(values)}, {len(common)} compared")
    ours = statistics.median(inside["this project, HessianEigenvalueMonitor(every_n_steps=50)"])
    print(f"\n{STEPS} steps, λ₁ every {EVERY} ({len(truth)} probes), {args.repeats} repeats")
    print("\n| callback | fit (s) | inside the callback (s) | ours / this | rel. error median "
          "| max | probes > 1e-3 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in makers:
        wall, seconds = statistics.median(walls[name]), statistics.median(inside[name])
        ratio = f"{ours / seconds:.2f}" if seconds > 0 else ""
        err = errors.get(name)
        accuracy = (
            f"{statistics.median(err):.1e} | {max(err):.1e} | {sum(e > 1e-3 for e in err)}"
            if err else " | | "
        )  # fmt: skip
        print(f"| {name} | {wall:.2f} | {seconds:.3f} | {ratio} | {accuracy} |")
    print("\n" + summary(started, load))


if __name__ == "__main__":
    main()
