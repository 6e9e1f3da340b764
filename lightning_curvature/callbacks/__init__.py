"""Lightning callbacks: when to measure, on what data, and how to log it."""

from lightning_curvature.callbacks.batch_sharpness import BatchSharpnessMonitor
from lightning_curvature.callbacks.coherence import GradientCoherenceMonitor
from lightning_curvature.callbacks.critical_sharpness import CriticalSharpnessMonitor
from lightning_curvature.callbacks.density import SpectralDensityMonitor
from lightning_curvature.callbacks.eigenvalues import HessianEigenvalueMonitor
from lightning_curvature.callbacks.fabric import FabricMonitors
from lightning_curvature.callbacks.isolation import training_step_loss
from lightning_curvature.callbacks.landscape import LossLandscapeMonitor
from lightning_curvature.callbacks.measurement import Measurement
from lightning_curvature.callbacks.monitor import CurvatureMonitor
from lightning_curvature.callbacks.sam import SAM
from lightning_curvature.callbacks.trace import HessianTraceMonitor
from lightning_curvature.callbacks.training_coherence import TrainingGradientCoherenceMonitor

__all__ = [
    "SAM",
    "BatchSharpnessMonitor",
    "CriticalSharpnessMonitor",
    "CurvatureMonitor",
    "FabricMonitors",
    "GradientCoherenceMonitor",
    "HessianEigenvalueMonitor",
    "HessianTraceMonitor",
    "LossLandscapeMonitor",
    "Measurement",
    "SpectralDensityMonitor",
    "TrainingGradientCoherenceMonitor",
    "training_step_loss",
]
