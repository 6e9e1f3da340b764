"""Issue 25's monitors in a real Trainer: loss slices and critical sharpness.

Each logged value is recomputed by brute force on the least-squares model, whose loss is
exactly quadratic (``mean((Xw − y)²)``, Hessian ``2XᵀX/n``): the slices along the top
eigenvector are parabolas of curvature ``λ₁``, the critical sharpness along the optimizer's
next update ``u`` is ``uᵀHu / gᵀu``. float32 training: the losses of a slice carry the
rounding of a float32 forward (``rel=1e-3`` on second differences). Training with the
monitors is bit-for-bit training without them; a resumed run logs the same values.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import (
    LIGHTNING_NOISE,
    LeastSquares,
    TanhRegressor,
    csv_logger,
    loader,
    make_optimizer,
    make_trainer,
    read_csv,
    read_events,
    regression_data,
    tb_logger,
)
from test_dashboard import read_layout
from test_trajectory import assert_same_run, train

from lightning_curvature import (
    CriticalSharpnessMonitor,
    CurvatureWarning,
    HessianEigenvalueMonitor,
    LossLandscapeMonitor,
)
from lightning_curvature.functional.optimizer_update import next_update

pytestmark = [*LIGHTNING_NOISE, pytest.mark.filterwarnings("ignore:.*The dirpath has changed.*")]


class Snapshots(pl.Callback):
    """The weights and a copy of the optimizer at each step's start (before any probe)."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self.optimizers: dict[int, dict[str, Any]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        step = trainer.global_step
        self.weights[step] = pl_module.linear.weight.detach().reshape(-1).double().clone()
        self.optimizers[step] = copy.deepcopy(trainer.optimizers[0].state_dict())


def _quadratic(batch: Any, w: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The loss of ``mean((Xw − y)²)`` as a function, its Hessian and gradient at ``w``."""
    x, y = (t.double() for t in batch)
    n = x.shape[0]

    def loss(v: torch.Tensor) -> float:
        return float((x @ v - y).square().mean())

    return loss, 2 * x.T @ x / n, 2 * x.T @ (x @ w - y) / n


def _fit(
    tmp_path: Path, callbacks: list[pl.Callback], module: pl.LightningModule, steps: int = 7
) -> dict[str, list[tuple[int, float]]]:
    pl.seed_everything(0, verbose=False)
    logger = csv_logger(tmp_path)
    trainer = make_trainer(callbacks, logger=logger, max_steps=steps)
    trainer.fit(module, loader(regression_data(n=40), batch_size=8, shuffle=True))
    return read_csv(logger)


def _next_step(
    kind: str, options: dict[str, Any], lr: float, state: dict[str, Any], w: torch.Tensor,
    g: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """``lr·u``: the optimizer's next step from the recorded state, on a fresh copy."""
    weight = torch.nn.Parameter(w.float().reshape(1, -1).clone())
    optimizer = make_optimizer([weight], kind, lr, **options)
    optimizer.load_state_dict(state)
    found = next_update(optimizer, [weight], g.float())
    assert found is not None
    return found.step.double()


OPTIMIZERS = [("sgd", {}), ("sgd", {"momentum": 0.9}), ("adam", {})]


@pytest.mark.parametrize(("kind", "options"), OPTIMIZERS, ids=["sgd", "momentum", "adam"])
def test_slices_of_a_quadratic_are_its_parabolas(
    tmp_path: Path, kind: str, options: dict[str, Any]
) -> None:
    lr = 0.01 if kind == "adam" else 0.05
    monitor = LossLandscapeMonitor(every_n_steps=3, num_points=5, tol=1e-4)
    snapshots = Snapshots()
    rows = _fit(tmp_path, [snapshots, monitor], LeastSquares(optimizer=kind, lr=lr, **options))
    (probe,) = monitor.fixed_probe or [None]
    assert [s for s, _ in rows["landscape/curvature_1"]] == [0, 3, 6]
    assert [s for s, _ in rows["landscape/curvature_update"]] == [3, 6]  # none at step 0
    for step in (0, 3, 6):
        w = snapshots.weights[step]
        loss, hessian, gradient = _quadratic(probe, w)
        values, vectors = torch.linalg.eigh(hessian)
        top, v = float(values[-1]), vectors[:, -1]
        logged = {tag: dict(series).get(step) for tag, series in rows.items()}
        assert logged["landscape/curvature_1"] == pytest.approx(top, rel=1e-5)
        assert logged["landscape/secant_curvature_1"] == pytest.approx(top, rel=1e-3)
        assert abs(logged["landscape/asymmetry_1"]) < 1e-2
        # the next step's component along v₁, and what it does to the loss along v₁
        step_vector = _next_step(kind, options, lr, snapshots.optimizers[step], w, gradient)
        along = float(step_vector @ v)
        exact = loss(w - along * v) - loss(w)
        modelled = -along * float(gradient @ v) + 0.5 * along**2 * top
        if logged["landscape/step_loss_change_1"] is not None:
            assert logged["landscape/step_loss_change_1"] == pytest.approx(exact, abs=1e-5)
            assert logged["landscape/quadratic_step_loss_change_1"] == pytest.approx(
                modelled, rel=1e-3, abs=1e-7
            )
        forwards = 1 + (5 + 2) * (1 if step == 0 else 2)
        assert logged["probe_cost/landscape_forwards"] == forwards
        if step == 0:
            continue
        u = w - snapshots.weights[step - 1]  # the last update
        rayleigh = float(u @ hessian @ u / (u @ u))
        assert logged["landscape/curvature_update"] == pytest.approx(rayleigh, rel=1e-3)
        assert logged["landscape/secant_curvature_update"] == pytest.approx(rayleigh, rel=1e-2)
        assert logged["landscape/step_loss_change_update"] == pytest.approx(
            loss(w + u) - loss(w), rel=1e-2, abs=1e-6
        )


@pytest.mark.parametrize(("kind", "options"), OPTIMIZERS, ids=["sgd", "momentum", "adam"])
def test_critical_sharpness_of_a_quadratic_is_uHu_over_gu(
    tmp_path: Path, kind: str, options: dict[str, Any]
) -> None:
    lr = 0.01 if kind == "adam" else 0.05
    monitor = CriticalSharpnessMonitor(every_n_steps=2, rtol=1e-3)
    snapshots = Snapshots()
    rows = _fit(tmp_path, [snapshots, monitor], LeastSquares(optimizer=kind, lr=lr, **options))
    (probe,) = monitor.fixed_probe or [None]
    logged = rows["curvature/critical_sharpness"]
    assert [s for s, _ in logged] == [0, 2, 4, 6]
    ratios = dict(rows["curvature/critical_sharpness_ratio"])
    for step, value in logged:
        w = snapshots.weights[step]
        _, hessian, gradient = _quadratic(probe, w)
        u = _next_step(kind, options, lr, snapshots.optimizers[step], w, gradient) / lr
        exact = float(u @ hessian @ u / (gradient @ u))
        assert value == pytest.approx(exact, rel=2e-3)
        assert ratios[step] == pytest.approx(lr * value / 2, rel=1e-9)
    forwards = [v for _, v in rows["probe_cost/critical_sharpness_forwards"]]
    assert all(2 <= f <= 1 + 30 for f in forwards)
    # plain SGD: 2/η is the threshold of λ₁, logged beside (no eigenvalue monitor here)
    thresholds = rows.get("curvature/stability_threshold", [])
    if kind == "sgd" and not options:
        assert thresholds == [(s, pytest.approx(2 / lr)) for s in (0, 2, 4, 6)]
    else:
        assert thresholds == []


def test_monitors_leave_training_bit_identical(tmp_path: Path) -> None:
    monitors = lambda: [  # noqa: E731
        LossLandscapeMonitor(k=2, num_points=5, every_n_steps=1, on_train_end=True),
        CriticalSharpnessMonitor(every_n_steps=1, on_train_end=True),
    ]
    baselines = {name: train(tmp_path / f"{name}_without", name, []) for name in ("sgd", "adam")}
    for optimizer in ("sgd", "adam"):
        used = monitors()
        assert_same_run(
            train(tmp_path / f"{optimizer}_with", optimizer, used), baselines[optimizer]
        )
        landscape, critical = used
        assert landscape.schedule.last_step == critical.schedule.last_step == 30
        assert "landscape/curvature_update" in landscape.last_metrics
        assert "curvature/critical_sharpness" in critical.last_metrics
    current = [LossLandscapeMonitor(num_points=5, every_n_steps=1, probe="current")]
    assert_same_run(train(tmp_path / "current", "sgd", current), baselines["sgd"])


def test_pictures_charts_and_the_shared_sharpness_chart(tmp_path: Path) -> None:
    logger = tb_logger(tmp_path)
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=2),
        LossLandscapeMonitor(every_n_steps=2, num_points=5),
        CriticalSharpnessMonitor(every_n_steps=1),
    ]
    trainer = make_trainer(monitors, logger=logger, max_steps=5)
    trainer.fit(LeastSquares(lr=0.05), loader(regression_data(n=32), batch_size=8))
    events = read_events(logger)
    images = events.Images("landscape/slices")
    assert [image.step for image in images] == [0, 2, 4]
    assert (images[0].width, images[0].height) == (720, 40 + 250)  # v₁ only at step 0
    assert images[1].height == 40 + 2 * 250  # v₁ and the update
    layout = read_layout(events)
    title = "sharpness λ₁ and critical sharpness vs. stability threshold 2/η"
    assert layout["curvature"][title] == (
        "multiline",
        [
            "^curvature/eigenvalue_1$",
            "^curvature/stability_threshold$",
            "^curvature/critical_sharpness$",
        ],
    )
    assert "critical sharpness ratio η/η_c (1: the edge)" in layout["curvature"]
    assert set(layout["landscape"]) == {
        "secant curvature at the optimizer's step vs. the quadratic model's",
        "loss change at the optimizer's step along each line: measured, quadratic",
        "asymmetry of each slice at the step (0: quadratic)",
    }
    cost = layout["cost of the probes"]
    assert "^probe_cost/landscape_forwards$" in cost["forward passes per probe"][1]
    assert "^probe_cost/critical_sharpness_forwards$" in cost["forward passes per probe"][1]
    # the eigenvalue monitor logs the threshold: the critical-sharpness monitor does not
    assert [e.step for e in events.Scalars("curvature/stability_threshold")] == [0, 2, 4]


def test_with_momentum_critical_sharpness_keeps_a_chart_of_its_own(tmp_path: Path) -> None:
    logger = tb_logger(tmp_path)
    monitors = [HessianEigenvalueMonitor(every_n_steps=2), CriticalSharpnessMonitor()]
    trainer = make_trainer(monitors, logger=logger, max_steps=1)
    trainer.fit(LeastSquares(lr=0.05, momentum=0.9), loader(regression_data(n=32), batch_size=8))
    layout = read_layout(read_events(logger))["curvature"]
    assert "sharpness λ₁ vs. stability threshold (2+2β)/η" in layout
    assert "critical sharpness 2/η_c along the next update" in layout


def _resume_fit(tmp_path: Path, name: str, ckpt_path: Path | None = None) -> Any:
    pl.seed_everything(0, verbose=False)
    logger = csv_logger(tmp_path, name)
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / name / "checkpoints", every_n_train_steps=5, save_top_k=-1
    )
    monitors = [
        LossLandscapeMonitor(every_n_steps=5, num_points=5, on_train_end=True),
        CriticalSharpnessMonitor(every_n_steps=1),
    ]
    trainer = make_trainer(
        [*monitors, checkpoints], logger=logger, max_steps=10, enable_checkpointing=True
    )
    data = loader(regression_data(n=40), batch_size=8)
    trainer.fit(LeastSquares(lr=0.05), data, ckpt_path=ckpt_path)
    return read_csv(logger), tmp_path / name / "checkpoints"


def test_a_resumed_run_logs_the_same_values(tmp_path: Path) -> None:
    full, directory = _resume_fit(tmp_path, "full")
    (checkpoint,) = directory.glob("*step=5.ckpt")
    state = torch.load(checkpoint, weights_only=True)["callbacks"]
    (landscape,) = [v for k, v in state.items() if k.startswith("LossLandscapeMonitor")]
    assert landscape["update_start"]["step"] == 5  # the copy of w₄, pending
    (critical,) = [v for k, v in state.items() if k.startswith("CriticalSharpnessMonitor")]
    assert isinstance(critical["step_size"], float)  # the warm start
    resumed, _ = _resume_fit(tmp_path, "resumed", ckpt_path=checkpoint)
    for tag in ("curvature/critical_sharpness", "landscape/curvature_update"):
        assert resumed[tag] == [(s, v) for s, v in full[tag] if s >= 5], tag
    # its own warm start is not checkpointed (P values per eigenvector): the first probe after
    # the resume starts Lanczos cold, and agrees to tol
    eigen = [(s, pytest.approx(v, rel=1e-3)) for s, v in full["landscape/curvature_1"] if s >= 5]
    assert resumed["landscape/curvature_1"] == eigen


class NaNAway(pl.LightningModule):
    """Least squares whose loss is NaN a little away from the weights of the step."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(5, 1, bias=False)
        self.at: torch.Tensor | None = None  # set by ``Pin`` before every probe

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        assert self.at is not None
        away = (self.linear.weight - self.at).square().sum()
        guard = torch.sqrt(1e-12 - away)  # NaN beyond 1e-6 of the step's weights
        return torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y) + 0 * guard

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Pin(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        pl_module.at = pl_module.linear.weight.detach().clone()


def test_a_slice_through_nan_is_one_warning_and_training_goes_on(tmp_path: Path) -> None:
    monitor = LossLandscapeMonitor(every_n_steps=1, num_points=5)
    with pytest.warns(CurvatureWarning) as caught:
        rows = _fit(tmp_path, [Pin(), monitor], NaNAway(), steps=3)
    messages = [str(w.message) for w in caught if issubclass(w.category, CurvatureWarning)]
    assert len(messages) == 1
    assert "the loss is not finite at" in messages[0]
    assert [s for s, _ in rows["landscape/curvature_1"]] == [0, 1, 2]
    assert "landscape/secant_curvature_1" not in rows


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LossLandscapeMonitor(num_points=6), "`num_points` must be odd"),
        (lambda: LossLandscapeMonitor(num_points=3), "`num_points` must be an integer >= 5"),
        (lambda: LossLandscapeMonitor(k=0), "`k` must be an integer >= 1"),
        (lambda: LossLandscapeMonitor(update="yes"), "`update`"),
        (
            lambda: CriticalSharpnessMonitor(rtol=1.5),
            r"`rtol` must be a finite number in \(0, 1\), got 1.5",
        ),
        (lambda: CriticalSharpnessMonitor(max_evals=1), "`max_evals` must be an integer >= 2"),
    ],
)
def test_bad_arguments_are_refused_at_construction(make: Any, message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        make()


def test_an_optimizer_without_a_readable_update_is_refused(tmp_path: Path) -> None:
    trainer = make_trainer([CriticalSharpnessMonitor()], logger=csv_logger(tmp_path), max_steps=1)
    module = LeastSquares(optimizer="rmsprop", lr=0.01)
    with pytest.raises(MisconfigurationException, match="RMSprop's cannot be read"):
        trainer.fit(module, loader(regression_data(n=16), batch_size=8))


@pytest.mark.parametrize("monitor", [LossLandscapeMonitor, CriticalSharpnessMonitor])
def test_fsdp2_is_accepted_and_fsdp1_refused(tmp_path: Path, monitor: type) -> None:
    """Under FSDP2 the directions are shards and the points displaced in place (measured in
    ``tests/distributed/test_fsdp_landscape.py``); FSDP1's flat parameters stay refused."""
    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), loggers=[csv_logger(tmp_path)])
    monitor().setup(trainer, TanhRegressor(), stage="fit")
    trainer.strategy = FSDPStrategy()
    with pytest.raises(MisconfigurationException, match="does not support FSDPStrategy"):
        monitor().setup(trainer, TanhRegressor(), stage="fit")


def test_under_fsdp2_only_the_slices_need_a_smooth_model(tmp_path: Path) -> None:
    """The slices' quadratic model takes finite differences over shards (refused at a kink);
    critical sharpness takes forward passes and one gradient, so any model."""
    model = TanhRegressor()
    model.net[1] = torch.nn.ReLU()  # type: ignore[index]
    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), loggers=[csv_logger(tmp_path)])
    CriticalSharpnessMonitor().setup(trainer, model, stage="fit")
    with pytest.raises(MisconfigurationException, match=r"ModelParallelStrategy.*smooth.*ReLU"):
        LossLandscapeMonitor().setup(trainer, model, stage="fit")


def test_a_learning_rate_of_zero_is_one_warning(tmp_path: Path) -> None:
    monitor = CriticalSharpnessMonitor(every_n_steps=1)
    with (
        pytest.warns(CurvatureWarning, match="the learning rate is 0") as caught,
        pytest.raises(FileNotFoundError),  # nothing was logged: no metrics.csv
    ):
        _fit(tmp_path, [monitor], LeastSquares(lr=0.0), 3)
    assert len([w for w in caught if issubclass(w.category, CurvatureWarning)]) == 1
    assert monitor.schedule.last_step == 2
    assert monitor.last_metrics == {}
