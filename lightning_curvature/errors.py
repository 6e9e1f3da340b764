"""The project's warning and error classes for bad luck during a measurement."""

from __future__ import annotations

__all__ = ["CurvatureWarning", "NonFiniteCurvatureError", "PiecewiseLinearError"]


class CurvatureWarning(UserWarning):
    """Something went wrong in a measurement, but nothing the user trains was affected.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("Lanczos did not converge", CurvatureWarning)
        >>> caught[0].category.__name__
        'CurvatureWarning'
    """


class NonFiniteCurvatureError(ArithmeticError):
    """A loss or Hessian-vector product in a measurement was NaN or infinite.

    The model-level functions raise it so that a caller (a monitor) can skip that one
    measurement; the model is left untouched either way.

    Example:
        >>> issubclass(NonFiniteCurvatureError, ArithmeticError)
        True
    """


class PiecewiseLinearError(ValueError):
    """A finite difference was asked for through a piecewise-linear op (ReLU, max-pooling).

    Its products would cross the kinks and differ from the Hessian autograd defines. Found
    only once a forward has run (a functional ``F.relu`` is no module), so a monitor skips
    that probe with one warning instead of stopping training.

    Example:
        >>> issubclass(PiecewiseLinearError, ValueError)
        True
    """
