"""Arguments that were silently accepted (and failed at the first probe, or with a raw
``TypeError``) now raise ``MisconfigurationException`` naming them and what is allowed, at
construction or ``setup``; ``per_layer=True`` means the same for every monitor; tags land at
the step ``self.log`` uses, also with manual optimization and two optimizers."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import (
    LIGHTNING_NOISE,
    LeastSquares,
    TanhRegressor,
    csv_logger,
    hessian_loss,
    loader,
    make_trainer,
    read_csv,
    regression_data,
    steps,
)

from lightning_curvature import (
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
    hessian_eigenvalues,
)
from lightning_curvature.callbacks import training_step_loss
from lightning_curvature.functional.linalg.sampling import make_generator

pytestmark = LIGHTNING_NOISE

MONITORS = [
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
    GradientCoherenceMonitor,
]
PER_LAYER = [HessianEigenvalueMonitor, HessianTraceMonitor, GradientCoherenceMonitor]


@pytest.mark.parametrize("monitor", PER_LAYER, ids=lambda m: m.__name__)
@pytest.mark.parametrize("per_layer", [[1], {"head": 1}, 5, ["net.*", None], ("a", 2.0)])
def test_per_layer_that_is_not_patterns_raises_naming_it(monitor: type, per_layer: Any) -> None:
    with pytest.raises(MisconfigurationException, match="`per_layer` must be True/False, a list"):
        monitor(per_layer=per_layer)


@pytest.mark.parametrize("monitor", MONITORS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("parameters", [5, [], (), [1], ["net.*", 3], {"a": "net.*"}])
def test_parameters_that_are_not_patterns_raise_naming_them(monitor: type, parameters: Any) -> None:
    with pytest.raises(MisconfigurationException, match="`parameters` must be None") as raised:
        monitor(parameters=parameters)
    assert f"got {parameters!r}" in str(raised.value)


@pytest.mark.parametrize("monitor", MONITORS, ids=lambda m: m.__name__)
def test_a_misspelt_argument_names_the_monitor_and_what_it_takes(monitor: type) -> None:
    with pytest.raises(MisconfigurationException) as raised:
        monitor(kk=3)
    message = str(raised.value)
    assert message.startswith(f"`{monitor.__name__}` got unexpected argument(s) `kk`; it takes")
    assert "every_n_steps" in message
    assert "probe_batches" in message
    if monitor is HessianEigenvalueMonitor:
        assert "k, tol, max_iter" in message


def test_k_above_the_number_of_measured_parameters_fails_at_setup(tmp_path: Path) -> None:
    monitor = HessianEigenvalueMonitor(k=6, every_n_steps=1)
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=1)
    with pytest.raises(MisconfigurationException, match=r"`k` must be at most .*\(5\).*k=6"):
        trainer.fit(LeastSquares(d=5), loader(regression_data(), 8))


@pytest.mark.parametrize("monitor", MONITORS, ids=lambda m: m.__name__)
def test_a_parameters_pattern_matching_nothing_fails_at_setup(
    tmp_path: Path, monitor: type
) -> None:
    trainer = make_trainer(
        [monitor(parameters="encoder.*")], logger=csv_logger(tmp_path), max_steps=1
    )
    with pytest.raises(MisconfigurationException, match=r"'encoder\.\*' matches no trainable"):
        trainer.fit(TanhRegressor(), loader(regression_data(), 8))


@pytest.mark.parametrize("monitor", PER_LAYER, ids=lambda m: m.__name__)
def test_a_per_layer_pattern_matching_nothing_fails_at_setup(tmp_path: Path, monitor: type) -> None:
    trainer = make_trainer(
        [monitor(per_layer=["net.0.*", "encoder.*"])], logger=csv_logger(tmp_path), max_steps=1
    )
    with pytest.raises(MisconfigurationException, match=r"`per_layer`.*'encoder\.\*'"):
        trainer.fit(TanhRegressor(), loader(regression_data(), 8))


def test_eigenvalue_per_layer_true_gives_each_module_its_block_eigenvalue(tmp_path: Path) -> None:
    model = TanhRegressor()
    initial = copy.deepcopy(model)
    monitor = HessianEigenvalueMonitor(tol=1e-5, every_n_steps=10, per_layer=True)
    trainer = make_trainer([monitor], logger=csv_logger(tmp_path), max_steps=1)
    trainer.fit(model, loader(regression_data(), 8))
    assert monitor.fixed_probe is not None
    for block in ("net.0", "net.2"):
        exact = hessian_eigenvalues(
            initial,
            training_step_loss,
            monitor.fixed_probe,
            k=1,
            tol=1e-5,
            parameters=[f"{block}.weight", f"{block}.bias"],
            generator=make_generator(torch.device("cpu")),
        )
        assert monitor.last_metrics[f"curvature/eigenvalue_1/{block}"] == pytest.approx(
            float(exact.eigenvalues[0]), rel=1e-4
        )


class TwoOptimizers(TanhRegressor):
    """Manual optimization stepping two optimizers per batch: global_step grows by 2."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        first, second = self.optimizers()  # type: ignore[misc]
        loss = hessian_loss(self, batch)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()
        self.log("train_loss", loss)

    def configure_optimizers(self) -> Any:  # type: ignore[override]
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.05),
            torch.optim.SGD(self.net[2].parameters(), lr=0.05),
        ]


def test_manual_optimization_with_two_optimizers_logs_at_self_logs_steps(tmp_path: Path) -> None:
    logger = csv_logger(tmp_path)
    monitor = HessianTraceMonitor(num_hvps=2, every_n_steps=2, loss_fn=hessian_loss)
    trainer = make_trainer([monitor], logger=logger, max_steps=8)
    trainer.fit(TwoOptimizers(), loader(regression_data(), 8))
    logged = read_csv(logger)
    assert steps(logged["train_loss"]) == [0, 1, 2, 3]  # 4 batches, 8 optimizer steps
    assert steps(logged["curvature/trace"]) == [0, 1, 2, 3]  # not 0, 2, 4, 6
    assert all(math.isfinite(v) for _, v in logged["curvature/trace"])
