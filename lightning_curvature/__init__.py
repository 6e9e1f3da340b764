"""lightning_curvature: see the loss landscape's geometry while your model trains.

Model-level functions (pure torch, usable without a Trainer) and Lightning callbacks that
log them to TensorBoard and any other Lightning logger.
"""

from lightning_curvature.__about__ import __version__
from lightning_curvature.callbacks import (
    SAM,
    BatchSharpnessMonitor,
    CurvatureMonitor,
    GradientCoherenceMonitor,
    HessianEigenvalueMonitor,
    HessianTraceMonitor,
    SpectralDensityMonitor,
)
from lightning_curvature.functional import (
    BatchSharpness,
    CurvatureWarning,
    DirectionalCurvature,
    GradientCoherence,
    HessianEigenvalues,
    HessianOperator,
    HessianTrace,
    NonFiniteCurvatureError,
    OperatorOptions,
    OutputLoss,
    SAMGradient,
    SpectralDensity,
    batch_sharpness,
    density_on_grid,
    directional_curvature,
    gradient_coherence,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
    sam_gradient,
    spectral_density,
    subspace_share,
)

__all__ = [
    "SAM",
    "BatchSharpness",
    "BatchSharpnessMonitor",
    "CurvatureMonitor",
    "CurvatureWarning",
    "DirectionalCurvature",
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
    "batch_sharpness",
    "density_on_grid",
    "directional_curvature",
    "gradient_coherence",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "sam_gradient",
    "spectral_density",
    "subspace_share",
]
