"""The math layer is pure torch: no module of ``lightning_curvature.functional`` imports
Lightning (the callbacks layer sits on top of it, never the other way round)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning_curvature

PACKAGE = Path(lightning_curvature.__file__).parent
FUNCTIONAL = PACKAGE / "functional"

# The top-level package imports the callbacks (and so Lightning); a stub with the real
# __path__ lets the child import the functional subpackage without that __init__.
SCRIPT = """
import importlib, json, pkgutil, sys, types
stub = types.ModuleType("lightning_curvature")
stub.__path__ = [{package!r}]
sys.modules["lightning_curvature"] = stub
functional = importlib.import_module("lightning_curvature.functional")
names = ["lightning_curvature.functional"] + [
    "lightning_curvature.functional." + info.name
    for info in pkgutil.iter_modules(functional.__path__)
]
for name in names:
    importlib.import_module(name)
heavy = sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")
    or m.startswith("lightning_curvature.callbacks")
)
print(json.dumps({{"imported": names, "heavy": heavy}}))
"""


def test_functional_modules_import_without_lightning() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(package=str(PACKAGE))],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    modules = {f"lightning_curvature.functional.{p.stem}" for p in FUNCTIONAL.glob("*.py")}
    modules = {m.removesuffix(".__init__") for m in modules}
    assert set(report["imported"]) == modules
    assert len(modules) >= 12
    assert report["heavy"] == []


def test_the_check_sees_a_lightning_module() -> None:
    """The same probe reports a module named ``lightning`` once one is loaded."""
    script = SCRIPT.format(package=str(PACKAGE)).replace(
        "for name in names:",
        'sys.modules["lightning"] = types.ModuleType("lightning")\nfor name in names:',
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == ["lightning"]
