"""The monitors are configurable from a LightningCLI YAML config and the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from cli import main  # noqa: E402

from lightning_curvature import (  # noqa: E402
    SAM,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_cli_runs_the_example_config_with_overrides(tmp_path: Path) -> None:
    cli = main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "curvature_config.yaml"),
            "--trainer.max_steps=6",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.callbacks.init_args.every_n_steps=3",  # overrides the last callback
            "--trainer.callbacks+=lightning_curvature.SAM",  # appends one from the command line
            "--trainer.callbacks.rho=0.02",
            "--data.num_examples=100",
        ]
    )
    callbacks = {type(c): c for c in cli.trainer.callbacks}
    eigen = callbacks[HessianEigenvalueMonitor]
    assert eigen.k == 2
    assert eigen.schedule.every_n_steps == 25
    assert callbacks[HessianTraceMonitor].per_layer is True
    assert callbacks[GradientCoherenceMonitor].per_layer is True
    assert callbacks[SAM].rho == 0.02
    assert callbacks[SAM].num_sam_steps == 6
    events = EventAccumulator(str(tmp_path / "cli" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("curvature/eigenvalue_2")] == [0]
    assert [e.step for e in events.Scalars("curvature/density_max")] == [0, 3]
    assert [e.step for e in events.Scalars("curvature/trace")] == [0]
    assert [e.step for e in events.Scalars("gradient/coherence")] == [0]
    assert [e.step for e in events.Scalars("gradient/coherence/net.0")] == [0]
