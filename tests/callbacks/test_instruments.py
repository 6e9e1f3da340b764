"""Issue 15's instruments in a real Trainer: batch sharpness, the gradient's share of the top
eigenspace, the curvature along the last update and SAM's curvature along ε.

Each logged value is recomputed by brute force on a least-squares model, whose Hessian on a
batch is exactly ``2 XᵀX / n`` (float32 training: ``rel=1e-4``, a few hundred roundings of
the float32 products); training with the monitors is bit-for-bit training without them;
a resumed run logs the same values; the dashboard puts batch sharpness on λ₁'s chart.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import (
    LIGHTNING_NOISE,
    LeastSquares,
    csv_logger,
    loader,
    make_trainer,
    read_csv,
    read_events,
    regression_data,
    tb_logger,
)
from test_dashboard import read_layout
from test_trajectory import assert_same_run, train

import lightning_curvature.callbacks.eigenvalues as eigenvalues_module
from lightning_curvature import SAM, BatchSharpnessMonitor, HessianEigenvalueMonitor
from lightning_curvature.functional.eigenvalues import hessian_eigenvalues
from lightning_curvature.functional.stability import stability_threshold

pytestmark = [*LIGHTNING_NOISE, pytest.mark.filterwarnings("ignore:.*The dirpath has changed.*")]


class Recorder(pl.Callback):
    """Weights at each step's start, the gradient the optimizer steps with, Adam's D."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.preconditioners: dict[int, torch.Tensor | None] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        step = trainer.global_step
        self.weights[step] = pl_module.linear.weight.detach().reshape(-1).double().clone()
        found = stability_threshold(trainer.optimizers[0], [pl_module.linear.weight])
        assert found is not None
        pre = found.preconditioner
        self.preconditioners[step] = None if pre is None else pre.double().clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
        grad = pl_module.linear.weight.grad
        self.grads[trainer.global_step] = grad.detach().reshape(-1).double().clone()


def _hessian_and_gradient(batch: Any, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean((X w − y)²)``: H = 2 XᵀX / n, g = 2 Xᵀ(X w − y) / n (float64)."""
    x, y = (t.double() for t in batch)
    n = x.shape[0]
    return 2 * x.T @ x / n, 2 * x.T @ (x @ w - y) / n


def _rayleigh(h: torch.Tensor, v: torch.Tensor) -> float:
    return float(v @ h @ v / (v @ v))


def _fit(
    tmp_path: Path, callbacks: list[pl.Callback], module: pl.LightningModule, steps: int = 7
) -> dict[str, list[tuple[int, float]]]:
    pl.seed_everything(0, verbose=False)
    logger = csv_logger(tmp_path)
    trainer = make_trainer(callbacks, logger=logger, max_steps=steps)
    trainer.fit(module, loader(regression_data(n=40), batch_size=8, shuffle=True))
    return read_csv(logger)


def test_batch_sharpness_monitor_logs_the_brute_force_value_and_its_threshold(
    tmp_path: Path,
) -> None:
    monitor = BatchSharpnessMonitor(num_batches=4, every_n_steps=3)
    recorder = Recorder()
    lr = 0.05
    rows = _fit(tmp_path, [recorder, monitor], LeastSquares(lr=lr))
    probe = monitor.fixed_probe
    assert probe is not None
    assert len(probe) == 4
    assert all(b[0].shape[0] == 8 for b in probe)  # the training batch size
    logged = rows["curvature/batch_sharpness"]
    assert [s for s, _ in logged] == [0, 3, 6]
    for step, value in logged:
        quotients = []
        for batch in probe:
            h, g = _hessian_and_gradient(batch, recorder.weights[step])
            quotients.append(_rayleigh(h, g))
        exact = torch.tensor(quotients, dtype=torch.float64)
        assert value == pytest.approx(float(exact.mean()), rel=1e-4)
        (error,) = [v for s, v in rows["curvature/batch_sharpness_std_error"] if s == step]
        assert error == pytest.approx(float(exact.std() / 2), rel=1e-3)
    thresholds = rows["curvature/stability_threshold"]
    assert [s for s, _ in thresholds] == [0, 3, 6]
    assert all(v == pytest.approx(2 / lr) for _, v in thresholds)
    ratios = dict(rows["curvature/batch_sharpness_ratio"])
    for step, value in logged:
        assert ratios[step] == pytest.approx(value * lr / 2, rel=1e-6)
    assert {v for _, v in rows["probe_cost/batch_sharpness_hvps"]} == {4.0}


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [("sgd", {}), ("sgd", {"momentum": 0.9}), ("adam", {})],
    ids=["sgd", "momentum", "adam"],
)
def test_update_sharpness_and_gradient_share_against_brute_force(
    tmp_path: Path, optimizer: str, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    lr = 0.01 if optimizer == "adam" else 0.05
    monitor = HessianEigenvalueMonitor(
        k=2, every_n_steps=3, gradient_share=True, update_sharpness=True
    )
    recorder = Recorder()
    # The share is exactly that of the gradient in the span of the Ritz vectors, which are
    # as accurate as Lanczos makes them (their error goes as the square root of the
    # eigenvalues'): the vectors of each probe are kept to check both apart.
    ritz: list[torch.Tensor] = []

    def keeping(*args: Any, **kwargs: Any) -> Any:
        out = hessian_eigenvalues(*args, **kwargs)
        if out.eigenvectors is not None and out.gradient is not None:
            ritz.append(out.eigenvectors.double().clone())
        return out

    monkeypatch.setattr(eigenvalues_module, "hessian_eigenvalues", keeping)
    rows = _fit(tmp_path, [recorder, monitor], LeastSquares(optimizer=optimizer, lr=lr, **options))
    (probe,) = monitor.fixed_probe or [None]
    probe_steps = [s for s, _ in rows["curvature/eigenvalue_1"]]
    assert probe_steps == [0, 3, 6]
    update = dict(rows["curvature/update_sharpness"])
    assert sorted(update) == [3, 6]  # no update before step 0
    share, training_share = (
        dict(rows["curvature/gradient_top_share"]),
        dict(rows["curvature/training_gradient_top_share"]),
    )
    assert sorted(share) == sorted(training_share) == probe_steps
    ratio = dict(rows["curvature/update_sharpness_ratio"])
    assert len(ritz) == len(probe_steps)
    for step, vectors in zip(probe_steps, ritz, strict=True):
        w = recorder.weights[step]
        h, g = _hessian_and_gradient(probe, w)
        top = torch.linalg.eigh(h).eigenvectors[:, -2:].T
        cosines = torch.linalg.svdvals(top @ vectors.T)  # of the principal angles
        # certified eigenvalues (tol=1e-3) bound θ² ≲ tol·λ₂/(λ₂ − λ₃) ≈ 1.6e-3 here
        assert float(cosines.min()) >= 1 - 2e-3
        assert share[step] == pytest.approx(float((vectors @ g).square().sum() / (g @ g)), abs=1e-5)
        assert share[step] == pytest.approx(float((top @ g).square().sum() / (g @ g)), abs=1e-2)
        train_grad = recorder.grads[step]
        exact_share = float((vectors @ train_grad).square().sum() / (train_grad @ train_grad))
        assert training_share[step] == pytest.approx(exact_share, abs=1e-5)
        if step == 0:
            continue
        u = w - recorder.weights[step - 1]
        assert update[step] == pytest.approx(_rayleigh(h, u), rel=1e-4)
        found = stability_threshold(torch.optim.SGD([torch.zeros(1)], lr=lr, **options), [])
        assert found is not None
        if optimizer == "sgd":
            assert ratio[step] == pytest.approx(update[step] / found.limit, rel=1e-6)
        else:
            d = recorder.preconditioners[step]
            assert d is not None
            preconditioned = float(u @ h @ u / (u / d).square().sum())
            logged = dict(rows["curvature/preconditioned_update_sharpness"])[step]
            assert logged == pytest.approx(preconditioned, rel=1e-4)
            assert ratio[step] == pytest.approx(preconditioned * lr * 0.1 / 3.8, rel=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_with_the_new_instruments_is_bit_identical(tmp_path: Path, optimizer: str) -> None:
    monitors = [
        BatchSharpnessMonitor(num_batches=2, every_n_steps=1, on_train_end=True),
        HessianEigenvalueMonitor(
            k=2, every_n_steps=3, gradient_share=True, update_sharpness=True, on_train_end=True
        ),
    ]
    with_them = train(tmp_path / "with", optimizer, monitors)
    without = train(tmp_path / "without", optimizer, [])
    assert_same_run(with_them, without)


def _resume_fit(tmp_path: Path, name: str, ckpt_path: Path | None = None) -> Any:
    pl.seed_everything(0, verbose=False)
    logger = csv_logger(tmp_path, name)
    monitor = HessianEigenvalueMonitor(
        k=1, every_n_steps=5, update_sharpness=True, on_train_end=True
    )
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / name / "checkpoints", every_n_train_steps=5, save_top_k=-1
    )
    trainer = make_trainer(
        [
            monitor,
            BatchSharpnessMonitor(num_batches=2, every_n_steps=5, on_train_end=True),
            checkpoints,
        ],
        logger=logger,
        max_steps=10,
        enable_checkpointing=True,
    )
    data = loader(regression_data(n=40), batch_size=8)
    trainer.fit(LeastSquares(lr=0.05), data, ckpt_path=ckpt_path)
    return read_csv(logger), tmp_path / name / "checkpoints"


def test_a_resumed_run_logs_the_same_update_sharpness(tmp_path: Path) -> None:
    full, directory = _resume_fit(tmp_path, "full")
    assert [s for s, _ in full["curvature/update_sharpness"]] == [5, 10]
    (checkpoint,) = directory.glob("*step=5.ckpt")
    # the copy of w₄ taken for the probe at step 5 is pending when the checkpoint is written
    state = torch.load(checkpoint, weights_only=True)["callbacks"]
    (eigen_state,) = [v for k, v in state.items() if k.startswith("HessianEigenvalueMonitor")]
    assert eigen_state["update_start"]["step"] == 5
    resumed, _ = _resume_fit(tmp_path, "resumed", ckpt_path=checkpoint)
    for tag in ("curvature/update_sharpness", "curvature/batch_sharpness"):
        assert resumed[tag] == [(s, v) for s, v in full[tag] if s >= 5], tag


class Quadratic(pl.LightningModule):
    """``mean((X w − y)²)`` whose gradient at w and at w + ε SAM computes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(5, 1, bias=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Batches(pl.Callback):
    def __init__(self) -> None:
        self.batches: dict[int, Any] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.batches[trainer.global_step] = [t.clone() for t in batch]


@pytest.mark.parametrize("precision", ["32", "16-mixed-scaler"])
def test_sam_logs_the_curvature_along_epsilon(tmp_path: Path, precision: str) -> None:
    rho = 0.1
    sam, recorder, batches = SAM(rho=rho, log_every_n_steps=1), Recorder(), Batches()
    kwargs: dict[str, Any] = {}
    if precision == "16-mixed-scaler":  # loss scaled by 2¹⁰: the curvature must not be
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    pl.seed_everything(0, verbose=False)
    logger = csv_logger(tmp_path)
    trainer = make_trainer([recorder, batches, sam], logger=logger, max_steps=4, **kwargs)
    trainer.fit(Quadratic(), loader(regression_data(n=40), batch_size=8, shuffle=True))
    logged = read_csv(logger)["sam/curvature"]
    assert [s for s, _ in logged] == [0, 1, 2, 3]
    # fp16 autocast rounds the products to 2⁻¹¹ relative: 1e-2 there
    rel = 1e-4 if precision == "32" else 1e-2
    for step, value in logged:
        h, g = _hessian_and_gradient(batches.batches[step], recorder.weights[step])
        eps = rho * g / g.norm()  # quadratic: the secant is exactly εᵀHε/‖ε‖²
        assert value == pytest.approx(_rayleigh(h, eps), rel=rel)


def test_the_dashboard_puts_batch_sharpness_on_the_sharpness_chart(tmp_path: Path) -> None:
    logger = tb_logger(tmp_path)
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=2, gradient_share=True, update_sharpness=True),
        BatchSharpnessMonitor(num_batches=2, every_n_steps=2),
    ]
    trainer = make_trainer(monitors, logger=logger, max_steps=3)
    trainer.fit(LeastSquares(lr=0.05), loader(regression_data(n=32), batch_size=8))
    layout = read_layout(read_events(logger))["curvature"]
    kind, regexes = layout["sharpness λ₁ and batch sharpness vs. stability threshold 2/η"]
    assert kind == "multiline"
    assert regexes == [
        "^curvature/eigenvalue_1$",
        "^curvature/stability_threshold$",
        "^curvature/batch_sharpness$",
    ]
    assert "gradient's share of the top-1 eigenspace ‖P_k g‖²/‖g‖²" in layout
    assert "curvature along the last update uᵀHu/‖u‖²" in layout
    # the eigenvalue monitor logs the threshold: the batch-sharpness monitor does not repeat it
    events = read_events(logger)
    threshold_steps = [e.step for e in events.Scalars("curvature/stability_threshold")]
    assert threshold_steps == [0, 2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_batches": 1}, "`num_batches` must be an integer >= 2"),
        ({"num_batches": True}, "`num_batches` must be an integer >= 2"),
        ({"probe": "current"}, "does not take `probe`"),
        ({"probe_batches": 3}, "does not take `probe_batches`"),
    ],
)
def test_batch_sharpness_monitor_refuses_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        BatchSharpnessMonitor(**kwargs)


def test_zero_update_is_left_out_with_one_warning(tmp_path: Path) -> None:
    monitor = HessianEigenvalueMonitor(every_n_steps=2, update_sharpness=True, stability=False)
    with pytest.warns(match="non-finite value"):
        rows = _fit(tmp_path, [monitor], LeastSquares(lr=0.0), steps=5)
    assert "curvature/update_sharpness" not in rows
    assert all(math.isfinite(v) for _, v in rows["curvature/eigenvalue_1"])


@pytest.mark.parametrize(
    "cadence",
    [{"every_n_epochs": 1}, {"max_overhead": 0.9}, {"every_n_steps": 4, "on_train_end": True}],
    ids=["every_epoch", "max_overhead", "steps_and_train_end"],
)
def test_every_probe_after_the_first_step_has_its_update(
    tmp_path: Path, cadence: dict[str, Any]
) -> None:
    """The copy of w_{t−1} is taken on the step before each probe, whatever the cadence:
    epoch ends (5 batches an epoch; max_steps=27 stops one after 2 batches), an adaptive
    budget, train end (after step 27)."""
    recorder = Recorder()
    monitor = HessianEigenvalueMonitor(update_sharpness=True, stability=False, **cadence)
    # (the budget would estimate a probe of this 5-parameter model from its products at 35
    # training steps, far above its true cost, since a step here is mostly Lightning's own
    # overhead: of unknown cost instead, the first probe is made and measured)
    monitor.expected_cost = lambda trainer, pl_module: None  # type: ignore[method-assign]
    rows = _fit(tmp_path, [recorder, monitor], LeastSquares(lr=0.05), steps=27)
    probes = [s for s, _ in rows["curvature/eigenvalue_1"]]
    update = dict(rows["curvature/update_sharpness"])
    assert len(probes) >= 2
    assert sorted(update) == [s for s in probes if s > 0]
    (probe,) = monitor.fixed_probe or [None]
    for step, value in update.items():
        h, _ = _hessian_and_gradient(probe, torch.zeros(5, dtype=torch.float64))
        after = recorder.weights.get(step)
        if after is None:  # the train-end probe: the weights after the last step
            continue
        u = after - recorder.weights[step - 1]
        assert value == pytest.approx(_rayleigh(h, u), rel=1e-4)


def test_a_ggn_monitor_measures_its_instruments_on_the_ggn(tmp_path: Path) -> None:
    """On least squares G = H: the ``ggn_`` tags equal the brute force of H."""
    from lightning_curvature import OutputLoss

    split = OutputLoss(
        lambda module, batch: (module.linear(batch[0]).squeeze(-1), batch[1]),
        torch.nn.functional.mse_loss,
    )
    monitor = HessianEigenvalueMonitor(
        k=2, every_n_steps=3, curvature="ggn", loss_fn=split, update_sharpness=True,
        gradient_share=True, warm_start=False,
    )  # fmt: skip
    recorder = Recorder()
    rows = _fit(tmp_path, [recorder, monitor], LeastSquares(lr=0.05))
    (probe,) = monitor.fixed_probe or [None]
    update = dict(rows["curvature/ggn_update_sharpness"])
    assert sorted(update) == [3, 6]
    assert sorted(dict(rows["curvature/ggn_gradient_top_share"])) == [0, 3, 6]
    for step, value in update.items():
        h, _ = _hessian_and_gradient(probe, recorder.weights[step])
        u = recorder.weights[step] - recorder.weights[step - 1]
        assert value == pytest.approx(_rayleigh(h, u), rel=1e-4)


def test_the_sharpness_chart_names_only_what_is_on_it(tmp_path: Path) -> None:
    """Batch sharpness alone is not charted under λ₁'s name, nor a named λ₁ under its."""
    logger = tb_logger(tmp_path)
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=2, name="heldout"),
        BatchSharpnessMonitor(num_batches=2, every_n_steps=2),
    ]
    trainer = make_trainer(monitors, logger=logger, max_steps=1)
    trainer.fit(LeastSquares(lr=0.05), loader(regression_data(n=32), batch_size=8))
    layout = read_layout(read_events(logger))
    alone = layout["curvature"]["batch sharpness vs. stability threshold 2/η"]
    assert alone[1] == ["^curvature/batch_sharpness$", "^curvature/stability_threshold$"]
    named = layout["curvature (heldout)"]["sharpness λ₁ vs. stability threshold 2/η"]
    assert named[1] == [
        "^curvature/heldout/eigenvalue_1$",
        "^curvature/heldout/stability_threshold$",
    ]
