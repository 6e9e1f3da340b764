"""Pure-torch curvature math: no Lightning import anywhere in this package.

Model-level functions take ``loss_fn(model, batch) -> scalar`` and one batch or an iterable
of batches, and return small result dataclasses with tensors on the model's device. Each is
the twin of a callback of the same name in ``lightning_curvature.callbacks``.

The subpackages hold what these functions are built from, importable from their modules but
not exported here: ``operator/`` (the one curvature-vector product), ``linalg/`` (matrix-free
algorithms over any matvec), ``model/`` (the model as a function of its measured parameters)
and ``gradients/`` (gradient samples, their sums, SAM's perturbation).
"""

from lightning_curvature.functional.batch_sharpness import BatchSharpness, batch_sharpness
from lightning_curvature.functional.coherence import gradient_coherence
from lightning_curvature.functional.critical_sharpness import CriticalSharpness, critical_sharpness
from lightning_curvature.functional.density import (
    SpectralDensity,
    density_on_grid,
    spectral_density,
)
from lightning_curvature.functional.directional import (
    DirectionalCurvature,
    directional_curvature,
    subspace_share,
)
from lightning_curvature.functional.eigenvalues import HessianEigenvalues, hessian_eigenvalues
from lightning_curvature.functional.gradients.statistics import GradientCoherence
from lightning_curvature.functional.landscape import LossSlice, loss_slice
from lightning_curvature.functional.operator.ggn import OutputLoss
from lightning_curvature.functional.operator.hvp import hessian_vector_product
from lightning_curvature.functional.operator.operator import HessianOperator
from lightning_curvature.functional.operator.options import OperatorOptions
from lightning_curvature.functional.sam import SAMGradient, sam_gradient
from lightning_curvature.functional.trace import HessianTrace, hessian_trace

__all__ = [
    "BatchSharpness",
    "CriticalSharpness",
    "DirectionalCurvature",
    "GradientCoherence",
    "HessianEigenvalues",
    "HessianOperator",
    "HessianTrace",
    "LossSlice",
    "OperatorOptions",
    "OutputLoss",
    "SAMGradient",
    "SpectralDensity",
    "batch_sharpness",
    "critical_sharpness",
    "density_on_grid",
    "directional_curvature",
    "gradient_coherence",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "loss_slice",
    "sam_gradient",
    "spectral_density",
    "subspace_share",
]
