"""lightning_curvature: see the loss landscape's geometry while your model trains.

Model-level functions (pure torch, usable without a Trainer) and Lightning callbacks that
log them to TensorBoard and any other Lightning logger.
"""

from lightning_curvature.__about__ import __version__
from lightning_curvature.callbacks import (
    SAM,
    CurvatureMonitor,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)
from lightning_curvature.functional import (
    CurvatureWarning,
    GradientCoherence,
    HessianEigenvalues,
    HessianOperator,
    HessianTrace,
    NonFiniteCurvatureError,
    OperatorOptions,
    OutputLoss,
    SAMGradient,
    SpectralDensity,
    density_on_grid,
    gradient_coherence,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
    sam_gradient,
    spectral_density,
)

__all__ = [
    "SAM",
    "CurvatureMonitor",
    "CurvatureWarning",
    "GradientCoherence",
    "GradientCoherenceMonitor",
    "HessianEigenvalueMonitor",
    "HessianEigenvalues",
    "HessianOperator",
    "HessianTrace",
    "HessianTraceMonitor",
    "NonFiniteCurvatureError",
    "OperatorOptions",
    "OutputLoss",
    "SAMGradient",
    "SpectralDensity",
    "SpectralDensityMonitor",
    "__version__",
    "density_on_grid",
    "gradient_coherence",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "sam_gradient",
    "spectral_density",
]
