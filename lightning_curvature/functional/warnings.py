"""The project's warning and error classes for bad luck during a measurement."""

from __future__ import annotations

__all__ = ["CurvatureWarning", "NonFiniteCurvatureError"]


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
