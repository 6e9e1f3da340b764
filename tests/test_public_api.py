"""Every public name is importable from the top level and documents a runnable example."""

from __future__ import annotations

import inspect

import pytest

import lightning_curvature
from lightning_curvature import callbacks, functional

PUBLIC = sorted(set(lightning_curvature.__all__) - {"__version__"})
DESIGN = [
    "hessian_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "gradient_coherence",
    "HessianEigenvalueMonitor",
    "HessianTraceMonitor",
    "GradientCoherenceMonitor",
    "SAM",
]


def test_the_design_names_are_exported() -> None:
    assert set(DESIGN) <= set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_a_docstring_with_an_example(name: str) -> None:
    doc = inspect.getdoc(getattr(lightning_curvature, name)) or ""
    assert ">>>" in doc, f"{name} has no runnable example in its docstring"


@pytest.mark.parametrize("package", [callbacks, functional], ids=lambda p: p.__name__)
def test_subpackage_names_are_documented_too(package: object) -> None:
    missing = [
        name
        for name in package.__all__  # type: ignore[attr-defined]
        if ">>>" not in (inspect.getdoc(getattr(package, name)) or "")
    ]
    assert not missing, missing
