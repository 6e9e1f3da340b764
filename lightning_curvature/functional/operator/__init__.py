"""The one curvature-vector product: the operator, its backends and their checks, the GGN."""
