"""Pure-torch curvature math: no Lightning import anywhere in this package.

Model-level functions take ``loss_fn(model, batch) -> scalar`` and one batch or an iterable
of batches, and return small result dataclasses with tensors on the model's device.
"""

from lightning_curvature.functional.batches import move_to_device, split_batches
from lightning_curvature.functional.coherence import gradient_coherence
from lightning_curvature.functional.density import (
    SpectralDensity,
    density_on_grid,
    spectral_density,
)
from lightning_curvature.functional.directional import (
    BatchSharpness,
    DirectionalCurvature,
    batch_sharpness,
    directional_curvature,
    subspace_share,
)
from lightning_curvature.functional.eigenvalues import HessianEigenvalues, hessian_eigenvalues
from lightning_curvature.functional.ggn import OutputLoss
from lightning_curvature.functional.gradient_statistics import GradientCoherence, GradientSums
from lightning_curvature.functional.hvp import HessianOperator, hessian_vector_product
from lightning_curvature.functional.lanczos import lanczos_eigenpairs, lanczos_quadrature
from lightning_curvature.functional.options import OperatorOptions
from lightning_curvature.functional.parameters import ParameterLayout, select_parameters
from lightning_curvature.functional.probe import probe_context, unwrap_model
from lightning_curvature.functional.sam import SAMGradient, sam_gradient
from lightning_curvature.functional.trace import HessianTrace, hessian_trace
from lightning_curvature.functional.trace_estimators import hutch_plus_plus, hutchinson
from lightning_curvature.functional.warnings import CurvatureWarning, NonFiniteCurvatureError

__all__ = [
    "BatchSharpness",
    "CurvatureWarning",
    "DirectionalCurvature",
    "GradientCoherence",
    "GradientSums",
    "HessianEigenvalues",
    "HessianOperator",
    "HessianTrace",
    "NonFiniteCurvatureError",
    "OperatorOptions",
    "OutputLoss",
    "ParameterLayout",
    "SAMGradient",
    "SpectralDensity",
    "batch_sharpness",
    "density_on_grid",
    "directional_curvature",
    "gradient_coherence",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "hutch_plus_plus",
    "hutchinson",
    "lanczos_eigenpairs",
    "lanczos_quadrature",
    "move_to_device",
    "probe_context",
    "sam_gradient",
    "select_parameters",
    "spectral_density",
    "split_batches",
    "subspace_share",
    "unwrap_model",
]
