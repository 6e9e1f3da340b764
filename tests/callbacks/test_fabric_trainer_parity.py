"""The same monitors under a Trainer and in a Fabric loop write the same numbers and charts.

One model, one optimizer, one data order; the Trainer measures ``training_step``'s loss and
the Fabric loop the same loss as ``loss_fn``. Every scalar both write to TensorBoard (each
monitor's every probe, the optimizer-step instruments included) is equal, and so is the
custom-scalars layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from fabric_loops import TanhNet, fit, make_fabric, mse, regression_data
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from tensorboard.util import tensor_util
from torch.utils.data import DataLoader

from lightning_curvature import (
    BatchSharpnessMonitor,
    FabricMonitors,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
]
STEPS = 7
LR = 0.05


def monitors() -> list[Any]:
    return [
        HessianEigenvalueMonitor(
            k=2, every_n_steps=3, per_layer=True, gradient_share=True, update_sharpness=True
        ),
        HessianTraceMonitor(num_hvps=4, every_n_steps=2),
        SpectralDensityMonitor(num_steps=6, num_points=20, every_n_steps=3),
        GradientCoherenceMonitor(every_n_steps=2),
        BatchSharpnessMonitor(num_batches=2, every_n_steps=3),
    ]


class Module(pl.LightningModule):
    """``TanhNet`` as a LightningModule: the same parameter names, the same loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TanhNet().net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return mse(self, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


def _read(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[str]]]:
    (events_file,) = log_dir.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(events_file.parent), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if not tag.endswith("_seconds")
    }
    (config,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(config.tensor_proto).item())
    charts = {
        f"{category.title}: {chart.title}": list(chart.multiline.tag or chart.margin.series)
        for category in layout.category
        for chart in category.chart
    }
    return scalars, charts


def test_a_fabric_loop_writes_what_a_trainer_writes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Module()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=STEPS,
        callbacks=monitors(),
        logger=TensorBoardLogger(tmp_path / "trainer", name="run"),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(regression_data(), batch_size=8))

    fabric = make_fabric(tmp_path / "fabric", logger="tensorboard")
    net = TanhNet()  # a plain module
    net.load_state_dict(initial)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    model, optimizer = fabric.setup(net, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(regression_data(), batch_size=8))
    watched = monitors()
    curvature = FabricMonitors(fabric, model, optimizer, watched, loss_fn=mse, probe_data=loader)
    fit(fabric, model, optimizer, loader, mse, STEPS, curvature=curvature)
    fabric.logger.finalize("success")

    for name, value in module.state_dict().items():  # the same training
        assert torch.equal(value, net.state_dict()[name]), name
    trainer_scalars, trainer_charts = _read(tmp_path / "trainer")
    fabric_scalars, fabric_charts = _read(tmp_path / "fabric")
    assert fabric_charts == trainer_charts
    assert "curvature: sharpness λ₁ and batch sharpness vs. stability threshold (2+2β)/η" in (
        fabric_charts
    )
    tags = {t for t in trainer_scalars if t.split("/")[0] in ("curvature", "gradient")}
    assert {
        "curvature/eigenvalue_1/net.0", "curvature/training_gradient_top_share",
        "curvature/update_sharpness", "curvature/trace", "curvature/density_max",
        "curvature/batch_sharpness", "gradient/coherence",
    } <= tags  # fmt: skip
    for tag in sorted(tags | {t for t in trainer_scalars if t.startswith("probe_cost/")}):
        assert fabric_scalars[tag] == trainer_scalars[tag], tag  # steps and values, exactly
    assert [s for s, _ in fabric_scalars["curvature/eigenvalue_1"]] == [0, 3, 6]
    assert [s for s, _ in fabric_scalars["curvature/update_sharpness"]] == [3, 6]
