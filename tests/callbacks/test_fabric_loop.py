"""The monitors in a Fabric loop: harmless, right, logged through Fabric, refused where unfit.

The harmless case is the Trainer's (``tests/callbacks/test_trajectory.py``) in a Fabric loop
shaped like litgpt's: BatchNorm (running statistics), Dropout (masks from the global RNG), a
shuffled loader, two micro-batches per step, momentum or Adam state. Any RNG draw, buffer
write, ``.grad`` write, optimizer touch or loader epoch moved by a probe changes the end.
"""

from __future__ import annotations

import copy
import csv
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fabric_loops import (
    BNDropoutNet,
    TanhNet,
    classification_data,
    cross_entropy,
    fit,
    make_fabric,
    mse,
    regression_data,
)
from lightning.fabric import Fabric
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_curvature import (
    SAM,
    BatchSharpnessMonitor,
    FabricMonitors,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

STEPS = 12


def every_monitor() -> list[Any]:
    return [
        HessianEigenvalueMonitor(
            k=2, smallest=True, per_layer=["net.0.*", "net.4.*"], every_n_steps=1,
            on_train_end=True, gradient_share=True, update_sharpness=True,
        ),
        HessianTraceMonitor(num_hvps=4, per_layer=True, every_n_steps=1),
        SpectralDensityMonitor(num_steps=6, num_points=20, every_n_steps=1),
        GradientCoherenceMonitor(per_layer=True, micro_batch_size=2, every_n_steps=1),
        BatchSharpnessMonitor(num_batches=2, every_n_steps=1),
    ]  # fmt: skip


def train(tmp_path: Path, optimizer_name: str, monitors: list[Any]) -> dict[str, Any]:
    fabric = make_fabric(tmp_path)
    fabric.seed_everything(1234, verbose=False)
    net = BNDropoutNet()
    optimizer = (
        torch.optim.Adam(net.parameters(), lr=1e-2)
        if optimizer_name == "adam"
        else torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    )
    model, optimizer = fabric.setup(net, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(classification_data(), batch_size=8, shuffle=True))
    curvature = None
    if monitors:
        curvature = FabricMonitors(
            fabric, model, optimizer, monitors, loss_fn=cross_entropy, probe_data=loader
        )
    fit(fabric, model, optimizer, loader, cross_entropy, STEPS, curvature=curvature, accumulate=2)
    return {
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        "grads": [p.grad for p in net.parameters()],
        "optimizer": optimizer.state_dict(),
        "modes": [m.training for m in net.modules()],
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
    }


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_fabric_loop_with_every_monitor_is_the_loop_without_them(
    tmp_path: Path, optimizer: str
) -> None:
    monitors = every_monitor()
    run = train(tmp_path / "with", optimizer, monitors)
    baseline = train(tmp_path / "without", optimizer, [])
    for name, value in baseline["state"].items():
        assert torch.equal(run["state"][name], value), name
    assert all(
        a is None and b is None for a, b in zip(run["grads"], baseline["grads"], strict=True)
    )
    for key, value in baseline["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(run["optimizer"]["state"][key][name], tensor), (key, name)
    assert run["optimizer"]["param_groups"] == baseline["optimizer"]["param_groups"]
    assert run["modes"] == baseline["modes"]
    assert torch.equal(run["rng"][0], baseline["rng"][0])
    assert np.array_equal(run["rng"][1], baseline["rng"][1])
    assert run["rng"][2] == baseline["rng"][2]

    # ... and every monitor measured at every step (so the comparison means something).
    eigen, trace, density, coherence, sharpness = monitors
    assert eigen.schedule.last_step == STEPS  # the final probe
    assert {m.schedule.last_step for m in (trace, density, coherence, sharpness)} == {STEPS - 1}
    assert {
        "curvature/eigenvalue_2", "curvature/eigenvalue_min", "curvature/eigenvalue_1/net.4",
        "curvature/stability_threshold", "curvature/sharpness_ratio",
    } <= set(eigen.last_metrics)  # fmt: skip
    assert "curvature/trace/net.1" in trace.last_metrics
    assert coherence.last_metrics["gradient/num_samples"] == 8
    assert sharpness.last_metrics["curvature/batch_sharpness"] > 0


def test_logged_sharpness_is_the_dense_hessian_eigenvalue_at_the_final_weights(
    tmp_path: Path,
) -> None:
    fabric = make_fabric(tmp_path)
    net = TanhNet()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5))
    loader = fabric.setup_dataloaders(DataLoader(regression_data(), batch_size=16, shuffle=True))
    eigen = HessianEigenvalueMonitor(k=2, every_n_steps=4, on_train_end=True)
    curvature = FabricMonitors(fabric, model, optimizer, [eigen], loss_fn=mse, probe_data=loader)
    fit(fabric, model, optimizer, loader, mse, 10, curvature=curvature)
    fabric.logger.finalize("success")

    # The independent reference: the dense Hessian of the probe loss at the final weights.
    reference = copy.deepcopy(net).double()
    names = [n for n, _ in reference.named_parameters()]
    (probe,) = eigen.fixed_probe or []
    x, y = (t.double() for t in probe)

    def loss(*params: torch.Tensor) -> torch.Tensor:
        weights = dict(zip(names, params, strict=True))
        out = torch.func.functional_call(reference, weights, (x,))
        return torch.nn.functional.mse_loss(out, y)

    params = tuple(p.detach() for p in reference.parameters())
    blocks = torch.func.hessian(loss, argnums=tuple(range(len(params))))(*params)
    rows = zip(blocks, (p.numel() for p in params), strict=True)
    dense = torch.cat([torch.cat([b.reshape(n, -1) for b in row], dim=1) for row, n in rows])
    top = torch.linalg.eigvalsh(dense).flip(0)[:2]
    logged = eigen.last_metrics
    assert logged["curvature/eigenvalue_1"] == pytest.approx(float(top[0]), rel=1e-3)
    assert logged["curvature/eigenvalue_2"] == pytest.approx(float(top[1]), rel=1e-3)
    assert logged["curvature/stability_threshold"] == pytest.approx((2 + 2 * 0.5) / 0.05)

    # Logged through Fabric's logger, at the steps of the schedule and the final probe.
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows_ = [r for r in csv.DictReader(f) if r.get("curvature/eigenvalue_1")]
    assert [int(r["step"]) for r in rows_] == [0, 4, 8, 10]
    assert float(rows_[-1]["curvature/eigenvalue_1"]) == pytest.approx(
        logged["curvature/eigenvalue_1"]
    )


def _fabric_parts(tmp_path: Path, logger: bool = True) -> tuple[Fabric, Any, Any, Any]:
    fabric = make_fabric(tmp_path) if logger else Fabric(accelerator="cpu", devices=1)
    net = TanhNet()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    return fabric, model, optimizer, DataLoader(regression_data(), batch_size=8)


@pytest.mark.parametrize(
    ("monitor", "options", "match"),
    [
        (lambda: SAM(), {}, r"`SAM` replaces the LightningModule's `optimizer_step`.*sam_gradient"),
        (
            lambda: GradientCoherenceMonitor(source="accumulation"),
            {},
            r"source='accumulation'.*Trainer's backward hooks.*use source='probe'",
        ),
        (
            lambda: HessianEigenvalueMonitor(prog_bar=True),
            {},
            r"prog_bar=True.*no progress bar",
        ),
        (lambda: LearningRateMonitor(), {}, r"`LearningRateMonitor` is not a curvature monitor"),
        (lambda: HessianTraceMonitor(), {"loss_fn": None}, r"needs a loss: pass `loss_fn=`"),
        (lambda: HessianTraceMonitor(), {"probe_data": None}, r"pass `probe_data=`"),
        (lambda: HessianEigenvalueMonitor(k=99), {}, r"`k` must be at most .* \(57\) of TanhNet"),
        (
            lambda: HessianTraceMonitor(),
            {"logger": False},
            r"this Fabric has none: pass `loggers=`",
        ),
    ],
)
def test_what_a_fabric_loop_cannot_run_is_refused_at_construction(
    tmp_path: Path, monitor: Any, options: dict[str, Any], match: str
) -> None:
    fabric, model, optimizer, loader = _fabric_parts(tmp_path, options.pop("logger", True))
    kwargs = {"loss_fn": mse, "probe_data": loader, **options}
    with pytest.raises(MisconfigurationException, match=match):
        FabricMonitors(fabric, model, optimizer, [monitor()], **kwargs)


def test_a_current_batch_probe_needs_the_batch(tmp_path: Path) -> None:
    fabric, model, optimizer, loader = _fabric_parts(tmp_path)
    monitor = HessianTraceMonitor(num_hvps=4, probe="current", every_n_steps=1)
    curvature = FabricMonitors(fabric, model, optimizer, [monitor], loss_fn=mse)
    with pytest.raises(ValueError, match="probe='current' measures the batch: pass `batch`"):
        curvature.on_train_batch_start(0)
    batch = next(iter(loader))
    curvature.on_train_batch_start(0, batch)
    from lightning_curvature import hessian_trace
    from lightning_curvature.functional.linalg.sampling import make_generator

    expected = hessian_trace(model.module, mse, batch, 4, generator=make_generator(batch[0].device))
    assert monitor.last_metrics["curvature/trace"] == pytest.approx(float(expected.estimate))
