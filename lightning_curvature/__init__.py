"""lightning_curvature: see the loss landscape's geometry while your model trains.

Model-level functions (pure torch, usable without a Trainer) and Lightning callbacks that
log them to TensorBoard and any other Lightning logger. The callbacks are imported on first
use, so ``import lightning_curvature.functional`` (or the functions from here) never loads
Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_curvature.__about__ import __version__
from lightning_curvature.errors import (
    CurvatureCheckError,
    CurvatureWarning,
    NonFiniteCurvatureError,
)
from lightning_curvature.functional import (
    BatchSharpness,
    CriticalSharpness,
    DirectionalCurvature,
    GradientCoherence,
    HessianEigenvalues,
    HessianOperator,
    HessianTrace,
    LossSlice,
    OperatorOptions,
    OutputLoss,
    SAMGradient,
    SpectralDensity,
    batch_sharpness,
    critical_sharpness,
    density_on_grid,
    directional_curvature,
    gradient_coherence,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
    loss_slice,
    sam_gradient,
    spectral_density,
    subspace_share,
)
from lightning_curvature.reader import CurvatureRun, Series, find_runs, read_run

if TYPE_CHECKING:
    from lightning_curvature.callbacks import (
        SAM,
        BatchSharpnessMonitor,
        CriticalSharpnessMonitor,
        CurvatureMonitor,
        FabricMonitors,
        GradientCoherenceMonitor,
        HessianEigenvalueMonitor,
        HessianTraceMonitor,
        LossLandscapeMonitor,
        SpectralDensityMonitor,
        TrainingGradientCoherenceMonitor,
    )

_CALLBACKS = (
    "SAM",
    "BatchSharpnessMonitor",
    "CriticalSharpnessMonitor",
    "CurvatureMonitor",
    "FabricMonitors",
    "GradientCoherenceMonitor",
    "HessianEigenvalueMonitor",
    "HessianTraceMonitor",
    "LossLandscapeMonitor",
    "SpectralDensityMonitor",
    "TrainingGradientCoherenceMonitor",
)


def __getattr__(name: str) -> Any:
    """The callbacks, imported (with Lightning) the first time one is asked for."""
    if name in _CALLBACKS:
        return getattr(importlib.import_module("lightning_curvature.callbacks"), name)
    raise AttributeError(f"module 'lightning_curvature' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CALLBACKS))


__all__ = [
    "SAM",
    "BatchSharpness",
    "BatchSharpnessMonitor",
    "CriticalSharpness",
    "CriticalSharpnessMonitor",
    "CurvatureCheckError",
    "CurvatureMonitor",
    "CurvatureRun",
    "CurvatureWarning",
    "DirectionalCurvature",
    "FabricMonitors",
    "GradientCoherence",
    "GradientCoherenceMonitor",
    "HessianEigenvalueMonitor",
    "HessianEigenvalues",
    "HessianOperator",
    "HessianTrace",
    "HessianTraceMonitor",
    "LossLandscapeMonitor",
    "LossSlice",
    "NonFiniteCurvatureError",
    "OperatorOptions",
    "OutputLoss",
    "SAMGradient",
    "Series",
    "SpectralDensity",
    "SpectralDensityMonitor",
    "TrainingGradientCoherenceMonitor",
    "__version__",
    "batch_sharpness",
    "critical_sharpness",
    "density_on_grid",
    "directional_curvature",
    "find_runs",
    "gradient_coherence",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "loss_slice",
    "read_run",
    "sam_gradient",
    "spectral_density",
    "subspace_share",
]
